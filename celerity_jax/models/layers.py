"""Building blocks shared by the decoders: parameters with logical axes, norms, positions,
attention, the dense MLP and the pre-LN block.

Shape legend: B batch, L sequence, D d_model, N query heads, K kv heads, H head dim, F d_ff, V
vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from celerity_jax import execution
from celerity_jax.models import attention
from celerity_jax.parametrization import Multipliers

Constrain = Callable[[jax.Array, tuple], jax.Array]  # (activation, logical axes) -> activation


def no_constraint(x: jax.Array, axes: tuple) -> jax.Array:
  del axes
  return x


@dataclasses.dataclass(frozen=True)
class Forward:
  """How a forward pass runs, never what it computes: the plan's choices (resolve.Resolved: the
  attention path, scanned layers), where (the mesh, whose sharding `constrain` applies to
  activations; None: one device) and the input tokens (a hash router routes by them)."""

  attention: str = "reference"  # reference | blockwise | pallas | cudnn | triton
  attention_block: int = 512
  scan_layers: bool = False
  constrain: Constrain = no_constraint
  mesh: Any = None
  tokens_BxL: Any = None

  @classmethod
  def planned(cls, model, platform: str, **where) -> Forward:
    """The plan's choices for a ModelConfig on `platform` (what resolve records for a run)."""
    path = execution.attention_path(
      model.attention, model.seq_len, model.attention_block, platform, model.dtype
    )
    return cls(path, model.attention_block, execution.scan_layers(model), **where)


def param(
  rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...], group: str
) -> nnx.Param:
  """A float32 parameter drawn from N(0, std^2); `axes` name its logical (sharding) axes and
  `group` its optimizer group (see parametrization.GROUPS)."""
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, axes=axes, group=group)


