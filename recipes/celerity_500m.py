"""celerity_500m: the Celerity 500M member, N = 502.9M (paper: 503M).

Shape: d_model 896, 14 heads x 64, 17 layers, d_ff 7168, vocab 128,256, context 8192,
Celerity rules (recipes/family.py). TPP band by scaling.tpp=20|80|234 (default 20); on one
data-parallel replica (B rounds to the data-parallel size):
  TPP  20: D = 10.1B tokens, B = 243 x 8192, T = 5,052 steps, warmup 188, tau 0.175, 4.54e+19 FLOPs
  TPP  80: D = 40.2B tokens, B = 486 x 8192, T = 10,104 steps, warmup 94, tau 0.087, 1.82e+20 FLOPs
  TPP 234: D = 117.7B tokens, B = 832 x 8192, T = 17,264 steps, warmup 55, tau 0.051, 5.31e+20 FLOPs
FLOPs are the paper's convention (6 N D + full attention). Made for a TPU v5e-16 (16 chips),
bfloat16 compute, on your corpus and a 128,256-piece sentencepiece tokenizer:
  python -m celerity_jax.main recipe=celerity_500m scaling.tpp=234 \\
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout: FSDP over the slice, `dots` remat, one sequence per device per microbatch
(`python -m tools.aot recipe=celerity_500m --topology v5litepod-16` checks it; `--fit` ranks the
alternatives, README "Compiling for a TPU slice"); the step needs 10.9 GB of a chip's 17 GB (B = 240 on 16 chips, -1.3% from the law).
"""
from recipes.family import celerity

SLICE = "v5litepod-16"


def config():
  return celerity("celerity_500m", d_model=896, n_layers=17, d_head=64, tpp=20.0,
                  remat="dots", microbatch_rows=1)
