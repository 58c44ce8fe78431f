"""Causal ALiBi flash attention as Pallas TPU kernels (`model.attention=pallas`).

The same algorithm as attention.blockwise (online softmax forward, FlashAttention-2 backward, ALiBi
and the causal and document masks computed per tile from positions and segment ids), written as
three Mosaic kernels so that each Q x C tile lives in VMEM and the key loop is the grid's last,
sequential axis with the running max, sum and output in scratch:

  forward   grid (B, N, L/Q, L/C): out and log-sum-exp per query block;
  dk, dv    grid (B, K, L/C, G * L/Q): one kv head's key block accumulates over the G query heads
            that share it (GQA) and every query block at or after it;
  dq        grid (B, N, L/Q, L/C).

Tiles wholly in the future are skipped, and their index maps repeat the last needed block so the
pipeline fetches nothing for them. The forward tile is query-major (Q x C: the running max and sum
are per row, kept lane-replicated in (Q, 128) scratch, the layout TPU vector registers want); the
backward tiles are key-major (C x Q), so the per-query log-sum-exp and rowsum(dO * O) enter as
(1, Q) rows of (B, N, 1, L) arrays and dk, dv come out of plain products; dq takes one transpose
per tile. Only the (B, N, 1, L) log-sum-exp is kept for the backward pass.

On CPU the kernels run in Pallas' interpreter (slow, for tests: tests/test_attention.py checks
them against the reference in value and gradients); on TPU they compile through Mosaic, which
tests/test_aot.py does for a TPU topology from any machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from celerity_jax.execution import pallas_tile_or_error
from celerity_jax.models.attention import MASKED, alibi_slopes, per_device

LANES, SUBLANES = 128, 8
SQUEEZE = pl.Squeezed()  # a block dimension the kernel does not see


tile_size = pallas_tile_or_error


def causal(
  q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, scale, alibi: bool, block: int, mesh=None
):
  """Equals attention.reference(...) for causal self-attention over packed documents. Under a
  mesh of several devices the kernels run per device inside `jax.shard_map` (Mosaic kernels are
  not partitioned by XLA), with batch and heads split as sharding.RULES says."""
  n, length = q_BxLxNxH.shape[2], q_BxLxNxH.shape[1]
  slopes_N = alibi_slopes(n) if alibi else jnp.zeros((n,), jnp.float32)
  t = tile_size(length, block)
  seg = None if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)

  def local(q, k, v, seg, slopes):
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # BxNxLxH, BxKxLxH

    def run(interpret):
      return lambda *a: _attention(*a, float(scale), t, interpret)

    # Mosaic on TPU, Pallas' interpreter elsewhere, decided when the step is lowered
    out = jax.lax.platform_dependent(q, k, v, seg, slopes, tpu=run(False), default=run(True))
    return out.transpose(0, 2, 1, 3)

  return per_device(local, mesh, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg, slopes_N)


# ---- per-tile pieces shared by the three kernels ----


def _visible(pos_q, pos_k, seg_q, seg_k):
  """Causal and same-document visibility of a tile from broadcastable positions and ids."""
  visible = pos_q >= pos_k
  return visible if seg_q is None else visible & (seg_q == seg_k)


def _scores(q, k, slope, scale, qi, kj, t, segs):
  """Query-major scores (Q x C, float32) with ALiBi and the masks, and the visibility mask;
  `segs` = (query ids as a (Q, 1) column, key ids as a (1, C) row) or None."""
  s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
  pos_q = qi * t + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
  pos_k = kj * t + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  s = s - slope * (pos_q - pos_k).astype(jnp.float32)
  visible = _visible(pos_q, pos_k, *(segs or (None, None)))
  return jnp.where(visible, s, MASKED), visible


def _scores_t(k, q, slope, scale, qi, kj, t, segs):
  """Key-major scores (C x Q) of the same tile; `segs` = (key ids (C, 1), query ids (1, Q))."""
  s = jax.lax.dot_general(k, q, NT, preferred_element_type=jnp.float32) * scale
  pos_k = kj * t + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
  pos_q = qi * t + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  s = s - slope * (pos_q - pos_k).astype(jnp.float32)
  seg_k, seg_q = segs or (None, None)
  visible = _visible(pos_q, pos_k, seg_q, seg_k)
  return jnp.where(visible, s, MASKED), visible


NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _lanes(x, like):
  """A (rows, 128)-replicated statistic broadcast to a (rows, C) tile's width."""
  return jnp.broadcast_to(x[:, :1], like.shape)


