"""The decoder (Flax NNX): embedding, stacked pre-LN blocks (dense, or routed experts every
model.moe_every layers), final norm and unembedding, with CompleteP multipliers.

Shape legend: B batch, L sequence, D d_model, N query heads, K kv heads, H head dim, F d_ff, V
vocab.
Layers are created stacked (leading axis = layer) and run under `lax.scan` (compile time flat in
depth) or unrolled, as the plan decides (execution.scan_layers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from celerity_jax.models.layers import Block, Forward, Norm, param
from celerity_jax.models.moe import MoeBlock, moe_summary
from celerity_jax.parametrization import Multipliers

REMAT_POLICIES = {
  "full": None,  # save nothing
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stacked_blocks(cfg, mult, rngs, count: int, kind: type[Block]):
  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return kind(cfg, mult, rngs)

  return make(rngs)


class Decoder(nnx.Module):
  """Untied-embedding decoder; returns float32 logits BxLxV.

  A mixture of experts (model.experts > 0) routes the MLP of the last layer in every group of
  model.moe_every layers: `blocks` holds the dense layers and `moe_blocks` the routed ones, each
  stacked, and the scan runs over groups of moe_every layers.
  """

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    self.cfg, self.mult = cfg, mult
    self.embed = param(
      rngs, (cfg.vocab_size, cfg.d_model), mult.embed_init_std, ("vocab", "embed"), "embed"
    )
    n_moe = cfg.n_layers // cfg.moe_every if cfg.experts else 0
    n_dense = cfg.n_layers - n_moe
    self.blocks = _stacked_blocks(cfg, mult, rngs, n_dense, Block) if n_dense else None
    self.moe_blocks = _stacked_blocks(cfg, mult, rngs, n_moe, MoeBlock) if n_moe else None
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.unembed = param(
      rngs, (cfg.d_model, cfg.vocab_size), mult.unembed_init_std, ("embed", "vocab"), "unembed"
    )

  def __call__(
    self, tokens_BxL, segment_ids_BxL=None, forward: Forward | None = None, residuals: bool = False
  ):
    """(logits BxLxV float32, aux). aux["moe"] holds a mixture of experts' statistics
    (moe.moe_summary); with `residuals`, aux["residuals"] is the residual stream after each group
    of layers, stacked [groups, B, L, D] (for coordinate checks; decided at trace time, so training
    pays nothing). `forward`: how it runs (the train step passes the run's plan and mesh); None
    plans for jax's default backend on one device."""
    cfg = self.cfg
    if forward is None:
      forward = Forward.planned(cfg, jax.default_backend())
    forward = dataclasses.replace(forward, tokens_BxL=tokens_BxL)
    constrain = forward.constrain
    x_BxLxD = constrain(self.embed_tokens(tokens_BxL), ("batch", "length", "act_embed"))

    groups, per_group = self.grouping()
    dense_def, dense = nnx.split(self.blocks) if self.blocks is not None else (None, None)
    moe_def, moe = nnx.split(self.moe_blocks) if self.moe_blocks is not None else (None, None)
    if dense is not None and per_group > 1:
      dense = jax.tree.map(lambda a: a.reshape(groups, per_group, *a.shape[1:]), dense)

    def group(x, states):
      dense_states, moe_state = states
      aux = {}
      for i in range(per_group if dense_states is not None else 0):
        layer = dense_states if per_group == 1 else jax.tree.map(lambda a, i=i: a[i], dense_states)
        x, _ = nnx.merge(dense_def, layer)(x, segment_ids_BxL, forward)
      if moe_state is not None:
        x, aux = nnx.merge(moe_def, moe_state)(x, segment_ids_BxL, forward)
      return x, ((x if residuals else None), aux)

    if cfg.remat != "none":
      group = jax.checkpoint(group, policy=REMAT_POLICIES[cfg.remat])
    if forward.scan_layers:
      x_BxLxD, (stream, moe_aux) = jax.lax.scan(group, x_BxLxD, (dense, moe))
    else:
      outs = [None] * groups
      for i in range(groups):
        x_BxLxD, outs[i] = group(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], (dense, moe)))
      stream, moe_aux = jax.tree.map(lambda *a: jnp.stack(a), *outs) if groups else (None, {})

    logits_BxLxV = constrain(self.logits(x_BxLxD), ("batch", "length", "act_vocab"))
    aux = {"residuals": stream} if residuals else {}
    if moe_aux:
      aux["moe"] = moe_summary(moe_aux)
    return logits_BxLxV, aux

  def grouping(self) -> tuple[int, int]:
    """(groups, dense layers per group): a dense model is n_layers groups of one dense layer; a
    mixture of experts, groups of moe_every layers whose last is routed."""
    cfg = self.cfg
    if self.moe_blocks is None:
      return cfg.n_layers, 1
    groups = cfg.n_layers // cfg.moe_every
    return groups, cfg.n_layers // groups - 1

  def embed_tokens(self, tokens_BxL):
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0) * self.mult.input_scale
    return x_BxLxD.astype(jnp.dtype(self.cfg.dtype))

  def logits(self, x_BxLxD):
    """Final norm, unembedding and the logit multiplier: float32 logits BxLxV."""
    logits_BxLxV = jnp.einsum(
      "BLD,DV->BLV",
      self.final_norm(x_BxLxD),
      self.unembed[...].astype(x_BxLxD.dtype),
      preferred_element_type=jnp.float32,
    )
    return logits_BxLxV * self.mult.logit_scale

  def layers(self) -> list[Block]:
    """The blocks one at a time in depth order (a routed MoeBlock last in each group of
    model.moe_every), sliced out of the stacks: for decoding, which runs them unrolled."""
    out, (groups, per_group) = [], self.grouping()
    dense = nnx.split(self.blocks) if self.blocks is not None else None
    moe = nnx.split(self.moe_blocks) if self.moe_blocks is not None else None
    for g in range(groups):
      for i in range(g * per_group, (g + 1) * per_group):
        out.append(nnx.merge(dense[0], jax.tree.map(lambda a, i=i: a[i], dense[1])))
      if moe is not None:
        out.append(nnx.merge(moe[0], jax.tree.map(lambda a, g=g: a[g], moe[1])))
    return out
