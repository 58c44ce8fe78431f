"""celerity_nano_4: CPU-sized Celerity member 4 of 4 (recipes/family.py `nano`).

Shape: d_model 96, 6 heads x 16, 3 layers, d_ff 768, vocab 512, context 128 -> N = 652,608.
At 20 TPP: D = 13.05M tokens, B = 561 x 128, T = 182 steps, 18 warmup steps, tau 0.175.
Trains on the built-in stdlib corpus on 2 CPU cores:
  python -m celerity_jax.main recipe=celerity_nano_4
"""
from recipes.family import nano


def config():
  return nano("celerity_nano_4", d_model=96)