def _div(x, d: int):
  """x // d for non-negative grid indices (jnp's // adds sign fix-ups Mosaic need not see)."""
  return x if d == 1 else jax.lax.div(x, d)


def _segment_inputs(seg):
  """Document ids twice: lane-replicated columns (B, L, 128), sublane-replicated rows (B, 8, L)."""
  if seg is None:
    return ()
  b, length = seg.shape
  return (
    jnp.broadcast_to(seg[:, :, None], (b, length, LANES)),
    jnp.broadcast_to(seg[:, None, :], (b, SUBLANES, length)),
  )


def _specs(t, h_dim, segmented, kv_of, q_of, k_rows, q_rows, query_major: bool):
  """BlockSpecs for slopes, q, k, v and the segment ids (ids of the tile's row axis as a column,
  of its column axis as a row), given index functions of the grid."""
  tile = (SQUEEZE, SQUEEZE, t, h_dim)
  specs = [
    pl.BlockSpec(memory_space=pltpu.SMEM),
    pl.BlockSpec(tile, lambda *g: (g[0], q_of(*g), q_rows(*g), 0)),
    pl.BlockSpec(tile, lambda *g: (g[0], kv_of(*g), k_rows(*g), 0)),
    pl.BlockSpec(tile, lambda *g: (g[0], kv_of(*g), k_rows(*g), 0)),
  ]
  if segmented:
    rows_of, cols_of = (q_rows, k_rows) if query_major else (k_rows, q_rows)
    specs += [
      pl.BlockSpec((SQUEEZE, t, LANES), lambda *g: (g[0], rows_of(*g), 0)),
      pl.BlockSpec((SQUEEZE, SUBLANES, t), lambda *g: (g[0], 0, cols_of(*g))),
    ]
  return specs


def _query_grid_specs(t, h_dim, segmented, groups, query_major: bool):
  """_specs for a grid (B, N, query block, key block), the forward's and dq's: key blocks after
  the query block repeat the diagonal one, so the pipeline fetches nothing for them."""
  return _specs(
    t, h_dim, segmented,
    kv_of=lambda b_, h, i, j: _div(h, groups),
    q_of=lambda b_, h, i, j: h,
    k_rows=lambda b_, h, i, j: jnp.minimum(j, i),
    q_rows=lambda b_, h, i, j: i,
    query_major=query_major,
  )  # fmt: skip


def _segs(refs):
  return None if refs is None else (refs[0][:, :1], refs[1][:1, :])


def _row_spec(t, head_of, rows_of):
  """A (1, Q) block of a (B, N, 1, L) per-query statistic."""
  return pl.BlockSpec((SQUEEZE, SQUEEZE, 1, t), lambda *g: (g[0], head_of(*g), 0, rows_of(*g)))


