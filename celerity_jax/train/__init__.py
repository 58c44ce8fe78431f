"""Train state, the jitted step and the training loop."""
