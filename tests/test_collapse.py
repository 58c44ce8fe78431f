"""Collapse: monitor math against numpy, alerts and spikes, surrogate fit, final-loss prediction,
reference runs end to end, halt policy, and the sweep tool."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL

from celerity_jax.collapse import curves, monitor, predict, surrogate
from celerity_jax.collapse.curves import Curve
from celerity_jax.main import main

TRUE = surrogate.Constants(0.4, -0.6, 1.2, -0.15)


def synthetic(T=400, tau=0.175, tpp=20.0, final=3.0, noise=0.0, seed=0, smooth_frac=0.02):
  """A raw per-step loss curve shaped by the surrogate (unsmoothed), optionally noisy."""
  t, lr = surrogate.model_grid(T, 0, "linear")  # no warmup: the loss falls from the start
  raw = surrogate.g(t, lr, TRUE.b_c * tau**TRUE.b_e, TRUE.q_c * tpp**TRUE.q_e)
  raw = final * raw / raw[-1]
  rng = np.random.default_rng(seed)
  return t, raw * (1 + noise * rng.standard_normal(T))


def spec_for(T, ref_t, ref_l, threshold=0.01, patience=5, smooth_frac=0.02):
  return monitor.MonitorSpec(
    T,
    curves.ema_decay(smooth_frac, 1 / T),
    0.25,
    0.5,
    threshold,
    patience,
    1.2,
    ref_t,
    ref_l,
    "test",
  )


def run_monitor(spec, losses):
  """The monitor over a loss sequence in one jitted scan, as the train step calls it."""

  def body(state, xs):
    loss, step = xs
    return monitor.update(spec, state, loss, step, jnp.isfinite(loss))

  steps = jnp.arange(1, len(losses) + 1)
  _, metrics = jax.jit(lambda xs: jax.lax.scan(body, monitor.init_state(), (xs, steps)))(
    jnp.asarray(losses, jnp.float32)
  )
  return {k: np.asarray(v) for k, v in metrics.items()}


def test_the_three_smoothings_agree():
  """The loss a run logs (the in-step monitor, float32), the offline curve smoothing (float64) and
  the surrogate's traced smoothing (what fits and references use) are the same debiased EMA: what
  a run logs is what a later run compares against."""
  T, smooth_frac = 300, 0.02
  t, raw = synthetic(T, noise=0.05, seed=3)
  logged = run_monitor(spec_for(T, None, None, smooth_frac=smooth_frac), raw)["loss_smooth"]
  decay = curves.ema_decay(smooth_frac, 1 / T)
  offline = curves.ema(raw, decay)
  traced = np.asarray(surrogate._ema_last_axis(jnp.asarray(raw, jnp.float32), decay))
  np.testing.assert_allclose(logged, offline, rtol=2e-6)
  np.testing.assert_allclose(traced, offline, rtol=2e-6)
  assert offline[0] == pytest.approx(raw[0], rel=1e-12)  # debiased: no zero start


def numpy_monitor(T, losses, ref_t, ref_l, threshold, patience, smooth_frac=0.02):
  """A plain re-implementation of docs/method.md section 6, step by step."""
  d = np.exp(-1 / (smooth_frac * T))
  m = w = s_ll = s_lr = 0.0
  over, out = 0, []
  for i, loss in enumerate(losses, start=1):
    m, w = d * m + (1 - d) * loss, d * w + (1 - d)
    smooth, t = m / w, i / T
    ref = np.interp(t, ref_t, ref_l)
    if 0.25 <= t <= 0.5:
      s_ll, s_lr = s_ll + smooth**2, s_lr + smooth * ref
    estimate = s_ll / s_lr if t > 0.5 else 0.0
    residual = smooth / estimate - ref if t > 0.5 else 0.0
    over = over + 1 if t > 0.5 and abs(residual) > threshold else 0
    out.append((smooth, estimate, residual, over >= patience))
  return np.array(out)


def test_monitor_matches_numpy_reference_and_a_clean_run_never_alerts():
  T = 400
  t, losses = synthetic(T, noise=0.003)
  ref_t, ref_l = surrogate.normalized_curve(T, 0, "linear", 0.175, 20.0, TRUE, 0.02)
  got = run_monitor(spec_for(T, ref_t, ref_l), losses)
  want = numpy_monitor(T, losses, ref_t, ref_l, 0.01, 5)
  np.testing.assert_allclose(got["loss_smooth"], want[:, 0], rtol=2e-5)
  np.testing.assert_allclose(got["final_loss_estimate"], want[:, 1], rtol=2e-5)
  np.testing.assert_allclose(got["collapse_residual"], want[:, 2], atol=2e-5)
  assert (got["collapse_active"] == (t > 0.5)).all()
  assert got["collapse_alert"].sum() == 0 and got["loss_spike"].sum() == 0
  # the estimate, fixed at t = 0.5, is the final smoothed loss to within the noise
  assert abs(got["final_loss_estimate"][-1] / got["loss_smooth"][-1] - 1) < 0.004


def test_deviation_injected_at_0_6_alerts_within_a_few_percent_of_training():
  T = 1000
  t, losses = synthetic(T, noise=0.003)
  losses = np.where(t >= 0.6, losses * 1.04, losses)
  ref_t, ref_l = surrogate.normalized_curve(T, 0, "linear", 0.175, 20.0, TRUE, 0.02)
  got = run_monitor(spec_for(T, ref_t, ref_l), losses)
  first = t[np.argmax(got["collapse_alert"] > 0)]
  assert got["collapse_alert"][t < 0.6].sum() == 0
  assert 0.6 < first <= 0.63


def test_spike_flagged_and_nonfinite_steps_leave_the_state_alone():
  T = 200
  _, losses = synthetic(T)
  losses[120:130] *= 1.6
  losses[50] = np.nan
  got = run_monitor(spec_for(T, None, None), losses)
  assert set(got) == {"loss_smooth", "loss_spike"}
  spikes = np.flatnonzero(got["loss_spike"])
  assert spikes.size and spikes[0] >= 120 and spikes[-1] < 140
  assert got["loss_smooth"][50] == got["loss_smooth"][49]


def curve_from(t, loss_smooth, tau, tpp, T, name="c"):
  return Curve(name, T, T // 10, "linear", tau, tpp, 1000, 0, 0.02, t, loss_smooth, loss_smooth)


def test_surrogate_fit_recovers_known_constants():
  family = []
  for tau in (0.05, 0.15, 0.4):
    for tpp, T in ((10, 60), (80, 150)):
      t, ell = surrogate.normalized_curve(T, T // 10, "linear", tau, tpp, TRUE, 0.02)
      family.append(curve_from(t, 3.0 * ell, tau, tpp, T))
  fitted, objective = surrogate.fit(family)
  assert objective < 2e-4
  np.testing.assert_allclose(fitted, TRUE, rtol=0.05, atol=0.01)
  assert max(surrogate.mae(c, fitted) for c in family) < 5e-4


def test_prediction_recovers_the_final_loss_from_30_percent():
  T = 300
  t, ell = surrogate.normalized_curve(T, 30, "linear", 0.1, 40.0, TRUE, 0.02)
  noisy = 2.5 * ell * (1 + 0.002 * np.random.default_rng(1).standard_normal(T))
  partial = predict.truncate(curve_from(t, noisy, 0.1, 40.0, T), 0.3)
  assert partial.t_hat[-1] == pytest.approx(0.3)
  assert predict.predict_final_loss(partial, constants=TRUE) == pytest.approx(2.5, rel=0.003)
  # from 10% (the paper's earliest early stop) over t in [0.05, 0.1], and refused where the curve
  # has no point in its window
  early = predict.truncate(partial, 0.1)
  assert predict.predict_final_loss(early, constants=TRUE) == pytest.approx(2.5, rel=0.01)
  late = t >= 0.2
  logged_late = dataclasses.replace(
    partial,
    t_hat=partial.t_hat[late[: len(partial.t_hat)]],
    loss=partial.loss[late[: len(partial.t_hat)]],
    loss_smooth=partial.loss_smooth[late[: len(partial.t_hat)]],
  )
  with pytest.raises(ValueError, match=r"no logged points in t = \[0.075, 0.15\]"):
    predict.predict_final_loss(logged_late, stop=0.15, constants=TRUE)


def rows_of(run_dir):
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if "event" not in r]


def test_reference_run_end_to_end_residuals_and_halt_policy(small, tmp_path, capsys):
  base = [
    "run.log_every=1",
    "collapse.smooth_frac=0.05",
    "collapse.align_start=0.25",
    "collapse.align_end=0.5",
  ]
  ref_dir, run_dir, halt_dir = tmp_path / "ref", tmp_path / "run", tmp_path / "halt"
  args = ["recipe=celerity_tiny", *base]

  assert main([*args, *SMALL, f"run.dir={ref_dir}", "collapse.reference=none"]) == 0
  assert all("collapse_residual" not in r for r in rows_of(ref_dir))
  assert (
    main([*args, *SMALL, f"run.dir={run_dir}", "train.seed=1", f"collapse.reference={ref_dir}"])
    == 0
  )
  rows = rows_of(run_dir)
  T = json.loads((run_dir / "config.json").read_text())["derived"]["steps"]
  late = [r for r in rows if r["step"] / T > 0.5]
  assert late and all(
    {"collapse_residual", "collapse_alert", "final_loss_estimate"} <= set(r) for r in late
  )
  assert all("collapse_residual" not in r for r in rows if r["step"] / T <= 0.5)
  # offline: the same alignment from the logged smoothed losses gives the same numbers
  ref, run = curves.load_run(ref_dir), curves.load_run(run_dir)
  window = (run.t_hat >= 0.25) & (run.t_hat <= 0.5)
  ref_at = np.interp(run.t_hat, ref.t_hat, ref.normalized())
  estimate = predict.aligned_final_loss(run.loss_smooth[window], ref_at[window])
  assert late[-1]["final_loss_estimate"] == pytest.approx(estimate, rel=1e-4)
  assert late[-1]["collapse_residual"] == pytest.approx(
    run.loss_smooth[-1] / estimate - ref_at[-1], abs=1e-4
  )
  # the predict tool gives the same alignment over [0.2, 0.5]; a reference with other controls warns
  from celerity_jax.commands import predict as predict_tool

  capsys.readouterr()
  predict_tool.main([str(run_dir), "--stop", "0.5", "--reference", str(ref_dir)])
  printed = json.loads(capsys.readouterr().out)
  assert printed["predicted_final"] == pytest.approx(
    predict.predict_final_loss(run, stop=0.5, reference=ref)
  ) and printed["true_final"] == pytest.approx(run.final_loss)
  from celerity_jax.resolve import resolve

  other = small(*base, f"collapse.reference={ref_dir}", "optim.tau=0.5")
  monitor.build_spec(other, resolve(other))
  assert "trained with other controls (tau 0.5 vs" in capsys.readouterr().err
  # fit_surrogate writes constants the monitor can load, and says when b and q are not identifiable
  from tools import fit_surrogate

  fit_surrogate.main([str(ref_dir), str(run_dir), "--out", str(tmp_path / "fit.json")])
  assert "not separately identifiable" in capsys.readouterr().err
  fitted = surrogate.load_constants(str(tmp_path / "fit.json"))
  assert surrogate.mae(run, fitted) < 0.05
  # policy halt with a threshold nothing meets: checkpoint, diagnostics, exit 5
  capsys.readouterr()
  code = main(
    [
      *args,
      *SMALL,
      f"run.dir={halt_dir}",
      "train.seed=1",
      "collapse.threshold=1e-6",
      "collapse.patience=2",
      "collapse.policy=halt",
      f"collapse.reference={ref_dir}",
      "checkpoint.every_steps=0",
      "checkpoint.every_minutes=0",
    ]
  )
  assert code == 5
  assert "off the collapse reference" in capsys.readouterr().err
  diag = json.loads((halt_dir / "diagnostics.json").read_text())
  assert diag["cause"] == "collapse" and diag["step"] / T > 0.5
  saved = sorted(int(p.name) for p in (halt_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [diag["step"] + 1]


def test_bad_references_are_config_errors(small, tmp_path, capsys):

  unfinished = tmp_path / "unfinished"
  assert (
    main(
      [
        "recipe=celerity_tiny",
        *SMALL,
        f"run.dir={unfinished}",
        "train.stop_step=3",
        "collapse.reference=none",
        "run.log_every=1",
      ]
    )
    == 0
  )
  capsys.readouterr()
  for ref, message in (
    (tmp_path / "nowhere", "config.json: not found"),
    (unfinished, "run not finished"),
  ):
    assert (
      main(
        ["recipe=celerity_tiny", *SMALL, f"run.dir={tmp_path / 'x'}", f"collapse.reference={ref}"]
      )
      == 2
    )
    assert message in capsys.readouterr().err
  (tmp_path / "bad.json").write_text('{"constants": {"b_c": 1}}')
  assert (
    main(
      [
        "recipe=celerity_tiny",
        *SMALL,
        f"run.dir={tmp_path / 'y'}",
        f"collapse.surrogate={tmp_path / 'bad.json'}",
      ]
    )
    == 2
  )
  assert "collapse.surrogate" in capsys.readouterr().err
  assert main(["recipe=celerity_tiny", "collapse.align_start=0.6", "--print-config"]) == 2


def test_packaged_surrogate_constants_load_and_give_a_sane_curve():
  c = surrogate.load_constants()
  t, ell = surrogate.normalized_curve(108, 11, "linear", 0.175, 20.0, c, 0.02)
  assert ell[-1] == pytest.approx(1.0)
  assert np.all(np.diff(ell[t >= 0.2]) < 0.01)  # falls (up to EMA wiggle) to 1 at t = 1
  assert 1.1 < np.interp(0.2, t, ell) < 2.5


def test_plot_writes_a_png_with_spread_and_seed_noise(tmp_path):
  from celerity_jax.commands.plot_collapse import plot

  family = []
  for n, seed, scale in ((1000, 0, 1.0), (1000, 1, 1.01), (4000, 0, 0.99)):
    t, ell = surrogate.normalized_curve(100, 10, "linear", 0.175, 20.0, TRUE, 0.02)
    family.append(
      dataclasses.replace(curve_from(t, 3 * scale * ell, 0.175, 20.0, 100), n_params=n, seed=seed)
    )
  out = plot({"synthetic": family}, tmp_path / "c.png", reference="surrogate")
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_critical_batch_scan_holds_tau_and_tokens_and_resumes(tmp_path, capsys):
  from tools import critical_batch

  small = [a for a in SMALL if not a.startswith("train.batch_size")]
  argv = ["recipe=celerity_tiny", *small, "--batches", "8,16", "--out", str(tmp_path)]
  critical_batch.main(argv)
  report = json.loads((tmp_path / "celerity_tiny" / "report.json").read_text())
  rows = {r["batch_seqs"]: r for r in report["rows"]}
  assert abs(rows[8]["steps"] - 2 * rows[16]["steps"]) <= 1  # the same tokens in half the steps
  derived = {
    b: json.loads((tmp_path / "celerity_tiny" / f"b{b}_seed0" / "config.json").read_text())[
      "derived"
    ]
    for b in (8, 16)
  }
  # lambda moved with B (within the rounding of T to whole steps: 81 against 2 x 40 here)
  assert derived[8]["tau"] == pytest.approx(derived[16]["tau"], rel=0.02)
  assert derived[16]["weight_decay"] == pytest.approx(2 * derived[8]["weight_decay"], rel=0.02)
  best = min(r["final_loss_mean"] for r in rows.values())
  assert report["critical_batch_seqs"] == critical_batch.critical(
    [8, 16], [rows[8]["final_loss_mean"], rows[16]["final_loss_mean"]], 0.01
  )
  assert min(r["vs_best"] for r in rows.values()) == 0.0 and best > 0
  metrics = tmp_path / "celerity_tiny" / "b8_seed0" / "metrics.jsonl"
  before = metrics.stat().st_mtime_ns
  critical_batch.main(argv)  # a finished scan is reused, not retrained
  assert metrics.stat().st_mtime_ns == before
  assert "| 8 |" in capsys.readouterr().out


def test_critical_batch_is_the_largest_within_tolerance():
  from tools.critical_batch import critical

  assert critical([8, 16, 32, 64], [3.30, 3.28, 3.29, 3.40], 0.01) == 32
  assert critical([8, 16, 32, 64], [3.30, 3.28, 3.29, 3.40], 0.05) == 64
  assert critical([8, 16], [3.0, 3.5], 0.01) == 8


def test_sweep_grid_is_the_cartesian_product_of_the_settings_and_values():
  from celerity_jax.commands.sweep import expand

  assert expand([], ["optim.lr_base=0.1,0.2", "param.alpha_out=2,4"]) == [
    ["optim.lr_base=0.1", "param.alpha_out=2"],
    ["optim.lr_base=0.1", "param.alpha_out=4"],
    ["optim.lr_base=0.2", "param.alpha_out=2"],
    ["optim.lr_base=0.2", "param.alpha_out=4"],
  ]
  assert expand([["optim.tau=0.1"], ["optim.tau=0.3"]], ["train.seed=0,1"])[1:3] == [
    ["optim.tau=0.1", "train.seed=1"],
    ["optim.tau=0.3", "train.seed=0"],
  ]
  assert expand([["optim.tau=0.1"], ["optim.tau=0.3"]], []) == [
    ["optim.tau=0.1"],
    ["optim.tau=0.3"],
  ]
  for bad in ("optim.lr_base=0.1", "=0.1,0.2", "optim.lr_base"):
    with pytest.raises(ValueError, match="--grid"):
      expand([], [bad])


def test_the_monitor_alerts_on_an_lr_bump_in_the_smallest_member(tmp_path, stdlib_cache):
  """celerity_nano_1 against the shipped surrogate (its default reference): the clean run never
  alerts; the same run resumed at t = 0.6 with every LR x3 (tau held, so lambda / 3) alerts by
  t = 0.7 and not before the bump (tools.collapse_experiment's fault, on the smallest member)."""
  from celerity_jax import recipes

  common = [
    "recipe=celerity_nano_1",
    f"data.cache_dir={stdlib_cache}",
    "run.progress=false",
    "run.tensorboard=false",
  ]
  clean, fault = tmp_path / "clean", tmp_path / "fault"
  assert main([*common, f"run.dir={clean}"]) == 0
  assert main([*common, f"run.dir={fault}", "train.stop_frac=0.6"]) == 0
  bumped = f"optim.lr_base={3 * recipes.load('celerity_nano_1').optim.lr_base:.6g}"
  assert main([*common, f"run.dir={fault}", bumped, "checkpoint.allow_config_change=true"]) == 0
  T = json.loads((clean / "config.json").read_text())["derived"]["steps"]
  quiet = rows_of(clean)
  assert quiet[-1]["step"] == T and any("collapse_residual" in r for r in quiet)
  assert not any(r.get("collapse_alert") for r in quiet)
  alerts = [r["step"] / T for r in rows_of(fault) if r.get("collapse_alert")]
  assert alerts and 0.6 < alerts[0] <= 0.7
