"""celerity_moe_nano_3: celerity_nano_3 with 8 routed experts, top-2 (recipes/family.py `moe`).

Every MLP becomes 8 experts of width 4 d_model (192) with a learned top-2 router and dropless
dispatch, so the active parameters equal celerity_nano_3's plus the router. Effective TPP
20 x 2 / 8 = 5, so tau = tau_opt(5) = 0.35. Load-balancing weight 0.1, not Switch's 0.01: below
the base width the router's readout multiplier d_base / d (4-16) makes routing sharp from the start,
and at 0.01 one expert took 44% of celerity_moe_nano_2's tokens (README "Mixture of experts").
Trains on 2 CPU cores:
  python -m celerity_jax.main recipe=celerity_moe_nano_3
"""
from recipes.family import moe, nano


def config():
  return moe(nano("celerity_moe_nano_3", d_model=48), experts=8, top_k=2, aux_loss=0.1)
