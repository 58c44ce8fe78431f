"""Expert parallelism: the MoE dispatch inside `jax.shard_map` over the whole mesh.

Tokens arrive sharded like activations (batch over data x fsdp x expert) and expert weights like
params (experts over `expert`, d_model over `fsdp`, expert width over `tensor`; sharding.RULES).
Each device all-gathers its experts' FSDP shards, dispatches its tokens to the expert shards and
back, and the tensor axis sums the partial outputs of its slices of the expert width, as the dense
MLP's tensor parallelism does.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from celerity_jax import sharding


def dispatch(
  local_dispatch, kind: str, mesh: Mesh, x_BxLxD, experts_BxLxK, gates_BxLxK, w: dict, w_axes: dict
):
  """Runs `local_dispatch` (MoeMlp._dispatch) on every device; returns (output BxLxD, share of
  assignments kept), equal to the single-device dispatch. `w_axes` are the expert weights'
  logical axes (their parameter metadata): they place the weights and name the d_model dimension
  that FSDP shards."""
  act = sharding.logical_spec(("batch", "length", "act_embed"), "moe tokens")
  routes = sharding.logical_spec(("batch", "length", None), "moe routes")
  w_specs = {k: sharding.logical_spec(w_axes[k], f"moe {k}") for k in w}
  embed_dim = {k: w_axes[k].index("embed") for k in w}
  # the mesh axes the weights' logical axes map to: d_model (FSDP), experts, expert width
  fsdp, expert, width = (sharding.RULES[a] for a in ("embed", "expert", "mlp"))
  batch_axes = sharding.RULES["batch"]

  def body(x, experts, gates, w):
    w = {k: jax.lax.all_gather(v, fsdp, axis=embed_dim[k], tiled=True) for k, v in w.items()}
    if kind == "capacity":

      def to_experts(b):
        return jax.lax.all_to_all(b, expert, 0, 1, tiled=True)

      def from_experts(b):
        return jax.lax.all_to_all(b, expert, 1, 0, tiled=True)

      y, kept = local_dispatch(x, experts, gates, w, exchange=(to_experts, from_experts))
      kept = jax.lax.pmean(kept, batch_axes)
    else:  # per-expert counts are data-dependent: gather the expert group's tokens instead

      def gather(a):
        return jax.lax.all_gather(a, expert, axis=0, tiled=True)

      first = jax.lax.axis_index(expert) * w["wi"].shape[0]
      y, kept = local_dispatch(gather(x), gather(experts), gather(gates), w, first_expert=first)
      y = jax.lax.psum_scatter(y, expert, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, width), kept

  return jax.shard_map(
    body, mesh=mesh, in_specs=(act, routes, routes, w_specs), out_specs=(act, P())
  )(x_BxLxD, experts_BxLxK, gates_BxLxK, w)
