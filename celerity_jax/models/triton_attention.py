"""Causal ALiBi flash attention as Pallas GPU kernels, lowered to Triton (`model.attention=triton`).

cuDNN's fused attention takes ALiBi only as a materialized L x L bias, whose gradient it also
writes; these kernels compute the bias -slope * (i - j) inside each tile from positions, as the
Pallas TPU kernels (models/pallas_attention.py) and the XLA tiles (attention.blockwise) do. The
structure follows jax's Pallas GPU attention (jax.experimental.pallas.ops.gpu.attention, after
Triton's fused-attention tutorial), with ALiBi, grouped-query heads and the same-document mask:

  forward   grid (L/Q, B, N): one query block walks the key blocks up to its diagonal with an
            online softmax in base 2 (exp2, the scores pre-scaled by log2 e); out and the base-2
            log-sum-exp;
  backward  grid (B, N, L/C): one program accumulates dk and dv of key block j over the query
            blocks at or after it, then dq of query block j over the key blocks up to it.

dk and dv come out per query head and are summed over each kv head's G query heads by XLA.
rowsum(dO * O) is one XLA reduction. Head dims must be a power of two of at least 16 (Triton's
dot) and the sequence a multiple of the tiles. On CPU the kernels run in Pallas' interpreter
(tests/test_attention.py checks them against the reference in value and gradients there, and
lowers them to Triton for a GPU, which needs no GPU); a GPU compiles them through Triton.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from celerity_jax.execution import TRITON_TILE, triton_shape_or_error
from celerity_jax.models.attention import MASKED, alibi_slopes, per_device

FORWARD_TILE = TRITON_TILE  # query and key rows of a forward tile
BACKWARD_TILE = 32  # query and key rows of a backward tile (it holds more tiles at once)
LOG2E = math.log2(math.e)


def causal(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, scale, alibi: bool, mesh=None):
  """Equals attention.reference(...) for causal self-attention over packed documents; Triton on a
  GPU, Pallas' interpreter elsewhere. Under a mesh the kernels run per device (shard_map)."""
  n, length, h = q_BxLxNxH.shape[2], q_BxLxNxH.shape[1], q_BxLxNxH.shape[3]
  triton_shape_or_error(length, h)
  slopes_N = alibi_slopes(n) if alibi else jnp.zeros((n,), jnp.float32)
  seg = None if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)

  def local(q, k, v, seg, slopes):
    def run(interpret):
      return lambda *a: _flash(*a, float(scale), interpret)

    return jax.lax.platform_dependent(q, k, v, seg, slopes, cuda=run(False), default=run(True))

  return per_device(local, mesh, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg, slopes_N)


def _scores(q, k, slope, scale, pos_q, pos_k, seg_q, seg_k):
  """Base-2 scores of a tile (float32): (q.k * scale - slope * (i - j)) * log2 e, masked."""
  s = plgpu.dot(q, k, trans_b=True) * (scale * LOG2E)
  s = s - (slope * LOG2E) * (pos_q[:, None] - pos_k[None, :]).astype(jnp.float32)
  visible = pos_q[:, None] >= pos_k[None, :]
  if seg_q is not None:
    visible = visible & (seg_q[:, None] == seg_k[None, :])
  return jnp.where(visible, s, MASKED)


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, slope_ref, o_ref, lse_ref, *, scale, t):
  qi = pl.program_id(0)
  q = q_ref[...]
  slope = slope_ref[0]
  pos_q = qi * t + jnp.arange(t)
  seg_q = None if seg_ref is None else seg_ref[pl.ds(qi * t, t)]

  def key_block(kj, carry):
    acc, m, total = carry
    keys = pl.ds(kj * t, t)
    seg_k = None if seg_ref is None else seg_ref[keys]
    s = _scores(q, k_ref[keys, :], slope, scale, pos_q, kj * t + jnp.arange(t), seg_q, seg_k)
    m_new = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, total * correction + p.sum(axis=-1)

  init = (
    jnp.zeros(q.shape, jnp.float32),
    jnp.full((t,), -jnp.inf, jnp.float32),
    jnp.zeros((t,), jnp.float32),
  )
  acc, m, total = jax.lax.fori_loop(0, qi + 1, key_block, init)  # causal: up to the diagonal
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(total)