PARAMS = dict(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _cost(q, matmuls: int, t: int, *arrays) -> pl.CostEstimate:
  """What a kernel does, for XLA's cost analysis and scheduler (a custom call is otherwise free):
  `matmuls` t x t x H products and t x t exponentials per visible tile, and its operands' bytes."""
  b, n, length, h_dim = q.shape
  nb = length // t
  tiles = b * n * nb * (nb + 1) // 2  # causal: the diagonal and the tiles before it
  return pl.CostEstimate(
    flops=int(tiles * matmuls * 2 * t * t * h_dim),
    transcendentals=int(tiles * t * t),
    bytes_accessed=int(sum(x.size * x.dtype.itemsize for x in arrays)),
  )


# ---- forward ----


def _forward_kernel(slopes_ref, q_ref, k_ref, v_ref, *rest, scale, t, segmented):
  seg_refs = rest[:2] if segmented else None
  o_ref, lse_ref, m_ref, l_ref, acc_ref = rest[2:] if segmented else rest
  h, qi, kj = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, MASKED, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(kj <= qi)  # square tiles: a key block is visible to query blocks at or after it
  def _():
    s, visible = _scores(q_ref[...], k_ref[...], slopes_ref[h], scale, qi, kj, t, _segs(seg_refs))
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # (Q, 128)
    p = jnp.where(visible, jnp.exp(s - _lanes(m_new, s)), 0.0)
    correction = jnp.exp(m_prev - m_new)
    l_ref[...] = l_ref[...] * correction + p.sum(axis=-1, keepdims=True)
    m_ref[...] = m_new
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * _lanes(correction, acc_ref) + pv

  @pl.when(kj == qi)  # the diagonal tile is each query block's last
  def _():
    total = l_ref[...]
    o_ref[...] = (acc_ref[...] / _lanes(total, acc_ref)).astype(o_ref.dtype)
    lse_ref[...] = (m_ref[...] + jnp.log(total)).T[:1, :]  # (Q, 128) replicated -> a (1, Q) row


def _forward(q, k, v, seg, slopes, scale, t, interpret):
  b, n, length, h_dim = q.shape
  groups, nb = n // k.shape[1], length // t
  specs = _query_grid_specs(t, h_dim, seg is not None, groups, query_major=True)
  return pl.pallas_call(
    functools.partial(_forward_kernel, scale=scale, t=t, segmented=seg is not None),
    grid=(b, n, nb, nb),
    in_specs=specs,
    out_specs=[
      pl.BlockSpec((SQUEEZE, SQUEEZE, t, h_dim), lambda b_, h, i, j: (b_, h, i, 0)),
      _row_spec(t, lambda b_, h, i, j: h, lambda b_, h, i, j: i),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, n, 1, length), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((t, LANES), jnp.float32),
      pltpu.VMEM((t, LANES), jnp.float32),
      pltpu.VMEM((t, h_dim), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(**PARAMS),
    cost_estimate=_cost(q, 2, t, q, k, v, q),
    interpret=interpret,
  )(slopes, q, k, v, *_segment_inputs(seg))


# ---- backward (key-major tiles) ----


def _probs_t(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slope, scale, qi, kj, t, seg_refs):
  """A tile's probabilities and score gradients, key-major (both C x Q, float32)."""
  s, visible = _scores_t(k_ref[...], q_ref[...], slope, scale, qi, kj, t, _segs(seg_refs))
  p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)  # lse: a (1, Q) row
  dp = jax.lax.dot_general(v_ref[...], do_ref[...], NT, preferred_element_type=jnp.float32)
  return p, p * (dp - delta_ref[...]) * scale


def _dkv_kernel(slopes_ref, q_ref, k_ref, v_ref, *rest, scale, t, nb, groups, segmented):
  seg_refs = rest[:2] if segmented else None
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = rest[2:] if segmented else rest
  kv, kj, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  g, qi = _div(step, nb), jax.lax.rem(step, nb)

  @pl.when(step == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(kj <= qi)
  def _():
    slope = slopes_ref[kv * groups + g]
    refs = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref)
    p, ds = _probs_t(*refs, slope, scale, qi, kj, t, seg_refs)
    dv_acc[...] += jnp.dot(p.astype(do_ref.dtype), do_ref[...], preferred_element_type=jnp.float32)
    dk_acc[...] += jnp.dot(ds.astype(q_ref.dtype), q_ref[...], preferred_element_type=jnp.float32)

  @pl.when(step == groups * nb - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(slopes_ref, q_ref, k_ref, v_ref, *rest, scale, t, segmented):
  seg_refs = rest[:2] if segmented else None
  do_ref, lse_ref, delta_ref, dq_ref, dq_acc = rest[2:] if segmented else rest
  h, qi, kj = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(kj <= qi)
  def _():
    refs = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref)
    _, ds = _probs_t(*refs, slopes_ref[h], scale, qi, kj, t, seg_refs)
    dq_acc[...] += jnp.dot(ds.T.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32)

  @pl.when(kj == qi)
  def _():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _backward(q, k, v, seg, slopes, out, lse, d_out, scale, t, interpret):
  b, n, length, h_dim = q.shape
  kv_heads = k.shape[1]
  groups, nb = n // kv_heads, length // t
  segmented = seg is not None
  delta = jnp.einsum("BNLH,BNLH->BNL", d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta[:, :, None, :]  # (B, N, 1, L) like lse
  tile = (SQUEEZE, SQUEEZE, t, h_dim)

  def row_specs(head_of, rows_of):  # dO, then the two per-query rows
    return [
      pl.BlockSpec(tile, lambda *g: (g[0], head_of(*g), rows_of(*g), 0)),
      _row_spec(t, head_of, rows_of),
      _row_spec(t, head_of, rows_of),
    ]

  # dk, dv: grid (B, K, key block, G x query block); query blocks before the key block repeat it
  q_head = lambda b_, kvh, j, s: kvh * groups + _div(s, nb)  # noqa: E731
  q_rows = lambda b_, kvh, j, s: jnp.maximum(jax.lax.rem(s, nb), j)  # noqa: E731
  kv_spec = pl.BlockSpec(tile, lambda b_, kvh, j, s: (b_, kvh, j, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, scale=scale, t=t, nb=nb, groups=groups, segmented=segmented),
    grid=(b, kv_heads, nb, groups * nb),
    in_specs=_specs(
      t,
      h_dim,
      segmented,
      kv_of=lambda b_, kvh, j, s: kvh,
      q_of=q_head,
      k_rows=lambda b_, kvh, j, s: j,
      q_rows=q_rows,
      query_major=False,
    )
    + row_specs(q_head, q_rows),  # fmt: skip
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_shapes=[pltpu.VMEM((t, h_dim), jnp.float32), pltpu.VMEM((t, h_dim), jnp.float32)],
    compiler_params=pltpu.CompilerParams(**PARAMS),
    cost_estimate=_cost(q, 4, t, q, k, v, d_out, k, v),
    interpret=interpret,
  )(slopes, q, k, v, *_segment_inputs(seg), d_out, lse, delta)

  # dq: grid (B, N, query block, key block); key blocks after the query block repeat it
  same = lambda b_, h, i, j: h  # noqa: E731
  at_q = lambda b_, h, i, j: i  # noqa: E731
  [dq] = pl.pallas_call(
    functools.partial(_dq_kernel, scale=scale, t=t, segmented=segmented),
    grid=(b, n, nb, nb),
    in_specs=_query_grid_specs(t, h_dim, segmented, groups, query_major=False)
    + row_specs(same, at_q),
    out_specs=[pl.BlockSpec(tile, lambda b_, h, i, j: (b_, h, i, 0))],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
    scratch_shapes=[pltpu.VMEM((t, h_dim), jnp.float32)],
    compiler_params=pltpu.CompilerParams(**PARAMS),
    cost_estimate=_cost(q, 3, t, q, k, v, d_out, q),
    interpret=interpret,
  )(slopes, q, k, v, *_segment_inputs(seg), d_out, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, seg, slopes, scale, t, interpret):
  return _forward(q, k, v, seg, slopes, scale, t, interpret)[0]


def _attention_fwd(q, k, v, seg, slopes, scale, t, interpret):
  out, lse = _forward(q, k, v, seg, slopes, scale, t, interpret)
  return out, (q, k, v, seg, slopes, out, lse)


def _attention_bwd(scale, t, interpret, residuals, d_out):
  q, k, v, seg, slopes, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, seg, slopes, out, lse, d_out, scale, t, interpret)
  d_seg = None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0)
  return dq, dk, dv, d_seg, jnp.zeros_like(slopes)


_attention.defvjp(_attention_fwd, _attention_bwd)
