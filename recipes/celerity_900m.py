"""celerity_900m: the Celerity 900M member, N = 906.1M (paper: 906M).

Shape: d_model 1152, 9 heads x 128, 23 layers, d_ff 9216, vocab 128,256, context 8192,
Celerity rules (recipes/family.py). TPP band by scaling.tpp=20|80|234 (default 20); on one
data-parallel replica (B rounds to the data-parallel size):
  TPP  20: D = 18.1B tokens, B = 327 x 8192, T = 6,765 steps, warmup 140, tau 0.175, 1.46e+20 FLOPs
  TPP  80: D = 72.5B tokens, B = 653 x 8192, T = 13,550 steps, warmup 70, tau 0.087, 5.83e+20 FLOPs
  TPP 234: D = 212.0B tokens, B = 1117 x 8192, T = 23,171 steps, warmup 41, tau 0.051, 1.70e+21 FLOPs
FLOPs are the paper's convention (6 N D + full attention). Made for a TPU v5p-16 (8 chips),
bfloat16 compute, on your corpus and a 128,256-piece sentencepiece tokenizer:
  python -m celerity_jax.main recipe=celerity_900m scaling.tpp=234 \\
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout: FSDP over the slice, `dots` remat, one sequence per device per microbatch
(`python -m tools.aot recipe=celerity_900m --topology v5p-16` checks it; `--fit` ranks the
alternatives, README "Compiling for a TPU slice"); the step needs 14.7 GB of a chip's 102 GB (B = 328 on 8 chips, +0.5% from the law).
"""
from recipes.family import celerity

SLICE = "v5p-16"


def config():
  return celerity("celerity_900m", d_model=1152, n_layers=23, d_head=128, tpp=20.0,
                  remat="dots", microbatch_rows=1)
