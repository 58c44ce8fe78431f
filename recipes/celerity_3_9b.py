"""celerity_3_9b: the Celerity 3.9B member, N = 3,881.1M (paper: 3.88B).

Shape: d_model 2048, 16 heads x 128, 40 layers, d_ff 16384, vocab 128,256, context 8192,
Celerity rules (recipes/family.py). TPP band by scaling.tpp=20|80|234 (default 20); on one
data-parallel replica (B rounds to the data-parallel size):
  TPP  20: D = 77.6B tokens, B = 676 x 8192, T = 14,017 steps, warmup 68, tau 0.175, 2.43e+21 FLOPs
  TPP  80: D = 310.5B tokens, B = 1352 x 8192, T = 28,034 steps, warmup 34, tau 0.087, 9.73e+21 FLOPs
  TPP 234: D = 908.2B tokens, B = 2312 x 8192, T = 47,951 steps, warmup 20, tau 0.051, 2.85e+22 FLOPs
FLOPs are the paper's convention (6 N D + full attention). Made for a TPU v5p-64 (32 chips),
bfloat16 compute, on your corpus and a 128,256-piece sentencepiece tokenizer:
  python -m celerity_jax.main recipe=celerity_3_9b scaling.tpp=234 \\
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout is the one `python -m tools.aot recipe=celerity_3_9b mesh.tensor=1 --topology v5p-64
--fit` chose at 20 TPP: FSDP over the whole slice, `dots` remat, one sequence per device per
microbatch (B = 672 on 32 chips, -0.6% from the law, in 21 microbatches); the step then needs
30 GB of a chip's 102 GB. Without `mesh.tensor=1` the search finds 4-way tensor parallelism with
no remat and 84 microbatches 5% faster at the roofline bound, but at 90 GB per chip, with 20x the
bytes between chips, and only on slices a multiple of 4; pure FSDP runs on any slice and prints
its config on any machine. Other TPP bands and slices: `python -m tools.aot recipe=celerity_3_9b
scaling.tpp=234 --topology TYPE` says whether it fits.
"""
from recipes.family import celerity

SLICE = "v5p-64"


def config():
  return celerity("celerity_3_9b", d_model=2048, n_layers=40, d_head=128, tpp=20.0, remat="dots",
                  microbatch_rows=1)
