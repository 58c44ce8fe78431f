"""celerity_nano_3: CPU-sized Celerity member 3 of 4 (recipes/family.py `nano`).

Shape: d_model 48, 3 heads x 16, 2 layers, d_ff 384, vocab 512, context 128 -> N = 141,792.
At 20 TPP: D = 2.84M tokens, B = 261 x 128, T = 85 steps, 8 warmup steps, tau 0.175.
Trains on the built-in stdlib corpus on 2 CPU cores:
  python -m celerity_jax.main recipe=celerity_nano_3
"""
from recipes.family import nano


def config():
  return nano("celerity_nano_3", d_model=48)
