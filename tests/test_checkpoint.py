"""Checkpoints: round trip, exact resume after SIGKILL, SIGTERM, incomplete saves, config changes,
resharding, non-finite steps and export."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CACHE, SMALL, small_config

from celerity_jax import sharding
from celerity_jax.checkpoint import Checkpointer
from celerity_jax.collapse.monitor import build_spec
from celerity_jax.data.synthetic import SyntheticTokens, placed_batches
from celerity_jax.main import main
from celerity_jax.resolve import resolve
from celerity_jax.train import events, loop
from celerity_jax.train import state as state_lib
from celerity_jax.train import step as step_lib

MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def build(cfg, n_devices=8):
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:n_devices])
  setup = state_lib.build(cfg, resolve(cfg, n_devices), mesh)
  return mesh, setup


abstract = state_lib.abstract_state


def trained_state(cfg, steps=3):
  mesh, setup = build(cfg)
  resolved = resolve(cfg, len(mesh.devices.flat))
  spec = build_spec(cfg, resolved)
  state, train_step = setup.init(), step_lib.make_train_step(setup, cfg, resolved, mesh, spec)
  for batch in placed_batches(cfg, resolved, mesh, steps):
    state, _ = train_step(state, batch)
  return state


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip_is_bit_equal_and_reshards(tmp_path):
  cfg = small_config(*MESH_222)
  state = trained_state(cfg)
  ckpt = Checkpointer(tmp_path / "ck", cfg.checkpoint)
  ckpt.save(3, state, {"note": "x"})
  ckpt.wait()
  _, setup = build(cfg)
  assert_trees_equal(ckpt.restore(3, abstract(setup)), state)
  assert ckpt.meta(3)["note"] == "x"
  # onto another mesh shape and device count: 8 devices as 2x2x2 -> 4 devices as 4x1x1
  four = small_config("mesh.data=4")
  _, setup4 = build(four, n_devices=4)
  restored = ckpt.restore(3, abstract(setup4))
  assert_trees_equal(restored, state)
  assert restored.params["embed"].sharding.mesh.devices.size == 4
  ckpt.close()


def test_incomplete_checkpoint_is_ignored_with_a_warning(tmp_path, capsys):
  cfg = small_config()
  state = trained_state(small_config(*MESH_222), steps=1)
  ckpt = Checkpointer(tmp_path / "ck", cfg.checkpoint)
  ckpt.save(5, state, {})
  ckpt.save(10, state, {}, force=True)
  ckpt.close()
  # a save killed midway leaves a temporary directory, never a finalized step
  os.rename(tmp_path / "ck" / "10", tmp_path / "ck" / "10.orbax-checkpoint-tmp-1234")
  ckpt = Checkpointer(tmp_path / "ck", cfg.checkpoint)
  assert ckpt.latest() == 5
  assert "ignoring incomplete checkpoint" in capsys.readouterr().err
  ckpt.close()


def cli(run_dir, *extra):
  return [
    "recipe=celerity_tiny",
    *SMALL,
    f"run.dir={run_dir}",
    "checkpoint.every_steps=5",
    "run.log_every=1",
    *extra,
  ]


def subprocess_env():
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}


def losses(run_dir):
  """Per step: the loss and the collapse monitor's outputs (its state is checkpointed too)."""
  rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [
    (
      r["step"],
      r["loss"],
      r["loss_smooth"],
      r.get("collapse_residual"),
      r.get("final_loss_estimate"),
    )
    for r in rows
    if "event" not in r
  ]


def final_params(run_dir, step):
  ckpt = Checkpointer(run_dir / "checkpoints", small_config().checkpoint)
  _, setup = build(small_config())
  params = ckpt.restore(step, abstract(setup)).params
  ckpt.close()
  return params


