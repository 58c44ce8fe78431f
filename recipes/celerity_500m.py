"""celerity_500m: the Celerity 500M member, N = 502.9M (paper: 503M).

Shape: d_model 896, 14 heads x 64, 17 layers, d_ff 7168, vocab 128,256, context 8192,
Celerity rules (recipes/family.py). TPP band by scaling.tpp=20|80|234 (default 20); on one
data-parallel replica (B rounds to the data-parallel size):
  TPP  20: D = 10.1B tokens, B = 243 x 8192, T = 5,052 steps, warmup 188, tau 0.175, 4.54e+19 FLOPs
  TPP  80: D = 40.2B tokens, B = 486 x 8192, T = 10,104 steps, warmup 94, tau 0.087, 1.82e+20 FLOPs
  TPP 234: D = 117.7B tokens, B = 832 x 8192, T = 17,264 steps, warmup 55, tau 0.051, 5.31e+20 FLOPs
FLOPs are the paper's convention (6 N D + full attention). Meant for a TPU v5e-16 or 2x H100 class slice,
bfloat16 compute, on your corpus and a 128,256-piece sentencepiece tokenizer:
  python -m celerity_jax.main recipe=celerity_500m scaling.tpp=234 mesh.fsdp=-1 mesh.data=1 \\
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
"""
from recipes.family import celerity


def config():
  return celerity("celerity_500m", d_model=896, n_layers=17, d_head=64, tpp=20.0)
