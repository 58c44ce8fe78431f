"""Downstream evaluation: lm-evaluation-harness tasks scored by a celerity_jax model (lm.py),
batched and sharded (scorer.py), chosen and run by tasks.py."""
