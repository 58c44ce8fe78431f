"""celerity_moe_1b: celerity_1b with 16 routed experts, top-2 (recipes/family.py `moe`).

Shape: celerity_1b's (d_model 1152, 9 heads x 128, 26 layers, vocab 128,256, context 8192) with
every MLP replaced by 16 experts of width 4608 (= d_ff / 2) and a learned top-2 router: N = 4.85B
total, 986.2M active (celerity_1b's 985.6M plus the routers). At 20 TPP (per active parameter):
D = 19.7B tokens, B = 341 sequences (2.79M tokens), T = 7,061 steps, 134 warmup steps; effective
TPP 20 x 2 / 16 = 2.5, so tau = tau_opt(2.5) = 0.496 and lambda = 0.0793; 1.75e20 training FLOPs
(6 N_active D + full attention), as celerity_1b's. `python -m tools.plan recipe=celerity_moe_1b`
prints this row.

Meant for a TPU v5p-64 / 16x H100 class slice with the experts sharded over the `expert` axis:
  python -m celerity_jax.main recipe=celerity_moe_1b mesh.expert=8 mesh.fsdp=-1 mesh.data=1 \
      data.paths=/data/corpus/ data.tokenizer=/data/tokenizer.model
"""
from recipes.family import celerity, moe


def config():
  return moe(celerity("celerity_moe_1b", d_model=1152, n_layers=26, d_head=128, tpp=20.0),
             experts=16, top_k=2)
