"""Reliability as a user meets it: damaged checkpoints fall back to the previous complete step
(run and export), a torn metrics.jsonl is recovered, and signals during start-up exit cleanly."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import CACHE, SMALL, small_config
from test_checkpoint import assert_trees_equal, final_params, losses

from celerity_jax.checkpoint import Checkpointer
from celerity_jax.main import main

EVERY = 4


def cli(run_dir, stop, *extra):
  return [
    "recipe=celerity_tiny",
    *SMALL,
    f"run.dir={run_dir}",
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.keep=5",
    "run.log_every=1",
    f"train.stop_step={stop}",
    *extra,
  ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run to step 12 and one stopped at step 8 (checkpoints at 4 and 8)."""
  root = tmp_path_factory.mktemp("runs")
  assert main(cli(root / "full", 12)) == 0
  assert main(cli(root / "stopped", 8)) == 0
  return root / "full", root / "stopped"


def data_files(step_dir):
  return sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


DAMAGE = {
  "truncated array files": lambda d: [truncate(f) for f in data_files(d)],
  "deleted array file": lambda d: data_files(d)[-1].unlink(),
  "emptied OCDBT manifest": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b""),
  "torn checkpoint metadata": lambda d: truncate(d / "meta" / "metadata"),
  "torn array metadata": lambda d: truncate(d / "state" / "_METADATA"),
  "deleted array metadata": lambda d: (d / "state" / "_METADATA").unlink(),
}


def snapshot(root):
  return {
    p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_resumes_bit_identically(
  damage, runs, tmp_path, capsys
):
  full, stopped = runs
  run = tmp_path / "run"
  shutil.copytree(stopped, run)
  DAMAGE[damage](run / "checkpoints" / "8")
  capsys.readouterr()
  assert main(cli(run, 12)) == 0
  err = capsys.readouterr().err
  assert f"checkpoint {run / 'checkpoints' / '8'} is damaged" in err, err
  assert "resumed from step 4" in err and "Traceback" not in err
  assert (run / "checkpoints" / "8.damaged").is_dir()  # set aside, not deleted
  assert losses(run) == losses(full)  # steps 5..12 recomputed exactly
  assert_trees_equal(final_params(run, 12), final_params(full, 12))
  ckpt = Checkpointer(run / "checkpoints", small_config().checkpoint)
  assert ckpt.steps() == [12, 8, 4]  # step 8 was saved again
  ckpt.close()
  assert main(cli(run, 12)) == 0  # and a later start is quiet
  assert "damaged" not in capsys.readouterr().err


def test_no_usable_checkpoint_exits_6_and_moves_nothing(runs, tmp_path, capsys):
  _, stopped = runs
  run = tmp_path / "run"
  shutil.copytree(stopped, run)
  DAMAGE["truncated array files"](run / "checkpoints" / "8")
  DAMAGE["emptied OCDBT manifest"](run / "checkpoints" / "4")
  before = snapshot(run)
  capsys.readouterr()
  assert main(cli(run, 12)) == 6
  err = capsys.readouterr().err.splitlines()
  assert err[-1].startswith("checkpoint error: no usable checkpoint") and "step 4" in err[-1]
  assert snapshot(run) == before


def export(run, *args):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(CACHE)}
  return subprocess.run(
    [sys.executable, "-m", "celerity_jax.commands.export", str(run), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )


def test_export_falls_back_past_a_damaged_step_and_refuses_it_by_name(runs, tmp_path):
  _, stopped = runs
  run = tmp_path / "run"
  shutil.copytree(stopped, run)
  DAMAGE["deleted array file"](run / "checkpoints" / "8")
  before = snapshot(run)
  done = export(run, "--out", str(tmp_path / "p.npz"))
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout)["step"] == 4 and "checkpoint" in done.stderr
  assert "Traceback" not in done.stderr
  exported = np.load(tmp_path / "p.npz")
  np.testing.assert_array_equal(exported["embed"], np.asarray(final_params(stopped, 4)["embed"]))
  config = json.loads((tmp_path / "p.config.json").read_text())
  assert config["config"]["model"]["d_model"] == 32
  refused = export(run, "--step", "8", "--out", str(tmp_path / "q.npz"))
  assert refused.returncode == 6 and "Traceback" not in refused.stderr
  assert refused.stderr.splitlines()[-1].startswith("checkpoint error: no usable checkpoint")
  assert snapshot(run) == before  # export reads, never moves or deletes


def test_torn_metrics_and_rows_after_the_checkpoint_are_recovered(runs, tmp_path, capsys):
  full, stopped = runs
  run = tmp_path / "run"
  shutil.copytree(stopped, run)
  with open(run / "metrics.jsonl", "ab") as f:  # what a crash after step 8 can leave
    f.write(json.dumps({"step": 9, "loss": 1.0}).encode() + b"\n")
    f.write(json.dumps({"event": "loss_spike", "step": 10}).encode() + b"\n")
    f.write(b"\xff\xfe not utf-8\n")
    f.write(b'{"step": 11, "loss": 2.')  # torn mid-write, no newline
  capsys.readouterr()
  assert main(cli(run, 12)) == 0
  err = capsys.readouterr().err
  assert "dropped 2 unreadable line(s)" in err and "Traceback" not in err
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert losses(run) == losses(full)
  assert not any(r.get("event") == "loss_spike" and r["step"] == 10 for r in rows)
  assert [r["step"] for r in rows if "event" not in r] == list(range(1, 13))


def start(run_dir, cache=CACHE):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(
    [sys.executable, "-m", "celerity_jax.main", *cli(run_dir, 40)],
    env=env,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_imports_exits_cleanly_with_one_line(sig, tmp_path):
  proc = start(tmp_path / "run")
  try:
    proc.wait(timeout=0.5)  # still importing jax
  except subprocess.TimeoutExpired:
    pass
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert err.splitlines() == [
    f"celerity_jax: signal {sig} before the first step: nothing to save "
    "(a resume starts from the last checkpoint, if any); run the same "
    "command to start again"
  ]
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_signal_during_compile_does_not_wait_for_it(tmp_path):
  """The N= line comes just before the first step compiles; a signal then exits at once, or (if
  the compile was already done) saves at the next step: never a traceback, never lost state."""
  proc = start(tmp_path / "run", cache=tmp_path / "empty_cache")  # a real compile
  lines = []
  for line in proc.stderr:
    lines.append(line.rstrip("\n"))
    if line.startswith("celerity_jax: N="):
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.communicate(timeout=120)[1].splitlines()
  assert proc.returncode == 0, lines
  assert not any("Traceback" in line for line in lines)
  assert "before the first step: nothing to save" in lines[-1] or "checkpoint saved" in lines[-1], (
    lines
  )
