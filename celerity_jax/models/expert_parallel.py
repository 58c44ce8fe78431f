"""Expert parallelism: the MoE dispatch inside `jax.shard_map` over the whole mesh.

Tokens arrive sharded like activations (batch over data x fsdp x expert) and expert weights like
params (experts over `expert`, d_model over `fsdp`, expert width over `tensor`; sharding.RULES).
Each device all-gathers its experts' FSDP shards, dispatches its tokens to the expert shards and
back, and the tensor axis sums the partial outputs of its slices of the expert width, as the dense
MLP's tensor parallelism does.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from celerity_jax import sharding

_WEIGHT_AXES = {"wi": ("expert", "embed", "mlp"), "wg": ("expert", "embed", "mlp"),
                "wo": ("expert", "mlp", "embed")}
_EMBED_DIM = {"wi": 1, "wg": 1, "wo": 2}     # the d_model dimension, sharded over fsdp


def dispatch(local_dispatch, kind: str, mesh: Mesh, x_BxLxD, experts_BxLxK, gates_BxLxK, w: dict):
  """Runs `local_dispatch` (MoeMlp._dispatch) on every device; returns (output BxLxD, share of
  assignments kept), equal to the single-device dispatch."""
  act = sharding.logical_spec(("batch", "length", "act_embed"), "moe tokens")
  routes = sharding.logical_spec(("batch", "length", None), "moe routes")
  w_specs = {k: sharding.logical_spec(_WEIGHT_AXES[k], f"moe {k}") for k in w}
  batch_axes = sharding.RULES["batch"]

  def body(x, experts, gates, w):
    w = {k: jax.lax.all_gather(v, "fsdp", axis=_EMBED_DIM[k], tiled=True) for k, v in w.items()}
    if kind == "capacity":
      to_experts = lambda b: jax.lax.all_to_all(b, "expert", 0, 1, tiled=True)    # noqa: E731
      from_experts = lambda b: jax.lax.all_to_all(b, "expert", 1, 0, tiled=True)  # noqa: E731
      y, kept = local_dispatch(x, experts, gates, w, exchange=(to_experts, from_experts))
      kept = jax.lax.pmean(kept, batch_axes)
    else:   # per-expert counts are data-dependent: gather the expert group's tokens instead
      gather = lambda a: jax.lax.all_gather(a, "expert", axis=0, tiled=True)     # noqa: E731
      first = jax.lax.axis_index("expert") * w["wi"].shape[0]
      y, kept = local_dispatch(gather(x), gather(experts), gather(gates), w, first_expert=first)
      y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, "tensor"), kept

  return jax.shard_map(body, mesh=mesh, in_specs=(act, routes, routes, w_specs),
                       out_specs=(act, P()))(x_BxLxD, experts_BxLxK, gates_BxLxK, w)
