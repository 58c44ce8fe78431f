"""Building blocks shared by the decoders: parameters with logical axes, norms, positions.

Shape legend: B batch, L sequence, D d_model, N query heads, K kv heads, H head dim, F d_ff, V vocab.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...],
          group: str) -> nnx.Param:
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
  """The MLP nonlinearity on the up-projection h: squared ReLU (Celerity) or SwiGLU (silu(gate) * h),
  shared by the dense MLP and the experts."""
  if kind == "swiglu":
    return jax.nn.silu(gate) * h
  return jnp.square(jax.nn.relu(h))


def alibi_slopes(n_heads: int) -> jax.Array:
  """Per-head ALiBi slopes (Press et al. 2022), including their rule for non-power-of-2 counts."""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  if math.log2(n_heads).is_integer():
    slopes = powers(n_heads)
  else:
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest) + powers(2 * closest)[0::2][: n_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(n_heads: int, length: int) -> jax.Array:
  """Additive attention bias -slope * (i - j), shape 1xNxLxL (future positions are masked anyway)."""
  pos = jnp.arange(length)
  distance_LxL = (pos[:, None] - pos[None, :]).astype(jnp.float32)
  return -alibi_slopes(n_heads)[None, :, None, None] * distance_LxL[None, None]


def rope(x_BxLxNxH: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding on the last axis (rotate-half convention)."""
  length, h = x_BxLxNxH.shape[1], x_BxLxNxH.shape[-1]
  freqs = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
  angles_LxH2 = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles_LxH2)[None, :, None, :]
  sin = jnp.sin(angles_LxH2)[None, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Causal mask that also stops attention across packed documents, shape Bx1xLxL (bool)."""
  length = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL[None] & same_doc_BxLxL)[:, None]
