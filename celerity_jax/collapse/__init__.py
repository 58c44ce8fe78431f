"""Loss-curve collapse: the in-step monitor, the parametric surrogate, final-loss prediction."""
