"""Dense pre-LN decoder (Flax NNX) with CompleteP multipliers.

Shape legend: B batch, L sequence, D d_model, N query heads, K kv heads, H head dim, F d_ff, V vocab.
Layers are created stacked (leading axis = layer) and run under `lax.scan`, so compile time does not
grow with depth; `model.scan_layers=false` unrolls them instead.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from celerity_jax.models.layers import (Norm, alibi_bias, attention_mask, mlp_activation, param,
                                       rope)
from celerity_jax.models.moe import MoeMlp, moe_summary
from celerity_jax.parametrization import Multipliers

Constrain = Callable[[jax.Array, tuple], jax.Array]


def no_constraint(x: jax.Array, axes: tuple) -> jax.Array:
  del axes
  return x


REMAT_POLICIES = {
    "full": None,                                                   # save nothing
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    d, n, h, kv = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_kv_heads or cfg.n_heads
    std = mult.hidden_init_std
    self.wq = param(rngs, (d, n, h), std, ("embed", "heads", "head_dim"), "hidden")
    self.wk = param(rngs, (d, kv, h), std, ("embed", "kv_heads", "head_dim"), "hidden")
    self.wv = param(rngs, (d, kv, h), std, ("embed", "kv_heads", "head_dim"), "hidden")
    self.wo = param(rngs, (n, h, d), std, ("heads", "head_dim", "embed"), "hidden")
    self.scale, self.position, self.rope_theta = mult.attn_scale, cfg.position, cfg.rope_theta

  def __call__(self, x_BxLxD, mask_Bx1xLxL, bias_1xNxLxL):
    dt = x_BxLxD.dtype
    q_BxLxNxH = jnp.einsum("BLD,DNH->BLNH", x_BxLxD, self.wq[...].astype(dt))
    k_BxLxKxH = jnp.einsum("BLD,DKH->BLKH", x_BxLxD, self.wk[...].astype(dt))
    v_BxLxKxH = jnp.einsum("BLD,DKH->BLKH", x_BxLxD, self.wv[...].astype(dt))
    if self.position == "rope":
      q_BxLxNxH, k_BxLxKxH = rope(q_BxLxNxH, self.rope_theta), rope(k_BxLxKxH, self.rope_theta)
    bias = None if bias_1xNxLxL is None else bias_1xNxLxL.astype(dt)
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias=bias, mask=mask_Bx1xLxL, scale=self.scale)
    return jnp.einsum("BLNH,NHD->BLD", out_BxLxNxH, self.wo[...].astype(dt))


class Mlp(nnx.Module):

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs, d_ff: int = 0):
    d, f, std = cfg.d_model, d_ff or cfg.d_ff, mult.hidden_init_std
    self.kind = cfg.mlp
    self.wi = param(rngs, (d, f), std, ("embed", "mlp"), "hidden")
    if self.kind == "swiglu":
      self.wg = param(rngs, (d, f), std, ("embed", "mlp"), "hidden")
    self.wo = param(rngs, (f, d), std, ("mlp", "embed"), "hidden")

  def __call__(self, x_BxLxD):
    dt = x_BxLxD.dtype
    h_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, self.wi[...].astype(dt))
    gate_BxLxF = (jnp.einsum("BLD,DF->BLF", x_BxLxD, self.wg[...].astype(dt))
                  if self.kind == "swiglu" else None)
    h_BxLxF = mlp_activation(h_BxLxF, gate_BxLxF, self.kind)
    return jnp.einsum("BLF,FD->BLD", h_BxLxF, self.wo[...].astype(dt))


class Block(nnx.Module):
  """x + m_L^-1 * Attn(LN(x)), then x + m_L^-1 * MLP(LN(x)); with `moe`, the MLP is routed.
  Returns (x, aux): the MoE layer's statistics (models/moe.py), {} for a dense block."""

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs, moe: bool = False):
    self.ln1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.attn = Attention(cfg, mult, rngs)
    self.ln2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.mlp = MoeMlp(cfg, mult, rngs) if moe else Mlp(cfg, mult, rngs)
    self.moe = moe
    self.residual_scale = mult.residual_scale

  def __call__(self, x_BxLxD, mask, bias, constrain: Constrain, tokens_BxL, mesh):
    x_BxLxD = x_BxLxD + self.residual_scale * self.attn(self.ln1(x_BxLxD), mask, bias)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
    aux = {}
    if self.moe:
      y_BxLxD, aux = self.mlp(self.ln2(x_BxLxD), tokens_BxL, mesh)
    else:
      y_BxLxD = self.mlp(self.ln2(x_BxLxD))
    x_BxLxD = x_BxLxD + self.residual_scale * y_BxLxD
    return constrain(x_BxLxD, ("batch", "length", "act_embed")), aux


