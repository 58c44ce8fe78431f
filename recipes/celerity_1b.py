"""celerity_1b: the ~1B member of the Celerity family (our shape; the paper has none at 1B).

Shape: d_model 1152, 9 heads x 128, 26 layers, d_ff 9216, vocab 128,256, context 8192 ->
N = 985.6M (the paper's 900M member widened by nothing and deepened from 23 to 26 layers, aspect
d_model / layers = 44 vs the family's 49-53). At 20 TPP: D = 19.7B tokens, B = 341 sequences
(2.79M tokens; rounded to a multiple of the data-parallel size, e.g. 344 on 8-way), T = 7,057 steps,
134 warmup steps, tau = 0.175, lambda = 0.225, 1.28e20 training FLOPs (6N + causal attention).

Made for a TPU v5p-64 (32 chips), bfloat16 compute, on your corpus and a 128,256-piece
sentencepiece tokenizer (the built-in stdlib corpus is far too small for this vocabulary):
  python -m celerity_jax.main recipe=celerity_1b \
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout is the one `python -m tools.aot recipe=celerity_1b --topology v5p-64 --fit` chose: FSDP
over the whole slice, `dots` remat, one sequence per device per microbatch (B = 352 on 32 chips,
+3.4% from the law, in 11 microbatches); the step then needs 14 GB of a chip's 102 GB. On another
slice, `python -m tools.aot recipe=celerity_1b --topology TYPE` says whether it fits.
`--print-config` works on any machine (nothing is allocated).
"""
from recipes.family import celerity

SLICE = "v5p-64"


def config():
  return celerity("celerity_1b", d_model=1152, n_layers=26, d_head=128, tpp=20.0, remat="dots",
                  microbatch_rows=1)
