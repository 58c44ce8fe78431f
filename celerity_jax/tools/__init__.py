"""Command-line tools (python -m celerity_jax.tools.NAME)."""
