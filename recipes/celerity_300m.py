"""celerity_300m: the Celerity 300M member, N = 270.7M (paper: 271M).

Shape: d_model 640, 10 heads x 64, 13 layers, d_ff 5120, vocab 128,256, context 8192,
Celerity rules (recipes/family.py). TPP band by scaling.tpp=20|80|234 (default 20); on one
data-parallel replica (B rounds to the data-parallel size):
  TPP  20: D = 5.4B tokens, B = 178 x 8192, T = 3,713 steps, warmup 257, tau 0.175, 1.32e+19 FLOPs
  TPP  80: D = 21.7B tokens, B = 357 x 8192, T = 7,405 steps, warmup 128, tau 0.087, 5.29e+19 FLOPs
  TPP 234: D = 63.3B tokens, B = 610 x 8192, T = 12,676 steps, warmup 75, tau 0.051, 1.55e+20 FLOPs
FLOPs are the paper's convention (6 N D + full attention). Made for a TPU v5e-8 (8 chips),
bfloat16 compute, on your corpus and a 128,256-piece sentencepiece tokenizer:
  python -m celerity_jax.main recipe=celerity_300m scaling.tpp=234 \\
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout: FSDP over the slice, `dots` remat, one sequence per device per microbatch
(`python -m tools.aot recipe=celerity_300m --topology v5litepod-8` checks it; `--fit` ranks the
alternatives, README "Compiling for a TPU slice"); the step needs 9.3 GB of a chip's 17 GB (B = 176 on 8 chips, -1.4% from the law).
"""
from recipes.family import celerity

SLICE = "v5litepod-8"


def config():
  return celerity("celerity_300m", d_model=640, n_layers=13, d_head=64, tpp=20.0,
                  remat="dots", microbatch_rows=1)
