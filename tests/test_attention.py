"""Blockwise attention and the Pallas kernels (interpreted on CPU) equal the materialized reference
in value and in every gradient; the blockwise compiled step holds no L x L array; model.attention
picks its path per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celerity_jax import execution
from celerity_jax.config import ConfigError
from celerity_jax.models import attention, pallas_attention

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
  blk = lambda q, k, v: attention.blockwise(q, k, v, seg, 0.3, alibi, block)  # noqa: E731
  _assert_equals_reference(blk, q, k, v, cot, seg, alibi, lambda want: 1e-4)


def _assert_equals_reference(f, q, k, v, cot, seg, alibi, grad_atol):
  """f(q, k, v) equals the reference attention (scale 0.3) in value (1e-5) and in dq, dk, dv
  (rtol 1e-4, atol grad_atol(reference gradient))."""
  ref = lambda q, k, v: attention.reference(q, k, v, seg, 0.3, alibi)  # noqa: E731
  np.testing.assert_allclose(jax.jit(f)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  grads = [
    jax.jit(jax.grad(lambda *a, g=g: (g(*a) * cot).sum(), argnums=(0, 1, 2)))(q, k, v)
    for g in (ref, f)
  ]
  for name, want, got in zip("qkv", *grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=grad_atol(want), err_msg=f"d{name}")


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


# the kernels' tiles are multiples of 128 (or the whole sequence); each case runs them interpreted
PALLAS_CASES = [
  # (length, heads, kv heads, block, alibi, packed documents)
  (256, 4, 2, 128, True, True),  # 2 x 2 tiles, one in the future; GQA; documents across tiles
  (384, 2, 1, 256, True, False),  # block 256 does not divide 384: 128 is used; MQA, causal only
  (48, 2, 2, 512, False, True),  # one tile, the whole (non-128) sequence; no ALiBi (RoPE models)
]


@pytest.mark.parametrize("length,heads,kv,block,alibi,packed", PALLAS_CASES)
def test_pallas_kernels_equal_reference_in_value_and_gradients(
  length, heads, kv, block, alibi, packed
):
  q, k, v, cot, seg = _inputs(length, heads, kv, packed)
  if packed:  # documents that also end inside the second tile
    seg = seg.at[1, length // 2 + 3 :].set(7)
  pal = lambda q, k, v: pallas_attention.causal(q, k, v, seg, 0.3, alibi, block)  # noqa: E731
  _assert_equals_reference(pal, q, k, v, cot, seg, alibi, lambda want: 1e-5 * np.abs(want).max())


def test_pallas_kernels_run_per_device_on_a_sharded_mesh():
  """Batch over data/fsdp and heads over tensor (2 x 2 x 2 of the 8 CPU devices), inside
  jax.shard_map: the same values and gradients as on one device."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from celerity_jax import sharding
  from celerity_jax.config import MeshConfig

  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  q, k, v, cot, seg = _inputs(128, 4, 2, True)
  q, k, v, cot = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v, cot))  # 4 rows
  seg = jnp.concatenate([seg, seg[::-1]])
  shard = lambda x, *axes: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), *axes)))  # noqa: E731
  placed = [shard(x, None, "tensor") for x in (q, k, v)] + [shard(seg)]

  def loss(mesh_):
    return lambda q, k, v, s: (
      pallas_attention.causal(q, k, v, s, 0.3, True, 128, mesh_) * cot
    ).sum()

  want = jax.jit(jax.value_and_grad(loss(None), argnums=(0, 1, 2)))(q, k, v, seg)
  got = jax.jit(jax.value_and_grad(loss(mesh), argnums=(0, 1, 2)))(*placed)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_pallas_needs_a_sequence_it_can_tile():
  assert pallas_attention.tile_size(8192, 512) == 512
  assert pallas_attention.tile_size(1536, 1024) == 768
  assert pallas_attention.tile_size(100, 512) == 100
  with pytest.raises(ConfigError, match=r"model.seq_len=1000 .*model.attention_block=512"):
    pallas_attention.tile_size(1000, 512)


@pytest.mark.parametrize(
  "kind,length,platform,path",
  [
    ("auto", 128, "cpu", "blockwise"),  # CPU: blockwise at any length
    ("auto", 8192, "cpu", "blockwise"),
    ("auto", 512, "tpu", "reference"),  # one block: XLA's materialized attention
    ("auto", 8192, "tpu", "pallas"),
    ("auto", 1000, "tpu", "blockwise"),  # no 128-multiple tile: the XLA tiles instead
    ("auto", 8192, "gpu", "blockwise"),
    ("auto", 256, "gpu", "reference"),
    ("reference", 8192, "tpu", "reference"),  # an explicit choice stands
    ("pallas", 128, "cpu", "pallas"),
  ],
)
def test_auto_attention_per_platform(kind, length, platform, path):
  assert execution.attention_path(kind, length, 512, platform) == path


@pytest.mark.parametrize(
  "platform,dtype,length,message",
  [
    ("cpu", "bfloat16", 2048, "model.attention=cudnn runs on an NVIDIA GPU only, not on cpu"),
    ("tpu", "bfloat16", 2048, "not on tpu"),
    ("gpu", "float32", 2048, "model.attention=cudnn needs model.dtype=bfloat16 or float16"),
    ("gpu", "bfloat16", 2047, "needs an even model.seq_len, not 2047"),
  ],
)
def test_cudnn_attention_is_refused_where_cudnn_cannot_run_it(platform, dtype, length, message):
  assert execution.attention_path("cudnn", 8192, 512, "gpu", "bfloat16") == "cudnn"
  with pytest.raises(ConfigError, match=message):
    execution.attention_path("cudnn", length, 512, platform, dtype)
