"""What a person sees of a run: the console's compile line and closing summary, the readers of a
run directory as a crash leaves it (a torn or garbled metrics line), predictions from an early
stop, and the one-run collapse figure."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import SMALL

from celerity_jax.collapse import curves
from celerity_jax.main import main
from celerity_jax.metrics import peak_flops


def args(run_dir, *extra):
  return ["recipe=celerity_tiny", *SMALL, f"run.dir={run_dir}", "run.log_every=1", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("finished") / "run"
  assert main(args(run_dir, "checkpoint.every_steps=20")) == 0
  return run_dir


def test_the_console_says_when_it_compiles_and_sums_up_the_run(tmp_path, capsys):
  assert main(args(tmp_path / "run", "run.progress=true", "train.eval_every=20")) == 0
  err = capsys.readouterr().err
  assert "celerity_jax: compiling the train step (mesh data" in err and "compiled in" in err
  summary = err[err.index("celerity_jax: done at step 40 of T=40") :]
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if "event" not in r][-1]
  assert f"final loss {last['loss']:.4f} (smoothed {last['loss_smooth']:.4f})" in summary
  assert f"held-out {last['eval_loss']:.4f}" in summary
  predicted = last["final_loss_estimate"]
  assert f"predicted L(T) {predicted:.4f}, reached {last['loss_smooth']:.4f}" in summary
  alerts = [r for r in rows if r.get("event") == "collapse_alert"]
  assert (
    f"collapse alerts: {len(alerts)}, the first at step {alerts[0]['step']}" if alerts else "none"
  ) in summary
  assert f"checkpoint: {tmp_path / 'run'}/checkpoints/40" in summary
  for tool in ("sample", "plot_collapse", "predict"):
    assert f"python -m celerity_jax.commands.{tool} {tmp_path / 'run'}" in summary
  assert "mfu" not in last  # no known peak for a CPU: no made-up MFU


def test_mfu_uses_the_devices_peak():
  assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5p") == 459e12
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H200") == 989e12
  assert peak_flops("cpu") is None


def damage(run_dir):
  """What a crash can leave: a line cut short at the end, and a garbled one in the middle."""
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  lines.insert(len(lines) // 2, '{"step": 7, "loss": "x\x00\x00')
  (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 41, "lo')


def test_readers_take_a_run_as_a_crash_leaves_it(finished, tmp_path, capsys):
  import shutil

  from celerity_jax.commands import plot_collapse, predict

  run_dir = tmp_path / "run"
  shutil.copytree(finished, run_dir)
  damage(run_dir)
  curve = curves.load_run(run_dir)
  assert len(curve.t_hat) == 40 and curve.finished
  assert "skipped 2 unreadable line(s)" in capsys.readouterr().err
  for stop, window in (("0.1", [0.05, 0.1]), ("0.2", [0.1, 0.2]), ("0.3", [0.2, 0.3])):
    predict.main([str(run_dir), "--stop", stop])
    out = json.loads(capsys.readouterr().out)
    assert out["window_t"] == pytest.approx(window) and np.isfinite(out["predicted_final"])
  assert plot_collapse.main([str(run_dir), "--out", str(tmp_path / "c.png")]) is None
  assert (tmp_path / "c.png").stat().st_size > 20_000
  # and a run that takes it as its collapse reference
  assert main(args(tmp_path / "next", f"collapse.reference={run_dir}", "train.stop_step=5")) == 0


def test_one_runs_figure_shows_the_residual_where_it_matters(finished):
  from celerity_jax.commands.plot_collapse import figure

  curve = curves.load_run(finished)
  fig = figure({"run": [curve]}, reference="surrogate")
  titles = [ax.get_title() for ax in fig.axes]
  assert len(fig.axes) == 3 and not any("spread" in t for t in titles)  # no empty panel
  normalized, residual = fig.axes[1], fig.axes[2]
  assert any("reference (surrogate)" in line.get_label() for line in normalized.get_lines())
  assert residual.get_xlim() == (0.2, 1.0)
  levels = sorted(
    line.get_ydata()[0] for line in residual.get_lines() if "threshold" in line.get_label()
  )
  assert levels == [0.04]  # (the -0.04 line is the same threshold, unlabelled)
  monitor = [x for x in residual.get_lines() if "monitor" in x.get_label()]
  assert monitor and np.nanmin(monitor[0].get_xdata()) >= 0.2
  seed = dataclasses.replace(
    curve, seed=1, loss_smooth=curve.loss_smooth * (1 + 0.01 * curve.t_hat)
  )
  two = figure({"run": [curve, seed]}, reference="none")
  assert [ax.get_title().split(": ")[1] for ax in two.axes] == [
    "raw curves",
    "normalized",
    "spread",
  ]
