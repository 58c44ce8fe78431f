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

from celerity_jax.models.layers import Norm, alibi_bias, attention_mask, param, rope
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

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    d, f, std = cfg.d_model, cfg.d_ff, mult.hidden_init_std
    self.kind = cfg.mlp
    self.wi = param(rngs, (d, f), std, ("embed", "mlp"), "hidden")
    if self.kind == "swiglu":
      self.wg = param(rngs, (d, f), std, ("embed", "mlp"), "hidden")
    self.wo = param(rngs, (f, d), std, ("mlp", "embed"), "hidden")

  def __call__(self, x_BxLxD):
    dt = x_BxLxD.dtype
    h_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, self.wi[...].astype(dt))
    if self.kind == "swiglu":
      h_BxLxF = jax.nn.silu(jnp.einsum("BLD,DF->BLF", x_BxLxD, self.wg[...].astype(dt))) * h_BxLxF
    else:                                        # squared ReLU (Celerity)
      h_BxLxF = jnp.square(jax.nn.relu(h_BxLxF))
    return jnp.einsum("BLF,FD->BLD", h_BxLxF, self.wo[...].astype(dt))


class Block(nnx.Module):
  """x + m_L^-1 * Attn(LN(x)), then x + m_L^-1 * MLP(LN(x))."""

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    self.ln1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.attn = Attention(cfg, mult, rngs)
    self.ln2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.mlp = Mlp(cfg, mult, rngs)
    self.residual_scale = mult.residual_scale

  def __call__(self, x_BxLxD, mask, bias, constrain: Constrain):
    x_BxLxD = x_BxLxD + self.residual_scale * self.attn(self.ln1(x_BxLxD), mask, bias)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
    x_BxLxD = x_BxLxD + self.residual_scale * self.mlp(self.ln2(x_BxLxD))
    return constrain(x_BxLxD, ("batch", "length", "act_embed"))


class Decoder(nnx.Module):
  """Untied-embedding decoder; returns float32 logits BxLxV."""

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    self.cfg, self.mult = cfg, mult
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), mult.embed_init_std,
                       ("vocab", "embed"), "embed")

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, mult, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), mult.unembed_init_std,
                         ("embed", "vocab"), "unembed")

  def __call__(self, tokens_BxL, segment_ids_BxL=None, constrain: Constrain = no_constraint,
               residuals: bool = False):
    """Logits BxLxV; with `residuals`, also the residual stream after each block, stacked
    [layers, B, L, D] (for coordinate checks; decided at trace time, so training pays nothing)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.zeros_like(tokens_BxL)
    mask = attention_mask(segment_ids_BxL)
    bias = alibi_bias(cfg.n_heads, tokens_BxL.shape[1]) if cfg.position == "alibi" else None
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0) * self.mult.input_scale
    x_BxLxD = constrain(x_BxLxD.astype(dt), ("batch", "length", "act_embed"))

    graphdef, stacked = nnx.split(self.blocks)

    def layer(x, layer_state):
      x = nnx.merge(graphdef, layer_state)(x, mask, bias, constrain)
      return x, (x if residuals else None)

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      x_BxLxD, stream = jax.lax.scan(layer, x_BxLxD, stacked)
    else:
      outs = [None] * cfg.n_layers
      for i in range(cfg.n_layers):
        x_BxLxD, outs[i] = layer(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], stacked))
      stream = jnp.stack(outs) if residuals else None

    x_BxLxD = self.final_norm(x_BxLxD)
    logits_BxLxV = jnp.einsum("BLD,DV->BLV", x_BxLxD, self.unembed[...].astype(dt),
                              preferred_element_type=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV * self.mult.logit_scale, ("batch", "length", "act_vocab"))
    return (logits_BxLxV, stream) if residuals else logits_BxLxV
