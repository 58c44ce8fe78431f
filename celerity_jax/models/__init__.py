"""Decoder models (Flax NNX)."""
