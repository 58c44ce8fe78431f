"""Training: the loop's outputs, loss falling on a 2x2x2 mesh, mesh-independence, accumulation."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from celerity_jax import sharding
from celerity_jax.data.synthetic import placed_batches
from celerity_jax.resolve import resolve
from celerity_jax.train import loop
from celerity_jax.train import state as state_lib
from celerity_jax.train.step import prepare_training

MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def read_metrics(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


def test_loop_on_2x2x2_mesh_lowers_loss_and_writes_the_run_directory(small, tmp_path):
  cfg = small(*MESH_222, f"run.dir={tmp_path}", "run.log_every=5", "run.tensorboard=true")
  last = loop.run(cfg)
  rows, events = read_metrics(tmp_path)
  described = json.loads((tmp_path / "config.json").read_text())
  steps = described["derived"]["steps"]
  assert described["config"]["mesh"] == {
    "data": 2,
    "fsdp": 2,
    "tensor": 2,
    "expert": 1,
    "slices": 1,
  }
  assert events[0]["event"] == "start" and events[0]["tau_groups"]["norm"] is None
  assert rows[-1] == last and last["step"] == steps and last["frac"] == 1.0
  assert [r["step"] for r in rows] == [1] + list(range(5, steps + 1, 5)) + (
    [steps] if steps % 5 else []
  )
  for key in ("step", "tokens", "frac", "loss", "lr", "grad_norm", "param_norm", "tokens_per_s"):
    assert key in last
  assert last["tokens"] == steps * described["derived"]["batch_tokens"]
  assert last["loss"] < rows[0]["loss"] - 1.0  # learns the synthetic chain
  assert last["lr"] < 0.05 * described["derived"]["eta_hidden"]  # decayed to ~0 at T
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_stop_frac_ends_early_without_changing_the_horizon(small, tmp_path):
  full = resolve(small(), 8)
  cfg = small(f"run.dir={tmp_path}", "train.stop_frac=0.25")
  last = loop.run(cfg)
  assert json.loads((tmp_path / "config.json").read_text())["derived"]["steps"] == full.steps
  assert last["step"] == int(np.ceil(0.25 * full.steps))
  assert last["frac"] == pytest.approx(last["step"] / full.steps)
  assert last["lr"] > 0.5 * full.eta_hidden  # still high: the schedule was not shortened


def test_same_seed_is_deterministic_and_seed_changes_the_run(small, tmp_path):
  losses = []
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    loop.run(
      small(
        f"run.dir={tmp_path / name}", f"train.seed={seed}", "train.stop_step=3", "run.log_every=1"
      )
    )
    losses.append([r["loss"] for r in read_metrics(tmp_path / name)[0]])
  assert losses[0] == losses[1]
  assert losses[0] != losses[2]


def run_steps(cfg, n_devices, n_steps):
  resolved = resolve(cfg, n_devices)
  training = prepare_training(cfg, resolved, jax.devices()[:n_devices])
  state = training.setup.init()
  losses = []
  for batch in placed_batches(cfg, resolved, training.mesh, n_steps):
    state, metrics = training.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def test_one_device_and_eight_device_mesh_agree(small):
  losses_1, params_1 = run_steps(small(), 1, 4)
  losses_8, params_8 = run_steps(small(*MESH_222), 8, 4)
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
  # summation order differs across meshes; Adam's 1/sqrt(v) turns that rounding into up to ~1e-3
  # of one update (lr ~ 1e-2) on near-zero-gradient elements (as in the accumulation test below)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_8, params_1
  )


def test_gradient_accumulation_equals_the_big_batch_update(small):
  from celerity_jax.train.step import _accumulate, forward_on, make_eval_step, make_loss_fn

  big_cfg, acc_cfg = small(*MESH_222), small(*MESH_222, "train.microbatches=4")
  mesh = sharding.make_mesh(big_cfg.mesh)
  setup = state_lib.build(big_cfg, resolve(big_cfg, 8), mesh)
  state = setup.init()
  [batch] = placed_batches(big_cfg, resolve(big_cfg, 8), mesh)
  loss_fn = make_loss_fn(setup, big_cfg, forward_on(resolve(big_cfg, 8), big_cfg, None))
  grads = {
    m: jax.jit(lambda p, b, m=m: _accumulate(loss_fn, p, b, m, mesh))(state.params, batch)
    for m in (1, 4)
  }
  np.testing.assert_allclose(grads[4][0]["ce"], grads[1][0]["ce"], rtol=1e-6)  # loss
  # on a mesh that only splits the batch, each device accumulates its own rows: the same gradient
  from celerity_jax.execution import accumulates_per_device
  from celerity_jax.train.step import _accumulate_per_device

  dp_cfg = small("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")
  dp_mesh = sharding.make_mesh(dp_cfg.mesh)
  assert accumulates_per_device(3, dict(dp_mesh.shape))
  assert not accumulates_per_device(3, dict(mesh.shape))
  dp_setup = state_lib.build(dp_cfg, resolve(dp_cfg, 8), dp_mesh)
  dp_state = dp_setup.init()
  [dp_batch] = placed_batches(dp_cfg, resolve(dp_cfg, 8), dp_mesh)
  dp_resolved = resolve(dp_cfg, 8)
  local_loss = make_loss_fn(dp_setup, dp_cfg, forward_on(dp_resolved, dp_cfg, None))
  per_device = jax.jit(lambda p, b: _accumulate_per_device(local_loss, p, b, 2, dp_mesh))(
    dp_state.params, dp_batch
  )
  in_loop = jax.jit(
    lambda p, b: _accumulate(
      make_loss_fn(dp_setup, dp_cfg, forward_on(dp_resolved, dp_cfg, dp_mesh)), p, b, 2, dp_mesh
    )
  )(dp_state.params, dp_batch)
  np.testing.assert_allclose(per_device[0]["ce"], in_loop[0]["ce"], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
    per_device[1],
    in_loop[1],
  )
  # the held-out loss runs over the same microbatches and is the same mean
  planned = lambda m: dataclasses.replace(resolve(big_cfg, 8), microbatches=m)  # noqa: E731
  evals = {
    m: float(make_eval_step(setup, big_cfg, planned(m), mesh)(state.params, batch)) for m in (1, 4)
  }
  np.testing.assert_allclose(evals[4], evals[1], rtol=1e-6)
  np.testing.assert_allclose(evals[1], grads[1][0]["ce"], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
    grads[4][1],
    grads[1][1],
  )
  # and through the whole step: Adam divides by sqrt(v), so elements with near-zero gradients turn
  # summation-order rounding into differences of a few 1e-3 of one update (lr ~ 1e-2; 1.25e-5 seen
  # on one CPU, whose fusions sum in another order): bound that.
  big_losses, big = run_steps(big_cfg, 8, 2)
  acc_losses, acc = run_steps(acc_cfg, 8, 2)
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5), acc, big)
