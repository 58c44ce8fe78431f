"""celerity_nano_2: CPU-sized Celerity member 2 of 4 (recipes/family.py `nano`).

Shape: d_model 32, 2 heads x 16, 1 layer, d_ff 256, vocab 512, context 128 -> N = 53,440.
At 20 TPP: D = 1.07M tokens, B = 160 x 128, T = 52 steps, 5 warmup steps, tau 0.175.
Trains on the built-in stdlib corpus on 2 CPU cores:
  python -m celerity_jax.main recipe=celerity_nano_2
"""
from recipes.family import nano


def config():
  return nano("celerity_nano_2", d_model=32)
