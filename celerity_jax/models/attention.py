"""Causal attention for training, two ways: materialized (`reference`) and blockwise (`blockwise`).

Shape legend: B batch, L sequence, N query heads, K kv heads, G = N / K query heads per kv head, H
head dim, Q and C a block of queries and of keys (model.attention_block).

`reference` builds the N x L x L scores with the ALiBi bias and the causal and same-document mask
materialized, and calls `jax.nn.dot_product_attention`: what decoding uses too.

`pallas` runs the same algorithm as `blockwise` in Pallas TPU kernels (models/pallas_attention.py).

`triton` runs it as Pallas GPU kernels lowered to Triton (models/triton_attention.py); `cudnn`
calls cuDNN's fused attention on an NVIDIA GPU (bf16 or fp16; one packed stream, no document
mask).

`blockwise` never holds more than a Q x C tile of scores per head: the forward pass walks the key
blocks of each query block with an online softmax (running max and sum, Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022) and keeps only the output and the log-sum-exp; a custom VJP walks
the key blocks once more, recomputing each tile's probabilities, and accumulates dk and dv per key
block and dq per query block (FlashAttention-2's backward). The ALiBi bias -slope * (i - j), the
causal mask and the same-document mask are computed inside each tile from positions and segment
ids, and tiles entirely in the future are skipped (the loops' trip counts depend on the block).
Memory is O(L x H) per head plus one tile, so the scores of an 8192-token context never exist;
tests check it equals `reference` in value and gradients (tests/test_attention.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a fully masked tile row gives exp(MASKED - m) = 0, never NaN


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


def alibi_bias(n_heads: int, length: int, query_positions_Q: jax.Array | None = None) -> jax.Array:
  """Additive attention bias -slope * (i - j) for queries at positions i (default 0..length-1)
  over keys at 0..length-1, shape 1xNxQxlength (future positions are masked anyway)."""
  keys = jnp.arange(length)
  queries = keys if query_positions_Q is None else query_positions_Q
  distance_QxL = (queries[:, None] - keys[None, :]).astype(jnp.float32)
  return -alibi_slopes(n_heads)[None, :, None, None] * distance_QxL[None, None]


def attention_mask(segment_ids_BxL: jax.Array | None, length: int) -> jax.Array:
  """Causal mask that also stops attention across packed documents, shape Bx1xLxL (bool); without
  segment ids (one stream, `data.packing=concat`) the causal mask alone, 1x1xLxL, a constant."""
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
  if segment_ids_BxL is None:
    return causal_LxL[None, None]
  same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL[None] & same_doc_BxLxL)[:, None]


def reference(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, scale, alibi: bool):
  n_heads, length = q_BxLxNxH.shape[2], q_BxLxNxH.shape[1]
  mask = attention_mask(segment_ids_BxL, length)
  bias = alibi_bias(n_heads, length).astype(q_BxLxNxH.dtype) if alibi else None
  return jax.nn.dot_product_attention(
    q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias=bias, mask=mask, scale=scale
  )


def cudnn(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, scale, alibi: bool):
  """cuDNN's fused flash attention through jax.nn.dot_product_attention: causal by cuDNN's own
  mask, ALiBi as a 1 x N x L x L bias (cuDNN's built-in ALiBi is not reachable from jax), the one
  L x L tensor this path holds. No document mask: config_checks refuses data.packing=segments."""
  if segment_ids_BxL is not None:
    raise ValueError("the cudnn attention path takes no segment ids")
  n_heads, length = q_BxLxNxH.shape[2], q_BxLxNxH.shape[1]
  bias = alibi_bias(n_heads, length).astype(q_BxLxNxH.dtype) if alibi else None
  return jax.nn.dot_product_attention(
    q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, bias=bias, scale=scale, is_causal=True, implementation="cudnn"
  )


def per_device(local, mesh, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg, slopes_N):
  """local(q, k, v, seg, slopes) on each device's share of a mesh of several devices (a custom
  kernel is not partitioned by XLA), batch and heads split as sharding.RULES says; as is on one
  device."""
  if mesh is None or mesh.size == 1:
    return local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg, slopes_N)
  from celerity_jax.sharding import logical_spec

  q_spec = logical_spec(("batch", "length", "heads", "head_dim"), "attention")
  kv_spec = logical_spec(("batch", "length", "kv_heads", "head_dim"), "attention")
  seg_spec = logical_spec(("batch", "length"), "attention")
  slopes_spec = logical_spec(("heads",), "attention")
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, None if seg is None else seg_spec, slopes_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg, slopes_N)


def block_size(length: int, block: int) -> int:
  """The largest divisor of `length` not above `block` (a block must tile the sequence)."""
  size = min(block, length)
  while length % size:
    size -= 1
  return size


def blockwise(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, scale, alibi: bool, block: int):
  """Equals reference(...) for causal self-attention over packed documents."""
  b, length, n, h = q_BxLxNxH.shape
  kv = k_BxLxKxH.shape[2]
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.zeros((b, length), jnp.int32)
  slopes_N = alibi_slopes(n) if alibi else jnp.zeros((n,), jnp.float32)
  q = q_BxLxNxH.reshape(b, length, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # BxKxGxLxH
  k = k_BxLxKxH.transpose(0, 2, 1, 3)  # BxKxLxH
  v = v_BxLxKxH.transpose(0, 2, 1, 3)
  bs = block_size(length, block)
  out = _flash(q, k, v, segment_ids_BxL, slopes_N.reshape(kv, n // kv), float(scale), bs)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)


def _tile(q_blk, k_blk, seg_q, seg_k, slopes, scale, qi, kj, bs):
  """Scores of one Q x C tile (BxKxGxQxC, float32) with bias and masks applied, and the mask."""
  s = jnp.einsum("BKGQH,BKCH->BKGQC", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  pos_q = qi * bs + jnp.arange(bs)
  pos_k = kj * bs + jnp.arange(bs)
  distance_QxC = (pos_q[:, None] - pos_k[None, :]).astype(jnp.float32)
  s = s - slopes[None, :, :, None, None] * distance_QxC
  visible = (distance_QxC >= 0)[None, None, None] & (seg_q[:, :, None] == seg_k[:, None, :])[
    :, None, None
  ]
  return jnp.where(visible, s, MASKED), visible


def _slice(x, i, bs, axis):
  return jax.lax.dynamic_slice_in_dim(x, i * bs, bs, axis)


def _forward(q, k, v, seg, slopes, scale, bs):
  """(out BxKxGxLxH, lse BxKxGxL): each query block's online softmax over its key blocks."""
  nblocks = q.shape[3] // bs

  def query_block(qi):
    q_blk, seg_q = _slice(q, qi, bs, 3), _slice(seg, qi, bs, 1)

    def key_block(kj, carry):
      acc, m, total = carry
      s, visible = _tile(
        q_blk, _slice(k, kj, bs, 2), seg_q, _slice(seg, kj, bs, 1), slopes, scale, qi, kj, bs
      )
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      total = total * correction + p.sum(-1)
      pv = jnp.einsum("BKGQC,BKCH->BKGQH", p.astype(v.dtype), _slice(v, kj, bs, 2))
      return acc * correction[..., None] + pv.astype(jnp.float32), m_new, total

    shape = q_blk.shape[:-1]
    init = (
      jnp.zeros(q_blk.shape, jnp.float32),
      jnp.full(shape, MASKED, jnp.float32),
      jnp.zeros(shape, jnp.float32),
    )
    acc, m, total = jax.lax.fori_loop(0, qi + 1, key_block, init)  # causal: keys up to this block
    return (acc / total[..., None]).astype(q.dtype), m + jnp.log(total)

  out, lse = jax.lax.map(query_block, jnp.arange(nblocks))  # [blocks, ...]
  out = jnp.moveaxis(out, 0, 3).reshape(q.shape)
  lse = jnp.moveaxis(lse, 0, 3).reshape(q.shape[:-1])
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, seg, slopes, scale, bs):
  return _forward(q, k, v, seg, slopes, scale, bs)[0]


