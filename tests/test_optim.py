"""Schedules, the weight-decay mask and per-group learning rates of the AdamW optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celerity_jax.config import OptimConfig
from celerity_jax.optim import make_optimizer, schedule


def test_linear_warmup_then_decay_to_exactly_zero():
  f = schedule("linear", warmup=10, steps=110)
  values = np.asarray(jax.vmap(f)(jnp.arange(0, 111)))
  np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup
  assert values[10] == pytest.approx(1.0)  # peak after warmup
  assert values[60] == pytest.approx(0.5)  # halfway down
  assert values[110] == 0.0  # exactly zero at T
  assert np.all(np.diff(values[10:]) < 0)


def test_cosine_and_constant():
  cos = schedule("cosine", warmup=0, steps=100)
  assert float(cos(0)) == pytest.approx(1.0) and float(cos(50)) == pytest.approx(0.5, abs=1e-6)
  assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)
  const = schedule("constant", warmup=4, steps=100)
  assert float(const(1)) == pytest.approx(0.5) and float(const(99)) == 1.0


class FakeResolved:
  warmup_steps, steps, weight_decay, eta_hidden = 0, 100, 0.5, 0.01
  lr_peak = {"hidden": 0.01, "embed": 0.04, "unembed": 0.04, "norm": 0.04}
  weight_decay_groups = {"hidden": 0.5, "embed": 0.5, "unembed": 0.5, "norm": 0.0}


def test_every_group_at_tau_gives_each_group_the_same_decay_per_step():
  """optim.tau_groups=every: lambda_g = lambda eta_hidden / eta_g, so with zero gradients every
  decayed group shrinks by the same eta_g lambda_g = eta_hidden lambda per step (the timescale
  1 / (eta_g lambda_g T) is tau for each), and a run's per-group tau says so."""
  from celerity_jax import recipes
  from celerity_jax.resolve import resolve

  cfg = recipes.configure("celerity_long_1", ["optim.tau_groups=every"])
  r = resolve(cfg, 1)
  assert r.tau_groups["norm"] is None  # norms are not decayed
  for g in ("embed", "hidden", "unembed"):
    assert r.tau_groups[g] == pytest.approx(r.tau)
  assert r.weight_decay_groups["embed"] == pytest.approx(r.weight_decay * 256 / 32)
  paper = resolve(recipes.configure("celerity_long_1", []), 1)
  assert paper.tau_groups["embed"] == pytest.approx(r.tau * 256 / 32)  # the paper's convention
  params = {"w": jnp.full((3,), 2.0), "e": jnp.full((3,), 2.0), "g": jnp.full((3,), 2.0)}
  groups = {"w": "hidden", "e": "embed", "g": "norm"}
  opt = make_optimizer(OptimConfig(schedule="constant"), r, groups)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params, r.warmup_steps + 1)
  shrink = r.eta_hidden * r.weight_decay * 2.0
  np.testing.assert_allclose(updates["w"], -shrink, rtol=1e-5)
  np.testing.assert_allclose(updates["e"], -shrink, rtol=1e-5)
  np.testing.assert_array_equal(updates["g"], 0.0)


def test_decay_mask_and_group_learning_rates():
  params = {"w": jnp.full((3,), 2.0), "e": jnp.full((3,), 2.0), "g": jnp.full((3,), 2.0)}
  groups = {"w": "hidden", "e": "embed", "g": "norm"}
  opt = make_optimizer(OptimConfig(schedule="constant"), FakeResolved, groups)
  state = opt.init(params)
  # zero gradients: Adam's direction is 0, so the update is the coupled decay -eta_g * lambda *
  # theta
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, state, params, 5)
  np.testing.assert_allclose(updates["w"], -0.01 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["e"], -0.04 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["g"], 0.0)  # norms are not decayed
  # a gradient step: Adam's first update has magnitude ~1, scaled by the group's peak LR
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = opt.update(ones, state, params, 5)
  np.testing.assert_allclose(updates["g"], -0.04, rtol=1e-5)
  np.testing.assert_allclose(updates["w"], -0.01 * (1 + 0.5 * 2.0), rtol=1e-5)
  assert float(opt.lr(5)) == pytest.approx(0.01)
  # the schedule is read at the step passed in: under linear D2Z the update at T is exactly zero
  linear = make_optimizer(OptimConfig(schedule="linear"), FakeResolved, groups)
  np.testing.assert_array_equal(linear.update(ones, state, params, 100)[0]["w"], 0.0)
  assert float(linear.lr(50)) == pytest.approx(0.005)


def test_global_norm_clipping_rescales_the_gradient_adam_sees():
  """With b1 = b2 = 0 and eps = 1, Adam's update is g / (|g| + 1): it depends on the gradient's
  scale, so it shows whether the gradient was clipped to global norm 1 before Adam saw it."""
  params = {"w": jnp.zeros((2,)), "v": jnp.zeros((2,))}
  groups = {"w": "norm", "v": "norm"}
  grads = {"w": jnp.asarray([300.0, -400.0]), "v": jnp.asarray([0.0, 0.0])}  # global norm 500

  def update(clip_norm, grads):
    opt = make_optimizer(
      OptimConfig(schedule="constant", clip_norm=clip_norm, b1=0.0, b2=0.0, eps=1.0),
      FakeResolved,
      groups,
    )
    return opt.update(grads, opt.init(params), params, 0)[0]["w"] / -0.04  # Adam's direction

  clipped = np.asarray([0.6, -0.8])  # 1/500 of g
  np.testing.assert_allclose(update(1.0, grads), clipped / (np.abs(clipped) + 1), rtol=1e-5)
  np.testing.assert_allclose(update(0.0, grads), [300 / 301, -400 / 401], rtol=1e-5)  # off
  small = {"w": jnp.asarray([0.3, -0.4]), "v": jnp.asarray([0.0, 0.0])}  # norm 0.5 < 1: as is
  np.testing.assert_allclose(update(1.0, small), [0.3 / 1.3, -0.4 / 1.4], rtol=1e-5)
