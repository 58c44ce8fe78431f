"""celerity_1_8b: the Celerity 1.8B member, N = 1,809.8M (paper: 1.81B).

Shape: d_model 1536, 12 heads x 128, 30 layers, d_ff 12288, vocab 128,256, context 8192,
Celerity rules (recipes/family.py). TPP band by scaling.tpp=20|80|234 (default 20); on one
data-parallel replica (B rounds to the data-parallel size):
  TPP  20: D = 36.2B tokens, B = 461 x 8192, T = 9,584 steps, warmup 99, tau 0.175, 5.57e+20 FLOPs
  TPP  80: D = 144.8B tokens, B = 923 x 8192, T = 19,148 steps, warmup 50, tau 0.087, 2.23e+21 FLOPs
  TPP 234: D = 423.5B tokens, B = 1578 x 8192, T = 32,760 steps, warmup 29, tau 0.051, 6.52e+21 FLOPs
FLOPs are the paper's convention (6 N D + full attention). Made for a TPU v5p-32 (16 chips),
bfloat16 compute, on your corpus and a 128,256-piece sentencepiece tokenizer:
  python -m celerity_jax.main recipe=celerity_1_8b scaling.tpp=234 \\
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout: FSDP over the slice, `dots` remat, one sequence per device per microbatch
(`python -m tools.aot recipe=celerity_1_8b --topology v5p-32` checks it; `--fit` ranks the
alternatives, README "Compiling for a TPU slice"); the step needs 19.4 GB of a chip's 102 GB
(B = 464 on 16 chips, +0.6% from the law).
"""
from recipes.family import celerity

SLICE = "v5p-32"


def config():
  return celerity("celerity_1_8b", d_model=1536, n_layers=30, d_head=128, tpp=20.0,
                  remat="dots", microbatch_rows=1)