def _stacked_blocks(cfg, mult, rngs, count: int, moe: bool):
  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Block(cfg, mult, rngs, moe)
  return make(rngs)


class Decoder(nnx.Module):
  """Untied-embedding decoder; returns float32 logits BxLxV.

  A mixture of experts (model.experts > 0) routes the MLP of the last layer in every group of
  model.moe_every layers: `blocks` holds the dense layers and `moe_blocks` the routed ones, each
  stacked, and the scan runs over groups of moe_every layers.
  """

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    self.cfg, self.mult = cfg, mult
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), mult.embed_init_std,
                       ("vocab", "embed"), "embed")
    n_moe = cfg.n_layers // cfg.moe_every if cfg.experts else 0
    n_dense = cfg.n_layers - n_moe
    self.blocks = _stacked_blocks(cfg, mult, rngs, n_dense, moe=False) if n_dense else None
    self.moe_blocks = _stacked_blocks(cfg, mult, rngs, n_moe, moe=True) if n_moe else None
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), mult.unembed_init_std,
                         ("embed", "vocab"), "unembed")

  def __call__(self, tokens_BxL, segment_ids_BxL=None, constrain: Constrain = no_constraint,
               mesh=None, residuals: bool = False, with_aux: bool = False):
    """Logits BxLxV; with `residuals` or `with_aux`, (logits, aux) where aux["residuals"] is the
    residual stream after each group of layers, stacked [groups, B, L, D] (for coordinate checks;
    decided at trace time, so training pays nothing) and aux["moe"] the MoE statistics
    (moe.moe_summary). `mesh` runs the experts expert-parallel on it (models/expert_parallel.py)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.zeros_like(tokens_BxL)
    mask = attention_mask(segment_ids_BxL)
    bias = alibi_bias(cfg.n_heads, tokens_BxL.shape[1]) if cfg.position == "alibi" else None
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0) * self.mult.input_scale
    x_BxLxD = constrain(x_BxLxD.astype(dt), ("batch", "length", "act_embed"))

    groups = cfg.n_layers // cfg.moe_every if self.moe_blocks is not None else cfg.n_layers
    per_group = cfg.n_layers // groups - (self.moe_blocks is not None)   # dense layers per group
    dense_def, dense = nnx.split(self.blocks) if self.blocks is not None else (None, None)
    moe_def, moe = nnx.split(self.moe_blocks) if self.moe_blocks is not None else (None, None)
    if dense is not None and per_group > 1:
      dense = jax.tree.map(lambda a: a.reshape(groups, per_group, *a.shape[1:]), dense)

    def group(x, states):
      dense_states, moe_state = states
      aux = {}
      for i in range(per_group if dense_states is not None else 0):
        layer = dense_states if per_group == 1 else jax.tree.map(lambda a, i=i: a[i], dense_states)
        x, _ = nnx.merge(dense_def, layer)(x, mask, bias, constrain, tokens_BxL, mesh)
      if moe_state is not None:
        x, aux = nnx.merge(moe_def, moe_state)(x, mask, bias, constrain, tokens_BxL, mesh)
      return x, ((x if residuals else None), aux)

    if cfg.remat != "none":
      group = jax.checkpoint(group, policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      x_BxLxD, (stream, moe_aux) = jax.lax.scan(group, x_BxLxD, (dense, moe))
    else:
      outs = [None] * groups
      for i in range(groups):
        x_BxLxD, outs[i] = group(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], (dense, moe)))
      stream, moe_aux = jax.tree.map(lambda *a: jnp.stack(a), *outs) if groups else (None, {})

    x_BxLxD = self.final_norm(x_BxLxD)
    logits_BxLxV = jnp.einsum("BLD,DV->BLV", x_BxLxD, self.unembed[...].astype(dt),
                              preferred_element_type=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV * self.mult.logit_scale, ("batch", "length", "act_vocab"))
    if not (residuals or with_aux):
      return logits_BxLxV
    aux = {"residuals": stream} if residuals else {}
    if moe_aux:
      aux["moe"] = moe_summary(moe_aux)
    return logits_BxLxV, aux
