"""celerity_nano_4: CPU-sized Celerity member 4 of 4 (recipes/family.py `nano`).
The largest member; `celerity_tiny` is an alias of it (the CPU default).

Shape: d_model 64, 4 heads x 16, 2 layers, d_ff 512, vocab 512, context 128 -> N = 230,016.
At 20 TPP: D = 4.60M tokens, B = 333 x 128, T = 108 steps, 11 warmup steps, tau 0.175.
Trains on the built-in stdlib corpus on 2 CPU cores:
  python -m celerity_jax.main recipe=celerity_nano_4
"""
from recipes.family import nano


def config():
  return nano("celerity_nano_4", d_model=64)
