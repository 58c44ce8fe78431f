"""Blockwise attention equals the materialized reference in value and in every gradient, and its
compiled step holds no L x L array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celerity_jax.models import attention

CASES = [
  # (length, heads, kv heads, block, alibi, packed documents)
  (64, 4, 4, 16, True, False),  # several blocks, ALiBi, causal only
  (64, 4, 2, 16, True, True),  # GQA and documents that cross block edges
  (48, 2, 1, 32, False, True),  # block 32 does not divide 48: 24 is used; MQA; no ALiBi
  (32, 2, 2, 64, True, True),  # one block larger than the sequence
]


def _inputs(length, heads, kv, packed, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  b, h = 2, 8
  q = jax.random.normal(ks[0], (b, length, heads, h))
  k = jax.random.normal(ks[1], (b, length, kv, h))
  v = jax.random.normal(ks[2], (b, length, kv, h))
  cot = jax.random.normal(ks[3], (b, length, heads, h))
  if packed:  # row 0: documents of 5, 19, 40 tokens...; row 1: one document
    seg = np.zeros((b, length), np.int32)
    seg[0, 5:] = 1
    seg[0, 24:] = 2
    segment_ids = jnp.asarray(seg)
  else:
    segment_ids = None  # one stream: the causal mask alone
  return q, k, v, cot, segment_ids


@pytest.mark.parametrize("length,heads,kv,block,alibi,packed", CASES)
def test_blockwise_equals_reference_in_value_and_gradients(length, heads, kv, block, alibi, packed):
  q, k, v, cot, seg = _inputs(length, heads, kv, packed)
  scale = 0.3
  ref = lambda q, k, v: attention.reference(q, k, v, seg, scale, alibi)  # noqa: E731
  blk = lambda q, k, v: attention.blockwise(q, k, v, seg, scale, alibi, block)  # noqa: E731
  np.testing.assert_allclose(jax.jit(blk)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  grads = [
    jax.jit(jax.grad(lambda *a, f=f: (f(*a) * cot).sum(), argnums=(0, 1, 2)))(q, k, v)
    for f in (ref, blk)
  ]
  for name, want, got in zip("qkv", *grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_blockwise_bf16_close_to_float32_reference():
  q, k, v, _, seg = _inputs(64, 4, 2, True)
  want = attention.reference(q, k, v, seg, 0.3, True)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = jax.jit(lambda *a: attention.blockwise(*a, seg, 0.3, True, 16))(*bf)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


def test_blockwise_never_materializes_the_scores():
  """At L = 2048 with 128-token blocks, no array in the compiled forward and backward has L x L
  elements per head; the reference's does."""
  length, block = 2048, 128
  q, k, v, cot, seg = (
    jax.ShapeDtypeStruct(s, d)
    for s, d in [
      ((1, length, 2, 16), jnp.float32),
      ((1, length, 2, 16), jnp.float32),
      ((1, length, 2, 16), jnp.float32),
      ((1, length, 2, 16), jnp.float32),
      ((1, length), jnp.int32),
    ]
  )

  def grad_of(f):
    return jax.jit(jax.grad(lambda q, k, v, c, s: (f(q, k, v, s) * c).sum(), argnums=(0, 1, 2)))

  def biggest(f):
    text = grad_of(f).lower(q, k, v, cot, seg).compile().as_text()
    return max(_array_sizes(text))

  ref = biggest(lambda q, k, v, s: attention.reference(q, k, v, s, 0.25, True))
  blk = biggest(lambda q, k, v, s: attention.blockwise(q, k, v, s, 0.25, True, block))
  assert ref >= length * length
  assert blk <= 2 * length * 16 * 2  # q/k/v-sized arrays and one tile at most


def _array_sizes(hlo_text: str):
  import re

  for dims in re.findall(r"\b(?:f32|bf16|s32|pred)\[([\d,]+)\]", hlo_text):
    yield int(np.prod([int(d) for d in dims.split(",")]))