def _flash_fwd(q, k, v, seg, slopes, scale, bs):
  out, lse = _forward(q, k, v, seg, slopes, scale, bs)
  return out, (q, k, v, seg, slopes, out, lse)


def _flash_bwd(scale, bs, residuals, d_out):
  q, k, v, seg, slopes, out, lse = residuals
  nblocks = q.shape[3] // bs
  delta = jnp.einsum("BKGLH,BKGLH->BKGL", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def probs(qi, kj):
    """Tile probabilities and d(scores) for query block qi and key block kj."""
    q_blk, k_blk, v_blk = _slice(q, qi, bs, 3), _slice(k, kj, bs, 2), _slice(v, kj, bs, 2)
    s, visible = _tile(
      q_blk, k_blk, _slice(seg, qi, bs, 1), _slice(seg, kj, bs, 1), slopes, scale, qi, kj, bs
    )
    p = jnp.where(visible, jnp.exp(s - _slice(lse, qi, bs, 3)[..., None]), 0.0)
    do_blk = _slice(d_out, qi, bs, 3)
    dp = jnp.einsum("BKGQH,BKCH->BKGQC", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - _slice(delta, qi, bs, 3)[..., None]) * scale
    return p, ds, q_blk, k_blk, do_blk

  def key_block(dq, kj):
    """dk and dv of key block kj, adding its share of dq to every query block at or after it."""

    def body(qi, carry):
      dq, dk, dv = carry
      p, ds, q_blk, k_blk, do_blk = probs(qi, kj)
      dv = dv + jnp.einsum("BKGQC,BKGQH->BKCH", p, do_blk.astype(jnp.float32))
      dk = dk + jnp.einsum("BKGQC,BKGQH->BKCH", ds, q_blk.astype(jnp.float32))
      dq_blk = _slice(dq, qi, bs, 3) + jnp.einsum(
        "BKGQC,BKCH->BKGQH", ds, k_blk.astype(jnp.float32)
      )
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, qi * bs, 3), dk, dv

    zeros = jnp.zeros(k.shape[:2] + (bs, k.shape[3]), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(kj, nblocks, body, (dq, zeros, zeros))  # causal: queries >= kj
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nblocks))
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  zero_seg = jnp.zeros(seg.shape, jax.dtypes.float0)
  return (
    dq.astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    zero_seg,
    jnp.zeros_like(slopes),
  )


_flash.defvjp(_flash_fwd, _flash_bwd)
