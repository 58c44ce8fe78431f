"""Dense decoder: causality, packed-document isolation, scan/unroll/remat equivalence, variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from celerity_jax import scaling
from celerity_jax.config import ModelConfig, ParamConfig
from celerity_jax.models.decoder import Decoder
from celerity_jax.parametrization import multipliers
from celerity_jax.train.step import cross_entropy

BASE = ModelConfig(
  vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_head=16, d_ff=128, seq_len=16
)


def build(**changes):
  cfg = dataclasses.replace(BASE, **changes)
  return Decoder(cfg, multipliers(ParamConfig(d_base=32), cfg), nnx.Rngs(params=0))


def per_position_loss(model, tokens, targets):
  logits = model(tokens)[0]
  lse = jax.nn.logsumexp(logits, -1)
  return lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_loss_at_t_has_zero_gradient_wrt_later_tokens(position):
  model = build(position=position)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  t = 7
  # positions <= t use ids < 32, later positions ids >= 32: their embedding rows are only read later
  rng = np.random.default_rng(0)
  tokens = np.concatenate([rng.integers(0, 32, t + 1), rng.integers(32, 64, 16 - t - 1)])[None]
  targets = rng.integers(0, 64, (1, 16))

  def loss_t(embed):
    m = nnx.merge(graphdef, {**params, "embed": embed})
    return per_position_loss(m, jnp.asarray(tokens), jnp.asarray(targets))[0, t]

  grad = jax.jit(jax.grad(loss_t))(model.embed[...])
  assert np.all(np.asarray(grad[32:]) == 0.0)  # later tokens: exactly zero
  assert np.abs(np.asarray(grad[np.unique(tokens[0, : t + 1])])).sum() > 0


@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_segments_do_not_attend_across_documents(position):
  model = build(position=position)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 64, (1, 16))
  segments = np.array([[0] * 6 + [1] * 10])
  changed = tokens.copy()
  changed[0, :6] = rng.integers(0, 64, 6)  # rewrite document 0 only
  a = model(jnp.asarray(tokens), jnp.asarray(segments))[0]
  b = model(jnp.asarray(changed), jnp.asarray(segments))[0]
  np.testing.assert_allclose(a[0, 6:], b[0, 6:], atol=1e-6)  # document 1 is unaffected
  assert np.abs(np.asarray(a[0, :6] - b[0, :6])).max() > 1e-3
  # without segment ids the second document does see the first
  c = model(jnp.asarray(changed))[0]
  assert np.abs(np.asarray(model(jnp.asarray(tokens))[0][0, 6:] - c[0, 6:])).max() > 1e-3


def test_scan_unrolled_and_remat_agree():
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 16)))
  targets = jnp.roll(tokens, -1, axis=1)

  def loss_and_grad(model):
    graphdef, state = nnx.split(model)

    def loss(params):
      return cross_entropy(nnx.merge(graphdef, params)(tokens)[0], targets, 0.0)[0]

    return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(state))

  ref_loss, ref_grad = loss_and_grad(build(scan_layers=True))
  for changes in (
    {"scan_layers": False},
    {"scan_layers": None},  # auto: unrolled at this depth
    {"remat": "full"},
    {"remat": "dots", "scan_layers": True},
    {"attention": "blockwise", "attention_block": 4},
  ):
    loss, grad = loss_and_grad(build(**changes))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad, ref_grad
    )


def test_the_gpu_kernels_inside_the_scanned_remat_decoder_equal_blockwise():
  """model.attention=triton as the layer calls it (its Pallas kernels interpreted on this CPU),
  under scanned layers with remat and packed documents: the loss and every gradient of the
  blockwise path."""
  from celerity_jax.models.layers import Forward

  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 64)))
  segments = jnp.asarray([[0] * 20 + [1] * 44, [0] * 64])
  model = build(seq_len=64, remat="dots", scan_layers=True)
  graphdef, state = nnx.split(model)

  def loss_and_grad(path):
    def loss(params):
      forward = Forward(attention=path, attention_block=16, scan_layers=True)
      logits = nnx.merge(graphdef, params)(tokens, segments, forward)[0]
      return cross_entropy(logits, jnp.roll(tokens, -1, axis=1), 0.0)[0]

    return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(state))

  want_loss, want_grad = loss_and_grad("blockwise")
  loss, grad = loss_and_grad("triton")
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad, want_grad)


@pytest.mark.parametrize(
  "changes",
  [
    {"norm": "rmsnorm"},
    {"mlp": "swiglu"},
    {"position": "rope"},
    {"n_kv_heads": 1},
    {"n_heads": 4, "n_kv_heads": 2, "mlp": "swiglu", "norm": "rmsnorm", "position": "rope"},
  ],
)
def test_variants_match_parameter_count_and_train_signal(changes):
  model = build(**changes)
  cfg = dataclasses.replace(BASE, **changes)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert n == scaling.param_counts(cfg)["total"]
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 16)))
  logits = model(tokens)[0]
  assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_compute_keeps_float32_params_and_logits():
  f32, bf16 = build(), build(dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)))
  targets = jnp.roll(tokens, -1, axis=1)
  lo, hi = bf16(tokens)[0], f32(tokens)[0]
  assert lo.dtype == jnp.float32
  ce_lo, ce_hi = cross_entropy(lo, targets, 0.0)[0], cross_entropy(hi, targets, 0.0)[0]
  assert abs(float(ce_lo) - float(ce_hi)) / float(ce_hi) < 0.02


def test_cross_entropy_and_z_loss_values():
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25]]]))
  ce, z = cross_entropy(logits, jnp.asarray([[1]]), 1e-2)
  assert float(ce) == pytest.approx(np.log(4), rel=1e-6)
  assert float(z) == pytest.approx(0.0, abs=1e-8)  # logsumexp of a distribution is 0
  ce, z = cross_entropy(logits + 2.0, jnp.asarray([[0]]), 1e-2)
  assert float(ce) == pytest.approx(np.log(2), rel=1e-6)
  assert float(z) == pytest.approx(1e-2 * 4.0, rel=1e-5)
  # on random logits: the same value and gradient as softmax - one_hot (optax's integer-label CE)
  logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 7))
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
  want = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, targets).mean()  # noqa: E731
  got = lambda lg: cross_entropy(lg, targets, 0.0)[0]  # noqa: E731
  np.testing.assert_allclose(got(logits), want(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(got)(logits), jax.grad(want)(logits), atol=1e-7)


def test_one_return_shape_for_dense_and_routed_models():
  """(logits, aux) always; aux carries MoE statistics only for a mixture of experts and the
  residual stream only when asked for."""
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)))
  logits, aux = build()(tokens)
  assert logits.shape == (2, 16, 64) and aux == {}
  routed = build(experts=4, top_k=2, expert_d_ff=32)
  logits, aux = routed(tokens, residuals=True)
  assert logits.shape == (2, 16, 64) and set(aux) == {"moe", "residuals"}
  assert aux["moe"]["load"].shape == (4,) and aux["residuals"].shape[1:] == (2, 16, 32)


@pytest.mark.parametrize("n_layers,scanned", [(8, False), (9, True)])
def test_layers_are_scanned_only_above_eight_by_default(n_layers, scanned):
  """Unrolled shallow models step 1.1-1.5x faster on CPU; deep ones keep a depth-flat compile."""
  model = build(n_layers=n_layers, attention="reference")  # (blockwise attention has its own loops)
  tokens = jnp.zeros((1, 16), jnp.int32)
  jaxpr = str(jax.make_jaxpr(lambda t: model(t)[0])(tokens))
  assert ("scan[" in jaxpr) is scanned