def _forward(q, k, v, seg, slopes, scale, interpret):
  b, length, n, h = q.shape
  group = n // k.shape[2]
  t = FORWARD_TILE
  q_spec = pl.BlockSpec((None, t, None, h), lambda i, j, hd: (j, i, hd, 0))
  kv_spec = pl.BlockSpec((None, length, None, h), lambda i, j, hd: (j, 0, hd // group, 0))
  seg_spec = None if seg is None else pl.BlockSpec((None, length), lambda i, j, hd: (j, 0))
  return pl.pallas_call(
    functools.partial(_forward_kernel, scale=scale, t=t),
    grid=(length // t, b, n),
    in_specs=[q_spec, kv_spec, kv_spec, seg_spec, pl.BlockSpec((1,), lambda i, j, hd: (hd,))],
    out_specs=[q_spec, pl.BlockSpec((None, None, t), lambda i, j, hd: (j, hd, i))],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, n, length), jnp.float32),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=4 if h <= 64 else 8, num_stages=2),
    interpret=interpret,
    name="alibi_flash_forward",
  )(q, k, v, seg, slopes)


def _backward_kernel(
  q_ref, k_ref, v_ref, seg_ref, slope_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
  *, scale, t, blocks,
):  # fmt: skip
  j = pl.program_id(2)
  slope = slope_ref[0]

  def tile(qi, kj):
    """(p, ds) of the tile (query block qi, key block kj), with the blocks it read."""
    queries, keys = pl.ds(qi * t, t), pl.ds(kj * t, t)
    q, k, v, do = q_ref[queries, :], k_ref[keys, :], v_ref[keys, :], do_ref[queries, :]
    segs = (None, None) if seg_ref is None else (seg_ref[queries], seg_ref[keys])
    s = _scores(q, k, slope, scale, qi * t + jnp.arange(t), kj * t + jnp.arange(t), *segs)
    p = jnp.exp2(s - lse_ref[queries][:, None])
    dp = plgpu.dot(do, v, trans_b=True) - delta_ref[queries][:, None]
    return p, p * dp * scale, q, k, do

  def dkv_block(qi, carry):
    dk, dv = carry
    p, ds, q, _, do = tile(qi, j)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

  zeros = jnp.zeros((t, dk_ref.shape[-1]), jnp.float32)
  dk, dv = jax.lax.fori_loop(j, blocks, dkv_block, (zeros, zeros))  # causal: queries >= keys
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  def dq_block(kj, dq):
    _, ds, _, k, _ = tile(j, kj)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq_ref[...] = jax.lax.fori_loop(0, j + 1, dq_block, zeros).astype(dq_ref.dtype)


def _backward(scale, interpret, residuals, do):
  q, k, v, seg, slopes, out, lse = residuals
  b, length, n, h = q.shape
  kv = k.shape[2]
  group, t = n // kv, BACKWARD_TILE
  delta = jnp.einsum("BLNH,BLNH->BNL", out.astype(jnp.float32), do.astype(jnp.float32))
  whole = pl.BlockSpec((None, length, None, h), lambda i, hd, j: (i, 0, hd, 0))
  whole_kv = pl.BlockSpec((None, length, None, h), lambda i, hd, j: (i, 0, hd // group, 0))
  row = pl.BlockSpec((None, None, length), lambda i, hd, j: (i, hd, 0))
  block = pl.BlockSpec((None, t, None, h), lambda i, hd, j: (i, j, hd, 0))
  seg_spec = None if seg is None else pl.BlockSpec((None, length), lambda i, hd, j: (i, 0))
  dq, dk, dv = pl.pallas_call(
    functools.partial(_backward_kernel, scale=scale, t=t, blocks=length // t),
    grid=(b, n, length // t),
    in_specs=[
      whole,
      whole_kv,
      whole_kv,
      seg_spec,
      pl.BlockSpec((1,), lambda i, hd, j: (hd,)),
      whole,
      row,
      row,
    ],  # fmt: skip
    out_specs=[block, block, block],
    out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 3,  # dk, dv per query head
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="alibi_flash_backward",
  )(q, k, v, seg, slopes, do, lse, delta)
  dk = dk.reshape(b, length, kv, group, h).sum(3)
  dv = dv.reshape(b, length, kv, group, h).sum(3)
  zero_seg = None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0)
  return (
    dq.astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    zero_seg,
    jnp.zeros_like(slopes),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, seg, slopes, scale, interpret):
  return _forward(q, k, v, seg, slopes, scale, interpret)[0]


def _flash_fwd(q, k, v, seg, slopes, scale, interpret):
  out, lse = _forward(q, k, v, seg, slopes, scale, interpret)
  return out, (q, k, v, seg, slopes, out, lse)


_flash.defvjp(_flash_fwd, _backward)