def wait_for_step(run_dir, step, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (run_dir / "metrics.jsonl").exists() and any(row[0] >= step for row in losses(run_dir)):
      return
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.05)
  raise TimeoutError(step)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  assert main(cli(full)) == 0
  proc = subprocess.Popen(
    [sys.executable, "-m", "celerity_jax.main", *cli(killed)],
    env=subprocess_env(),
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_step(killed, random.Random(0).randint(12, 25), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert main(cli(killed)) == 0  # same command, same run.dir: resumes
  assert losses(killed) == losses(full)  # every logged loss, bit for bit
  assert losses(full)[-1][3] is not None  # the monitor aligned across the restart
  steps = losses(full)[-1][0]
  assert_trees_equal(final_params(killed, steps), final_params(full, steps))
  events = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
  assert [e["restarts"] for e in events if e.get("event") == "restart"] == [1]


def test_sigterm_saves_a_committed_checkpoint_and_exits_cleanly(tmp_path):
  run_dir = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-m", "celerity_jax.main", *cli(run_dir, "checkpoint.every_steps=1000")],
    env=subprocess_env(),
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_step(run_dir, 8, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "checkpoint saved" in err
  events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  stopped = [e for e in events if e.get("event") == "preempted"][0]["step"]
  ckpt = Checkpointer(run_dir / "checkpoints", small_config().checkpoint)
  assert ckpt.latest() == stopped and not ckpt.incomplete()
  ckpt.close()


def test_a_batch_law_run_resumes_on_another_device_count_with_its_own_batch(tmp_path, capsys):
  """The batch law rounds B to the data-parallel size: 176 sequences on 8 devices, 180 on 4. A
  resumed run keeps the checkpoint's B (it is part of the trajectory), so 8 -> 4 devices resumes
  and follows the uninterrupted run; 6 devices cannot split 176 and are refused, naming why."""
  law = ["train.batch_size=0", "scaling.tpp=2"]
  full, moved = tmp_path / "full", tmp_path / "moved"
  assert main(cli(full, *law)) == 0
  assert main(cli(moved, *law, "train.stop_step=5")) == 0
  derived = json.loads((full / "config.json").read_text())["derived"]
  assert (derived["batch_seqs"], derived["steps"], derived["data_parallel"]) == (176, 15, 8)

  def on_devices(n):
    env = {**subprocess_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    return subprocess.run(
      [sys.executable, "-m", "celerity_jax.main", *cli(moved, *law)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )

  refused = on_devices(6)
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert "the checkpoint's batch of 176 sequences does not split over data-parallel size 6" in (
    refused.stderr
  )
  resumed = on_devices(4)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step 5" in resumed.stderr
  derived = json.loads((moved / "config.json").read_text())["derived"]
  assert (derived["batch_seqs"], derived["steps"], derived["data_parallel"]) == (176, 15, 4)
  ran, reference = losses(moved), losses(full)
  assert [r[0] for r in ran] == [r[0] for r in reference] == list(range(1, 16))
  np.testing.assert_allclose([r[1] for r in ran], [r[1] for r in reference], rtol=1e-5)


def test_config_change_is_refused_unless_allowed(tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert main(cli(run_dir, "train.stop_step=5")) == 0
  capsys.readouterr()
  assert main(cli(run_dir, "train.stop_step=10", "optim.lr_base=0.02")) == 2
  err = capsys.readouterr().err
  assert "optim.lr_base" in err and "derived.lr_peak" in err and "allow_config_change" in err
  # stopping later is not a trajectory change
  assert main(cli(run_dir, "train.stop_step=10")) == 0
  assert (
    main(
      cli(
        run_dir, "train.stop_step=12", "optim.lr_base=0.02", "checkpoint.allow_config_change=true"
      )
    )
    == 0
  )
  events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  restarts = [e for e in events if e.get("event") == "restart"]
  assert restarts[-1]["step"] == 10 and "optim.lr_base" in restarts[-1]["config_changes"]
  code = main(
    cli(run_dir, "train.stop_step=14", "model.d_ff=64", "checkpoint.allow_config_change=true")
  )
  err = capsys.readouterr().err
  assert code == 2 and "blocks/mlp/wi" in err and "does not fit this model" in err


@pytest.fixture
def poisoned_steps(monkeypatch):
  """Makes the loss NaN on chosen steps: the data zeroes row 0 there, the loss checks for it."""
  steps = set()
  real_batch, real_loss = SyntheticTokens.batch, step_lib.make_loss_fn

  def batch(self, step):
    out = real_batch(self, step)
    if step in steps:
      out = {k: v.copy() for k, v in out.items()}
      out["inputs"][0] = 0
    return out

  def make_loss_fn(setup, cfg, mesh=None):
    loss_fn = real_loss(setup, cfg, mesh)

    def poisoned(params, batch):
      total, aux = loss_fn(params, batch)
      nan = jnp.where(jnp.all(batch["inputs"][0] == 0), jnp.nan, 0.0)
      return total + nan, {**aux, "ce": aux["ce"] + nan}

    return poisoned

  monkeypatch.setattr(SyntheticTokens, "batch", batch)
  monkeypatch.setattr(step_lib, "make_loss_fn", make_loss_fn)
  return steps


def test_nonfinite_skip_leaves_the_state_untouched(tmp_path, poisoned_steps):
  poisoned_steps.update({6, 7})  # steps 7 and 8 (1-based) are poisoned
  loop.run(small_config(f"run.dir={tmp_path}", "run.log_every=1", "train.stop_step=12"))
  rows = {
    r["step"]: r
    for r in (json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
    if "event" not in r
  }
  assert [rows[s]["nonfinite"] for s in (6, 7, 8, 9)] == [0, 1, 1, 0]
  assert rows[8]["param_norm"] == rows[7]["param_norm"] == rows[6]["param_norm"]
  assert rows[12]["skipped_steps"] == 2 and np.isfinite(rows[12]["loss"])


@pytest.mark.parametrize("policy, poison, halted_at", [("halt", {6}, 7), ("skip", {4, 5, 6, 7}, 7)])
def test_nonfinite_halt_writes_diagnostics(tmp_path, poisoned_steps, policy, poison, halted_at):
  poisoned_steps.update(poison)
  cfg = small_config(
    f"run.dir={tmp_path}",
    f"train.on_nonfinite={policy}",
    "train.max_bad_steps=3",
    "train.stop_step=12",
  )
  with pytest.raises(events.RunHalted) as halted:
    loop.run(cfg)
  assert halted.value.code == 4
  assert json.loads((tmp_path / "diagnostics.json").read_text())["step"] == halted_at


def test_export_reads_back_without_celerity_jax(tmp_path):
  run_dir = tmp_path / "run"
  assert main(cli(run_dir, "train.stop_step=5")) == 0
  out = tmp_path / "export" / "p.npz"
  subprocess.run(
    [sys.executable, "-m", "celerity_jax.commands.export", str(run_dir), "--out", str(out)],
    check=True,
    env=subprocess_env(),
    capture_output=True,
  )
  code = (
    "import numpy, json, sys; a = numpy.load(sys.argv[1]); "
    "print(json.dumps({k: a[k].tolist() for k in a.files}))"
  )
  exported = json.loads(
    subprocess.run(
      [sys.executable, "-S", "-c", code, str(out)],
      capture_output=True,
      text=True,
      env={"PYTHONPATH": os.path.dirname(np.__path__[0])},
    ).stdout
  )
  params = final_params(run_dir, 5)
  np.testing.assert_array_equal(
    np.asarray(exported["blocks/attn/wq"]), np.asarray(params["blocks"]["attn"]["wq"])
  )
  assert set(exported) == {"/".join(p) for p in _paths(params)}
  assert json.loads((out.parent / "p.config.json").read_text())["config"]["model"]["d_model"] == 32


def _paths(tree, prefix=()):
  for k, v in tree.items():
    yield from (_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)])