def map_variables(state: nnx.State, fn) -> dict:
  """Pure-dict tree of fn(variable) over an nnx.State, e.g. its metadata (axes, group)."""
  return nnx.to_pure_dict(jax.tree.map(fn, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class Norm(nnx.Module):
  """LayerNorm (gain and bias) or RMSNorm (gain), computed in float32."""

  def __init__(self, dim: int, kind: str, eps: float):
    self.kind, self.eps = kind, eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",), group="norm")
    if kind == "layernorm":
      self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("norm",), group="norm")

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
    x = x * self.scale[...]
    if self.kind == "layernorm":
      x = x + self.bias[...]
    return x.astype(x_BxLxD.dtype)


def mlp_activation(h: jax.Array, gate: jax.Array | None, kind: str) -> jax.Array:
  """The MLP nonlinearity on the up-projection h: squared ReLU (Celerity) or SwiGLU
  (silu(gate) * h), shared by the dense MLP and the experts."""
  if kind == "swiglu":
    return jax.nn.silu(gate) * h
  return jnp.square(jax.nn.relu(h))


def rope_frequencies(h: int, theta: float, scaling: tuple | None = None) -> jax.Array:
  """The h/2 rotation frequencies theta^(-2i/h); with `scaling` = (factor, low_freq_factor,
  high_freq_factor, original context), Llama 3's: wavelengths beyond the original context / low
  are slowed by the factor, those below context / high kept, those between interpolated."""
  freqs = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
  if not scaling:
    return freqs
  factor, low, high, context = scaling
  wavelength = 2 * jnp.pi / freqs
  slowed = jnp.where(wavelength > context / low, freqs / factor, freqs)
  smooth = (context / wavelength - low) / (high - low)
  between = (1 - smooth) * slowed / factor + smooth * slowed
  middle = (wavelength >= context / high) & (wavelength <= context / low)
  return jnp.where(middle, between, slowed)


def rope(
  x_BxLxNxH: jax.Array,
  theta: float,
  positions_L: jax.Array | None = None,
  dims: int = 0,
  scaling: tuple | None = None,
) -> jax.Array:
  """Rotary position embedding (rotate-half convention) on the first `dims` dimensions of the
  last axis (0: all; Nemotron rotates half), at `positions_L` (default 0..L-1; a cached decode
  step passes its absolute positions), with Llama 3's frequency `scaling` if given."""
  length, h = x_BxLxNxH.shape[1], dims or x_BxLxNxH.shape[-1]
  if positions_L is None:
    positions_L = jnp.arange(length)
  freqs = rope_frequencies(h, theta, scaling)
  angles_LxH2 = positions_L.astype(jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles_LxH2)[None, :, None, :]
  sin = jnp.sin(angles_LxH2)[None, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2, passed = x[..., : h // 2], x[..., h // 2 : h], x[..., h:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, passed], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def rope_scaling_of(cfg) -> tuple | None:
  """A ModelConfig's Llama 3 RoPE scaling as rope() takes it, or None."""
  if not cfg.rope_factor:
    return None
  return (
    cfg.rope_factor,
    cfg.rope_low_freq_factor,
    cfg.rope_high_freq_factor,
    cfg.rope_original_context,
  )


class Attention(nnx.Module):
  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    d, n, h, kv = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_kv_heads or cfg.n_heads
    std = mult.hidden_init_std
    self.wq = param(rngs, (d, n, h), std, ("embed", "heads", "head_dim"), "hidden")
    self.wk = param(rngs, (d, kv, h), std, ("embed", "kv_heads", "head_dim"), "hidden")
    self.wv = param(rngs, (d, kv, h), std, ("embed", "kv_heads", "head_dim"), "hidden")
    self.wo = param(rngs, (n, h, d), std, ("heads", "head_dim", "embed"), "hidden")
    self.scale, self.position, self.rope_theta = mult.attn_scale, cfg.position, cfg.rope_theta
    self.rotary_dims = int(h * cfg.rope_fraction)
    self.rope_scaling = rope_scaling_of(cfg)

  def project(self, x_BxLxD, positions_L=None):
    """(q BxLxNxH, k BxLxKxH, v BxLxKxH), rotated at `positions_L` under RoPE."""
    dt = x_BxLxD.dtype
    q_BxLxNxH = jnp.einsum("BLD,DNH->BLNH", x_BxLxD, self.wq[...].astype(dt))
    k_BxLxKxH = jnp.einsum("BLD,DKH->BLKH", x_BxLxD, self.wk[...].astype(dt))
    v_BxLxKxH = jnp.einsum("BLD,DKH->BLKH", x_BxLxD, self.wv[...].astype(dt))
    if self.position == "rope":
      where = (positions_L, self.rotary_dims, self.rope_scaling)
      q_BxLxNxH = rope(q_BxLxNxH, self.rope_theta, *where)
      k_BxLxKxH = rope(k_BxLxKxH, self.rope_theta, *where)
    return q_BxLxNxH, k_BxLxKxH, v_BxLxKxH

  def attend(self, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask, bias):
    """softmax(q.k * scale + bias) v over S cached keys, with the mask and bias given (decoding),
    projected back to d_model."""
    bias = None if bias is None else bias.astype(q_BxLxNxH.dtype)
    out_BxLxNxH = jax.nn.dot_product_attention(
      q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias, mask=mask, scale=self.scale
    )
    return self.output(out_BxLxNxH)

  def output(self, out_BxLxNxH):
    return jnp.einsum("BLNH,NHD->BLD", out_BxLxNxH, self.wo[...].astype(out_BxLxNxH.dtype))

  def __call__(self, x_BxLxD, segment_ids_BxL, forward: Forward):
    """Causal self-attention over packed documents (training and full forward passes), by the
    path the plan chose."""
    args = (*self.project(x_BxLxD), segment_ids_BxL, self.scale, self.position == "alibi")
    if forward.attention == "pallas":
      from celerity_jax.models import pallas_attention  # Pallas loads only where it is used

      out = pallas_attention.causal(*args, forward.attention_block, forward.mesh)
    elif forward.attention == "blockwise":
      out = attention.blockwise(*args, forward.attention_block)
    elif forward.attention == "cudnn":
      out = attention.cudnn(*args)
    elif forward.attention == "triton":
      from celerity_jax.models import triton_attention  # Pallas loads only where it is used

      out = triton_attention.causal(*args, forward.mesh)
    else:
      out = attention.reference(*args)
    return self.output(out)


class Mlp(nnx.Module):
  """The dense MLP (also a mixture of experts' shared expert, with its own width `d_ff`)."""

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
    gate_BxLxF = (
      jnp.einsum("BLD,DF->BLF", x_BxLxD, self.wg[...].astype(dt)) if self.kind == "swiglu" else None
    )
    h_BxLxF = mlp_activation(h_BxLxF, gate_BxLxF, self.kind)
    return jnp.einsum("BLF,FD->BLD", h_BxLxF, self.wo[...].astype(dt))


class Block(nnx.Module):
  """x + m_L^-1 * Attn(LN(x)), then x + m_L^-1 * MLP(LN(x)) (m_L^-1: CompleteP's residual-branch
  scale). A mixture of experts' block (moe.MoeBlock) swaps the MLP for routed experts."""

  def __init__(self, cfg, mult: Multipliers, rngs: nnx.Rngs):
    self.ln1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.attn = Attention(cfg, mult, rngs)
    self.ln2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
    self.mlp = self.make_mlp(cfg, mult, rngs)
    self.residual_scale = mult.residual_scale

  def make_mlp(self, cfg, mult, rngs):
    return Mlp(cfg, mult, rngs)

  def add_branch(self, x_BxLxD, y_BxLxD, forward: Forward):
    x_BxLxD = x_BxLxD + self.residual_scale * y_BxLxD
    return forward.constrain(x_BxLxD, ("batch", "length", "act_embed"))

  def mlp_branch(self, x_BxLxD, forward: Forward):
    """(the MLP's output, its statistics): none for a dense MLP."""
    del forward
    return self.mlp(x_BxLxD), {}

  def __call__(self, x_BxLxD, segment_ids_BxL, forward: Forward):
    """(x, aux): every block, dense or routed, takes and returns the same."""
    x_BxLxD = self.add_branch(
      x_BxLxD, self.attn(self.ln1(x_BxLxD), segment_ids_BxL, forward), forward
    )
    y_BxLxD, aux = self.mlp_branch(self.ln2(x_BxLxD), forward)
    return self.add_branch(x_BxLxD, y_BxLxD, forward), aux
