"""celerity_1b: the ~1B member of the Celerity family (our shape; the paper has none at 1B).

Shape: d_model 1152, 9 heads x 128, 26 layers, d_ff 9216, vocab 128,256, context 8192 ->
N = 985.6M (the paper's 900M member widened by nothing and deepened from 23 to 26 layers, aspect
d_model / layers = 44 vs the family's 49-53). At 20 TPP: D = 19.7B tokens, B = 337 -> 336 sequences
(2.75M tokens), T = 7,160 steps, 137 warmup steps, ~1.3e20 FLOPs.

Meant for a TPU v5p-64 / 8x H100 class slice, bfloat16 compute:
  python -m celerity_jax.main recipe=celerity_1b mesh.fsdp=-1 mesh.data=1
`--print-config` works on any machine (nothing is allocated).
"""
from recipes.family import celerity


def config():
  return celerity("celerity_1b", d_model=1152, n_layers=26, d_head=128, tpp=20.0)
