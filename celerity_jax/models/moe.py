"""Mixture-of-experts MLP (Flax NNX): routers, dropless and capacity dispatch, expert parallelism.

Shape legend: as dense.py, plus T tokens, E experts (El of them local to one expert shard), K
experts
per token (top_k), G sequences, S tokens per sequence, C capacity per expert and sequence.

- Routers: learned softmax top-k (gates renormalized over the k picks when k > 1; the raw
  probability when k = 1, as Switch, since a renormalized single gate is 1 and the router would get
  no gradient), with the Switch load-balancing loss and the ST-MoE router z-loss; or a fixed hash of
  the token id (top-1, no auxiliary loss), as Celerity's MoE experiment.
- Dispatch: `dropless` sorts the token-expert assignments by expert and runs grouped matmuls
  (`jax.lax.ragged_dot`); `capacity` gives every expert C = ceil(capacity_factor * S * K / E) slots
  per sequence, filled in order (all first choices, then second choices, each in token order), and
  drops the rest. Capacity is per sequence so results do not depend on the mesh or microbatching.
- Expert parallelism (`mesh.expert` > 1): experts are sharded over the `expert` mesh axis inside
  `jax.shard_map`. Capacity dispatch exchanges fixed-size slot buffers with two all-to-alls;
  dropless dispatch, whose per-expert counts are data-dependent, all-gathers the shard group's
  tokens, runs the local experts on theirs and reduce-scatters the outputs. Both equal the
  single-device result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from celerity_jax.models.layers import Block, Forward, Mlp, mlp_activation, param
from celerity_jax.parametrization import Multipliers

# ---------------------------------------------------------------- routing


def route_topk(logits_TxE: jax.Array, k: int):
  """(experts TxK int32, gates TxK float32, aux) from float32 router logits.

  aux: `balance` = E * sum_e f_e * P_e (f_e: share of the T*K assignments to e, P_e: mean router
  probability of e; 1.0 when perfectly balanced) and `router_z` = mean logsumexp(logits)^2.
  """
  n_experts = logits_TxE.shape[-1]
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  gates_TxK, experts_TxK = jax.lax.top_k(probs_TxE, k)
  if k > 1:
    gates_TxK = gates_TxK / gates_TxK.sum(-1, keepdims=True)
  share_E = expert_load(experts_TxK, n_experts)
  balance = n_experts * jnp.sum(share_E * probs_TxE.mean(0))
  router_z = jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)).mean()
  return experts_TxK.astype(jnp.int32), gates_TxK, {"balance": balance, "router_z": router_z}


def hash_table(vocab_size: int, n_experts: int) -> np.ndarray:
  """Token id -> expert: a fixed random permutation of the vocabulary, modulo E, so every expert
  owns floor(V / E) or ceil(V / E) token ids (Roller et al. 2021's random hash)."""
  return (np.random.default_rng(0).permutation(vocab_size) % n_experts).astype(np.int32)


def expert_load(experts_TxK: jax.Array, n_experts: int) -> jax.Array:
  """Fraction of the token-expert assignments routed to each expert, shape E (sums to 1)."""
  counts = jnp.bincount(experts_TxK.reshape(-1), length=n_experts)
  return counts.astype(jnp.float32) / experts_TxK.size


# ---------------------------------------------------------------- expert computation


def _ragged_mlp(xs_RxD, w: dict, sizes_El, kind: str):
  """Grouped expert MLP over rows sorted by expert; rows past sum(sizes) come out zero."""
  h = jax.lax.ragged_dot(xs_RxD, w["wi"], sizes_El)
  gate = jax.lax.ragged_dot(xs_RxD, w["wg"], sizes_El) if kind == "swiglu" else None
  return jax.lax.ragged_dot(mlp_activation(h, gate, kind), w["wo"], sizes_El)


def _batched_mlp(x_ExXxD, w: dict, kind: str):
  """Expert MLP on fixed-size per-expert buffers."""
  h = jnp.einsum("EXD,EDF->EXF", x_ExXxD, w["wi"])
  gate = jnp.einsum("EXD,EDF->EXF", x_ExXxD, w["wg"]) if kind == "swiglu" else None
  return jnp.einsum("EXF,EFD->EXD", mlp_activation(h, gate, kind), w["wo"])


def dropless(x_TxD, experts_TxK, gates_TxK, w: dict, kind: str, first_expert=0):
  """Every assignment to one of this shard's experts [first_expert, first_expert + El) is computed
  (no token is dropped) and gate-weighted into its token's output; other assignments give 0."""
  n_tokens, k = experts_TxK.shape
  n_local = w["wi"].shape[0]
  local_TxK = experts_TxK - first_expert
  mine_TxK = (local_TxK >= 0) & (local_TxK < n_local)
  key_R = jnp.where(mine_TxK, local_TxK, n_local).reshape(-1)  # others sort last
  order_R = jnp.argsort(key_R, stable=True)
  sizes_El = jnp.bincount(key_R, length=n_local + 1)[:n_local].astype(jnp.int32)
  token_R = order_R // k
  y_RxD = _ragged_mlp(x_TxD[token_R], w, sizes_El, kind)
  weight_R = jnp.where(mine_TxK, gates_TxK, 0.0).reshape(-1)[order_R]
  y_RxD = y_RxD * weight_R[:, None].astype(y_RxD.dtype)
  return jnp.zeros_like(x_TxD).at[token_R].add(y_RxD)


def capacity_slots(experts_GxSxK, n_experts: int, capacity: int):
  """Slot of each assignment in its expert's per-sequence buffer, choice-major order (G x K*S), and
  whether it fits (slot < capacity)."""
  g, s, k = experts_GxSxK.shape
  e_GxKS = experts_GxSxK.swapaxes(1, 2).reshape(g, k * s)
  onehot = jax.nn.one_hot(e_GxKS, n_experts, dtype=jnp.int32)
  slot_GxKS = (jnp.cumsum(onehot, axis=1) * onehot).sum(-1) - 1
  return e_GxKS, slot_GxKS, slot_GxKS < capacity


def capacity_dispatch(
  x_GxSxD,
  experts_GxSxK,
  gates_GxSxK,
  w: dict,
  kind: str,
  capacity: int,
  n_experts: int,
  exchange=None,
):
  """Fills E x C slots per sequence, runs the experts on the slot buffers and combines; assignments
  past an expert's capacity are dropped (their token gets nothing from that expert).

  `exchange` = (to_experts, from_experts) moves the G x E x C x D buffers to the expert shards and
  back (identity on one device). Returns (output G x S x D, fraction of assignments kept).
  """
  g, s, k = experts_GxSxK.shape
  d = x_GxSxD.shape[-1]
  e_GxKS, slot_GxKS, kept_GxKS = capacity_slots(experts_GxSxK, n_experts, capacity)
  flat_GxKS = jnp.where(kept_GxKS, e_GxKS * capacity + slot_GxKS, n_experts * capacity)
  rows_G1 = jnp.arange(g)[:, None]
  token_KS = jnp.tile(jnp.arange(s), k)
  buf = jnp.zeros((g, n_experts * capacity + 1, d), x_GxSxD.dtype)  # last slot: discarded
  buf = buf.at[rows_G1, flat_GxKS].set(x_GxSxD[:, token_KS])
  buf_GxExCxD = buf[:, :-1].reshape(g, n_experts, capacity, d)
  to_experts, from_experts = exchange or (lambda b: b, lambda b: b)
  slots_ExXxCxD = to_experts(buf_GxExCxD.swapaxes(0, 1))
  e_local, x_groups = slots_ExXxCxD.shape[:2]
  y = _batched_mlp(slots_ExXxCxD.reshape(e_local, x_groups * capacity, d), w, kind)
  y_GxExCxD = from_experts(y.reshape(slots_ExXxCxD.shape)).swapaxes(0, 1)
  y_flat = jnp.concatenate(
    [y_GxExCxD.reshape(g, n_experts * capacity, d), jnp.zeros((g, 1, d), y.dtype)], axis=1
  )
  weight_GxKS = jnp.where(kept_GxKS, gates_GxSxK.swapaxes(1, 2).reshape(g, k * s), 0.0)
  y_GxKSxD = y_flat[rows_G1, flat_GxKS] * weight_GxKS[..., None].astype(y.dtype)
  return y_GxKSxD.reshape(g, k, s, d).sum(1), kept_GxKS.mean()


def capacity(cfg, seq_len: int) -> int:
  """Slots per expert and sequence; an expert never gets more than S assignments per sequence."""
  return min(seq_len, max(1, math.ceil(cfg.capacity_factor * seq_len * cfg.top_k / cfg.experts)))


def moe_summary(aux: dict) -> dict:
  """Per-MoE-layer statistics [layers, ...] -> what the loss and metrics use: the mean balance and
  router z-losses, mean dropped share, mean per-expert load and the largest load x E (1 = even)."""
  out = {k: aux[k].mean() for k in ("balance", "router_z", "dropped") if k in aux}
  out["load"] = aux["load"].mean(0)
  out["load_max"] = aux["load"].max() * aux["load"].shape[-1]
  return out


# ---------------------------------------------------------------- the layer


class MoeMlp(nnx.Module):
  """Routed experts (+ an optional shared expert) in place of the dense MLP. Returns (y, aux):
  aux holds `load` (share of assignments per expert), `dropped` (share of assignments dropped) and,
  for the learned router, `balance` and `router_z` (see route_topk)."""

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    e, d, f, std = cfg.experts, cfg.d_model, cfg.expert_d_ff or cfg.d_ff, mult.hidden_init_std
    self.cfg = cfg
    if cfg.router == "topk":
      self.router = param(rngs, (d, e), mult.embed_init_std, ("embed", "router"), "router")
      self.router_scale = mult.router_scale
    self.wi = param(rngs, (e, d, f), std, ("expert", "embed", "mlp"), "hidden")
    if cfg.mlp == "swiglu":
      self.wg = param(rngs, (e, d, f), std, ("expert", "embed", "mlp"), "hidden")
    self.wo = param(rngs, (e, f, d), std, ("expert", "mlp", "embed"), "hidden")
    self.shared = Mlp(cfg, mult, rngs, d_ff=f) if cfg.shared_expert else None

  def __call__(self, x_BxLxD, forward: Forward):
    """(output, statistics). Runs expert-parallel on forward.mesh (None: on one device); the hash
    router routes by forward.tokens_BxL."""
    cfg, dt, tokens_BxL = self.cfg, x_BxLxD.dtype, forward.tokens_BxL
    b, length, d = x_BxLxD.shape
    if cfg.router == "topk":
      logits_BxLxE = (
        jnp.einsum("BLD,DE->BLE", x_BxLxD.astype(jnp.float32), self.router[...]) * self.router_scale
      )
      experts, gates, aux = route_topk(logits_BxLxE.reshape(b * length, -1), cfg.top_k)
    else:
      experts = jnp.asarray(hash_table(cfg.vocab_size, cfg.experts))[tokens_BxL.reshape(-1, 1)]
      gates, aux = jnp.ones(experts.shape, jnp.float32), {}
    aux["load"] = expert_load(experts, cfg.experts)
    experts_BxLxK = experts.reshape(b, length, cfg.top_k)
    gates_BxLxK = gates.reshape(b, length, cfg.top_k)
    weights = {name: getattr(self, name) for name in ("wi", "wg", "wo") if hasattr(self, name)}
    w = {name: v[...].astype(dt) for name, v in weights.items()}
    if forward.mesh is None:
      y_BxLxD, kept = self._dispatch(x_BxLxD, experts_BxLxK, gates_BxLxK, w)
    else:
      from celerity_jax.models import expert_parallel

      axes = {name: tuple(v.get_metadata()["axes"]) for name, v in weights.items()}
      y_BxLxD, kept = expert_parallel.dispatch(
        self._dispatch, cfg.dispatch, forward.mesh, x_BxLxD, experts_BxLxK, gates_BxLxK, w, axes
      )
    aux["dropped"] = 1.0 - kept
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    return y_BxLxD, aux

  def _dispatch(self, x_BxLxD, experts_BxLxK, gates_BxLxK, w, first_expert=0, exchange=None):
    """Device-local dispatch: (output BxLxD, share of assignments kept)."""
    cfg = self.cfg
    b, length, d = x_BxLxD.shape
    if cfg.dispatch == "capacity":
      return capacity_dispatch(
        x_BxLxD,
        experts_BxLxK,
        gates_BxLxK,
        w,
        cfg.mlp,
        capacity(cfg, length),
        cfg.experts,
        exchange,
      )
    y = dropless(
      x_BxLxD.reshape(b * length, d),
      experts_BxLxK.reshape(b * length, -1),
      gates_BxLxK.reshape(b * length, -1),
      w,
      cfg.mlp,
      first_expert,
    )
    return y.reshape(b, length, d), jnp.ones((), jnp.float32)


class MoeBlock(Block):
  """A pre-LN block whose MLP is routed experts; its aux is the MoE layer's statistics."""

  def make_mlp(self, cfg, mult, rngs):
    return MoeMlp(cfg, mult, rngs)

  def mlp_branch(self, x_BxLxD, forward: Forward):
    return self.mlp(x_BxLxD, forward)
