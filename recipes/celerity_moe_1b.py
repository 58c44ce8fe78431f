"""celerity_moe_1b: celerity_1b with 16 routed experts, top-2 (recipes/family.py `moe`).

Shape: celerity_1b's (d_model 1152, 9 heads x 128, 26 layers, vocab 128,256, context 8192) with
every MLP replaced by 16 experts of width 4608 (= d_ff / 2) and a learned top-2 router: N = 4.85B
total, 986.2M active (celerity_1b's 985.6M plus the routers). At 20 TPP (per active parameter):
D = 19.7B tokens, B = 341 sequences (2.79M tokens), T = 7,061 steps, 134 warmup steps; effective
TPP 20 x 2 / 16 = 2.5, so tau = tau_opt(2.5) = 0.496 and lambda = 0.0793; 1.75e20 training FLOPs
(6 N_active D + full attention), as celerity_1b's. `python -m tools.plan recipe=celerity_moe_1b`
prints this row.

Made for a TPU v5p-64 (32 chips):
  python -m celerity_jax.main recipe=celerity_moe_1b \
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
Its layout: FSDP over the slice (the experts' weights too), `dots` remat, one sequence per device
per microbatch: the step needs 12.2 GB of a chip's 102 GB (B = 352, +3.3% from the law). The
layout search found no faster layout with expert parallelism (`mesh.expert=8` is an override away;
`python -m tools.aot recipe=celerity_moe_1b --topology v5p-64 --fit` ranks them).
"""
from recipes.family import celerity, moe

SLICE = "v5p-64"


def config():
  return moe(celerity("celerity_moe_1b", d_model=1152, n_layers=26, d_head=128, tpp=20.0,
                      remat="dots", microbatch_rows=1), experts=16, top_k=2)
