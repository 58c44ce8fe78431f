"""Blockwise attention and the Pallas TPU and GPU kernels (interpreted on CPU) equal the
materialized reference in value and in every gradient; the GPU kernels lower to Triton for a GPU;
the blockwise compiled step holds no L x L array; model.attention picks its path per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celerity_jax import execution
from celerity_jax.config import ConfigError
from celerity_jax.models import attention, pallas_attention, triton_attention

CASES = [
  # (length, heads, kv heads, block, alibi, packed documents)
  (64, 4, 4, 16, True, False),  # several blocks, ALiBi, causal only
  (64, 4, 2, 16, True, True),  # GQA and documents that cross block edges
  (48, 2, 1, 32, False, True),  # block 32 does not divide 48: 24 is used; MQA; no ALiBi
  (32, 2, 2, 64, True, True),  # one block larger than the sequence
]


def _inputs(length, heads, kv, packed, seed=0, h=8):
  ks = jax.random.split(jax.random.key(seed), 4)
  b = 2
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


# the Triton kernels' forward tiles are 64 rows, the backward's 32; d_head 16 (Triton's dot minimum)
TRITON_CASES = [
  # (length, heads, kv heads, alibi, packed documents)
  (128, 4, 2, True, True),  # 2 forward and 4 backward tiles; GQA; documents across tiles
  (64, 2, 1, False, False),  # one forward tile; MQA; no ALiBi, causal only
]


@pytest.mark.parametrize("length,heads,kv,alibi,packed", TRITON_CASES)
def test_triton_kernels_equal_reference_in_value_and_gradients(length, heads, kv, alibi, packed):
  q, k, v, cot, seg = _inputs(length, heads, kv, packed, h=16)
  if packed:  # a document that starts inside the second backward tile of row 1
    seg = seg.at[1, 40:].set(3)
  tri = lambda q, k, v: triton_attention.causal(q, k, v, seg, 0.3, alibi)  # noqa: E731
  _assert_equals_reference(tri, q, k, v, cot, seg, alibi, lambda want: 1e-5 * np.abs(want).max())


@pytest.mark.parametrize("packed", [False, True])
def test_triton_kernels_lower_to_triton_for_a_gpu_on_this_cpu(packed):
  """The 1B shape's heads (9 of 128) in bf16, forward and backward, lowered for CUDA: Pallas builds
  both kernels' Triton IR here, so a GPU only has Triton compile them."""
  q = jax.ShapeDtypeStruct((2, 256, 9, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 256), jnp.int32) if packed else None

  def loss(q, k, v, s):
    return triton_attention.causal(q, k, v, s, 0.088, True).astype(jnp.float32).sum()

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  text = step.trace(q, q, q, seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2
  assert "alibi_flash_forward" in text and "alibi_flash_backward" in text


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
  "path,platform,dtype,length,message",
  [
    (
      "cudnn",
      "cpu",
      "bfloat16",
      2048,
      "model.attention=cudnn runs on an NVIDIA GPU only, not on cpu",
    ),
    ("triton", "tpu", "bfloat16", 2048, "model.attention=triton runs on an NVIDIA GPU only"),
    (
      "cudnn",
      "gpu",
      "float32",
      2048,
      "model.attention=cudnn needs model.dtype=bfloat16 or float16",
    ),
    ("triton", "gpu", "float32", 2048, "model.attention=triton needs model.dtype=bfloat16"),
    ("cudnn", "gpu", "bfloat16", 2047, "needs an even model.seq_len, not 2047"),
  ],
)
def test_gpu_attention_is_refused_where_it_cannot_run(path, platform, dtype, length, message):
  assert execution.attention_path(path, 8192, 512, "gpu", "bfloat16") == path
  with pytest.raises(ConfigError, match=message):
    execution.attention_path(path, length, 512, platform, dtype)
  with pytest.raises(ConfigError, match="model.seq_len a multiple of 64, not 2000"):
    execution.triton_shape_or_error(2000, 128)
  with pytest.raises(ConfigError, match="model.d_head a power of two of at least 16, not 96"):
    execution.triton_shape_or_error(2048, 96)
