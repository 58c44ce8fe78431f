"""celerity_nano_1: CPU-sized Celerity member 1 of 4 (recipes/family.py `nano`).

Shape: d_model 16, 1 head x 16, 1 layer, d_ff 128, vocab 512, context 128 -> N = 21,600.
At 20 TPP: D = 0.43M tokens, B = 102 x 128, T = 33 steps, 3 warmup steps, tau 0.175.
Trains on the built-in stdlib corpus on 2 CPU cores:
  python -m celerity_jax.main recipe=celerity_nano_1
"""
from recipes.family import nano


def config():
  return nano("celerity_nano_1", d_model=16)
