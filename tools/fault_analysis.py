"""The fault campaign's analysis (pre-registered in docs/faults.md): the collapse monitor replayed
offline from each run's logged raw losses, over a grid of thresholds and smoothings, against the
run's *planned* reference curve (the surrogate for the settings it was launched with, so a fault
that changes tau or B is judged against the run that was planned, not the one it became).

The replay is the in-step monitor's rule (celerity_jax/collapse/monitor.py): a debiased EMA of the
loss with time constant smooth_frac in t, the final-loss estimate L_hat = sum L^2 / sum L l_ref
over the alignment window, then r = L / L_hat - l_ref after it, and an alert once |r| > threshold
for `patience` consecutive steps. A fault run is detected when an alert is on at a step after its
injection; a clean run with any alert is a false alarm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from celerity_jax.collapse import monitor, surrogate
from celerity_jax.collapse.curves import ema_step
from tools.fault_kinds import DESCRIBE, KINDS, SEVERITIES

THRESHOLDS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2)
SMOOTHINGS = (0.01, 0.02, 0.04, 0.08)
PATIENCE = 5
WINDOW = (0.4, 0.6)  # the nano recipes' alignment window
MAX_FALSE_ALARM = 0.05  # the operating point's false-alarm budget on the clean runs
DEFAULT = (0.05, 0.02)  # (threshold, smooth_frac) before this campaign
SMOOTHING_GAIN = 0.05  # a new default smoothing must detect this much more (pooled)


def read_run(run_dir: Path) -> dict:
  """Per-step t, raw loss and the logged residual (NaN where none) of a run, and its planned
  controls (the first segment's config: a branched run copies its clean run's)."""
  rows = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row and "step" in row and "event" not in row:
      rows[row["step"]] = row
  steps = sorted(rows)
  described = json.loads((run_dir / "config.json").read_text())
  return {
    "step": np.array(steps),
    "t": np.array([rows[s]["frac"] for s in steps], np.float64),
    "loss": np.array([_num(rows[s]["loss"]) for s in steps], np.float64),
    "logged_residual": np.array([_num(rows[s].get("collapse_residual")) for s in steps]),
    "logged_alert": np.array([bool(rows[s].get("collapse_alert")) for s in steps]),
    "spec": json.loads((run_dir / "done.json").read_text()),
    "described": described,
  }


def _num(v) -> float:
  return float("nan") if v is None else float(v)


def planned_reference(described: dict, smooth_frac: float, constants) -> tuple:
  """The surrogate's normalized curve for the controls the run was planned with (the monitor's
  own rule, monitor.planned_by; branched runs are given their clean base's config.json)."""
  p = monitor.planned_by(described)
  return surrogate.normalized_curve(
    p["steps"], p["warmup_steps"], p["schedule"], p["tau"], p["tpp"], constants, smooth_frac
  )


def residuals(t, loss, ref_t, ref_l, smooth_frac: float, window=WINDOW) -> np.ndarray:
  """The monitor's residual at every step (NaN before the alignment window ends)."""
  m = w = 0.0
  prev, s_ll, s_lr = 0.0, 0.0, 0.0
  ref = np.interp(t, ref_t, ref_l)
  out = np.full(len(t), np.nan)
  for i, (ti, x) in enumerate(zip(t, loss, strict=True)):
    if not math.isfinite(x):
      continue
    decay = math.exp(-(ti - prev) / smooth_frac)
    prev = ti
    m, w = ema_step(m, w, x, decay)
    smooth = m / w
    if window[0] <= ti <= window[1]:
      s_ll, s_lr = s_ll + smooth * smooth, s_lr + smooth * ref[i]
    elif ti > window[1] and s_lr > 0:
      out[i] = smooth / (s_ll / s_lr) - ref[i]
  return out


def alerting(residual: np.ndarray, threshold: float, patience: int = PATIENCE) -> np.ndarray:
  """Whether the alert is on at each step: |r| > threshold for `patience` steps in a row (a
  non-finite step leaves the count as it was, as in the monitor)."""
  on, over = np.zeros(len(residual), bool), 0
  for i, r in enumerate(residual):
    if np.isnan(r):
      continue
    over = over + 1 if abs(r) > threshold else 0
    on[i] = over >= patience
  return on


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  if n == 0:
    return (0.0, 1.0)
  p = k / n
  mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return (max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n)))


def score(run: dict, smooth_frac: float, constants) -> dict:
  """A run's residual series for one smoothing and, per threshold, its first alert after the
  injection (clean runs: after step 0)."""
  ref_t, ref_l = planned_reference(run["described"], smooth_frac, constants)
  r = residuals(run["t"], run["loss"], ref_t, ref_l, smooth_frac)
  after = run["step"] > run["spec"]["inject_step"]
  first = {}
  for th in THRESHOLDS:
    on = alerting(r, th) & after
    i = int(np.argmax(on)) if on.any() else None
    first[th] = None if i is None else (int(run["step"][i]), float(run["t"][i]))
  post = np.abs(r[after & ~np.isnan(r)])
  return {"residual": r, "first": first, "max_abs_after": float(post.max()) if len(post) else 0.0}


def spikes(run: dict, factor: float = 1.2, smooth_frac: float = 0.02) -> bool:
  """Whether the monitor's spike check (smoothed loss above factor x its running minimum) fires
  after the injection."""
  m = w = prev = 0.0
  low, fired = math.inf, False
  for step, ti, x in zip(run["step"], run["t"], run["loss"], strict=True):
    if not math.isfinite(x):
      continue
    m, w = ema_step(m, w, x, math.exp(-(ti - prev) / smooth_frac))
    prev, smooth = ti, m / w
    fired |= bool(step > run["spec"]["inject_step"] and smooth > factor * low)
    low = min(low, smooth)
  return fired


def load(out: Path, clean, faults) -> tuple[list[dict], list[dict]]:
  def one(spec):
    run = read_run(out / spec.name)
    if spec.kind:  # judged against the planned run: its clean base's settings
      base = f"clean_{spec.recipe.removeprefix('celerity_')}_s{spec.seed}"
      run["described"] = json.loads((out / base / "config.json").read_text())
    run["spec"].setdefault("inject_step", 0)
    return run

  return [one(s) for s in clean], [one(s) for s in faults]


def analyse(out: Path, clean_specs, fault_specs) -> dict:
  constants = surrogate.load_constants("")
  clean, faults = load(out, clean_specs, fault_specs)
  scored = {
    sf: ([score(r, sf, constants) for r in clean], [score(r, sf, constants) for r in faults])
    for sf in SMOOTHINGS
  }
  cells = [(k, v) for k in KINDS for v in SEVERITIES if any(r["spec"]["kind"] == k for r in faults)]
  roc = {}
  for sf, (c, f) in scored.items():
    for th in THRESHOLDS:
      fa = sum(x["first"][th] is not None for x in c)
      rates = {}
      for k, v in cells:
        idx = [
          i for i, r in enumerate(faults) if (r["spec"]["kind"], r["spec"]["severity"]) == (k, v)
        ]
        rates[f"{k}/{v}"] = sum(f[i]["first"][th] is not None for i in idx) / len(idx)
      roc[f"{sf}/{th}"] = {
        "smooth_frac": sf,
        "threshold": th,
        "false_alarms": fa,
        "false_alarm_rate": fa / len(c),
        "detection_mean": float(np.mean(list(rates.values()))),
        "detection": rates,
      }
  allowed = [p for p in roc.values() if p["false_alarm_rate"] <= MAX_FALSE_ALARM]
  key = lambda p: (p["detection_mean"], p["threshold"], -p["smooth_frac"])  # noqa: E731
  best = max(allowed, key=key)
  at_default_sf = max((p for p in allowed if p["smooth_frac"] == DEFAULT[1]), key=key)
  chosen = (
    best
    if best["detection_mean"] - at_default_sf["detection_mean"] > SMOOTHING_GAIN
    else at_default_sf
  )
  report = {
    "runs": {"clean": len(clean), "faults": len(faults)},
    "roc": roc,
    "best_any_smoothing": best,
    "chosen": chosen,
    "default_before": roc[f"{DEFAULT[1]}/{DEFAULT[0]}"],
    "false_alarms_by_size": _by_size(clean, scored, chosen),
    "cells": {},
  }
  for point, label in ((chosen, "chosen"), (report["default_before"], "default_before")):
    sf, th = point["smooth_frac"], point["threshold"]
    _, f = scored[sf]
    for k, v in cells:
      idx = [
        i for i, r in enumerate(faults) if (r["spec"]["kind"], r["spec"]["severity"]) == (k, v)
      ]
      report["cells"].setdefault(f"{k}/{v}", {})[label] = _cell(faults, f, idx, th)
  for k, v in cells:
    idx = [i for i, r in enumerate(faults) if (r["spec"]["kind"], r["spec"]["severity"]) == (k, v)]
    report["cells"][f"{k}/{v}"]["spike_detected"] = sum(spikes(faults[i]) for i in idx)
    # what the in-step monitor itself raised (threshold 0.05, smoothing 0.02): after a resume
    # that changed tau or B it compares with the curve of the new settings, not the planned one
    report["cells"][f"{k}/{v}"]["in_step_detected"] = sum(
      bool((r["logged_alert"] & (r["step"] > r["spec"]["inject_step"])).any())
      for r in (faults[i] for i in idx)
    )
    report["cells"][f"{k}/{v}"]["describe"] = DESCRIBE[k]
  report["clean_max_abs_residual"] = {
    str(sf): float(max(x["max_abs_after"] for x in scored[sf][0])) for sf in SMOOTHINGS
  }
  report["replay_vs_logged"] = _replay_check(clean, scored[DEFAULT[1]][0])
  report["series"] = {  # for the figure: chosen smoothing's residuals
    "clean": [_series(r, s) for r, s in zip(clean, scored[chosen["smooth_frac"]][0], strict=True)],
    "faults": [
      _series(r, s) for r, s in zip(faults, scored[chosen["smooth_frac"]][1], strict=True)
    ],
  }
  return report


def _series(run, s) -> dict:
  keep = ~np.isnan(s["residual"])
  return {
    "name": run["spec"]["name"],
    "kind": run["spec"].get("kind", ""),
    "severity": run["spec"].get("severity", ""),
    "inject_t": float(run["t"][run["step"] == run["spec"]["inject_step"]][0])
    if run["spec"].get("kind")
    else None,
    "t": np.round(run["t"][keep], 4).tolist(),
    "r": np.round(s["residual"][keep], 5).tolist(),
  }


def _cell(faults, f, idx, th) -> dict:
  hits = [(faults[i], f[i]["first"][th]) for i in idx if f[i]["first"][th] is not None]
  delays_t = [a[1] - r["t"][r["step"] == r["spec"]["inject_step"]][0] for r, a in hits]
  delays_steps = [a[0] - r["spec"]["inject_step"] for r, a in hits]
  late = [
    i
    for i in idx
    if faults[i]["t"][faults[i]["step"] == faults[i]["spec"]["inject_step"]][0] > WINDOW[1]
  ]
  n = len(idx)
  return {
    "detected": len(hits),
    "runs": n,
    "ci95": wilson(len(hits), n),
    "detected_injected_after_window": sum(f[i]["first"][th] is not None for i in late),
    "injected_after_window": len(late),
    "median_delay_t": float(np.median(delays_t)) if hits else None,
    "median_delay_steps": float(np.median(delays_steps)) if hits else None,
    "median_max_abs_residual": float(np.median([f[i]["max_abs_after"] for i in idx])),
  }


def _by_size(clean, scored, point) -> dict:
  c = scored[point["smooth_frac"]][0]
  out = {}
  for run, s in zip(clean, c, strict=True):
    size = run["spec"]["recipe"].removeprefix("celerity_")
    row = out.setdefault(size, {"runs": 0, "false_alarms": 0})
    row["runs"] += 1
    row["false_alarms"] += s["first"][point["threshold"]] is not None
  return out


def _replay_check(clean, scored) -> float:
  """Largest |replayed - logged| residual over the clean runs at the default smoothing (the
  replay reproduces the in-step monitor)."""
  worst = 0.0
  for run, s in zip(clean, scored, strict=True):
    both = ~np.isnan(run["logged_residual"]) & ~np.isnan(s["residual"])
    if both.any():
      worst = max(worst, float(np.abs(run["logged_residual"][both] - s["residual"][both]).max()))
  return worst


def tables(r: dict) -> str:
  """The report as the markdown tables docs/faults.md and the README carry."""
  ch, old = r["chosen"], r["default_before"]
  lines = [
    f"operating point: threshold {ch['threshold']}, smooth_frac {ch['smooth_frac']}, patience "
    f"{PATIENCE}: false alarms {ch['false_alarms']}/{r['runs']['clean']}, mean detection "
    f"{ch['detection_mean']:.0%} (before: threshold {old['threshold']}, smooth_frac "
    f"{old['smooth_frac']}: {old['false_alarms']}/{r['runs']['clean']}, "
    f"{old['detection_mean']:.0%})",
    "",
    "| fault | severity | detected (95% CI) | injected after t = 0.6: detected | median delay "
    "t (steps) | median max abs r | at 0.05: replayed, in-step as logged | spike check |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, c in r["cells"].items():
    kind, severity = name.split("/")
    a, b = c["chosen"], c["default_before"]
    lo, hi = a["ci95"]
    delay = (
      "-" if a["median_delay_t"] is None
      else f"{a['median_delay_t']:.3f} ({a['median_delay_steps']:.0f})"
    )  # fmt: skip
    lines.append(
      f"| {kind} ({c['describe']}) | {severity} | {a['detected']}/{a['runs']} ({lo:.2f}-{hi:.2f})"
      f" | {a['detected_injected_after_window']}/{a['injected_after_window']} | {delay} | "
      f"{a['median_max_abs_residual']:.3f} | {b['detected']}, {c['in_step_detected']} | "
      f"{c['spike_detected']}/{a['runs']} |"
    )
  sizes = ", ".join(
    f"{k}: {v['false_alarms']}/{v['runs']}" for k, v in r["false_alarms_by_size"].items()
  )
  lines += ["", f"false alarms by size at the operating point: {sizes}"]
  return "\n".join(lines)


def figure(out: Path, r: dict, path: str):
  """Residual against t for every fault kind (mild light, strong dark; clean runs in the last
  panel), with the chosen threshold, and the ROC for each smoothing."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kinds = list(dict.fromkeys(name.split("/")[0] for name in r["cells"]))
  cols = 4
  rows = math.ceil((len(kinds) + 2) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), sharex=False)
  axes = axes.ravel()
  th = r["chosen"]["threshold"]
  for ax, kind in zip(axes, kinds, strict=False):
    for s in r["series"]["faults"]:
      if s["kind"] == kind:
        color = "tab:orange" if s["severity"] == "mild" else "tab:red"
        ax.plot(s["t"], s["r"], color=color, lw=0.7, alpha=0.8)
        ax.axvline(s["inject_t"], color=color, lw=0.4, ls=":", alpha=0.6)
    _frame(ax, kind, th)
  ax = axes[len(kinds)]
  for s in r["series"]["clean"]:
    ax.plot(s["t"], s["r"], color="tab:blue", lw=0.6, alpha=0.6)
  _frame(ax, f"clean ({len(r['series']['clean'])} runs)", th)
  ax = axes[len(kinds) + 1]
  for sf in SMOOTHINGS:
    pts = sorted(
      (p for p in r["roc"].values() if p["smooth_frac"] == sf), key=lambda p: p["threshold"]
    )
    ax.plot(
      [p["false_alarm_rate"] for p in pts],
      [p["detection_mean"] for p in pts],
      marker=".",
      label=f"smooth {sf}",
    )
  ch = r["chosen"]
  ax.plot([ch["false_alarm_rate"]], [ch["detection_mean"]], "k*", ms=12, label="chosen")
  ax.axvline(MAX_FALSE_ALARM, color="gray", ls="--", lw=0.8)
  ax.set_xlabel("false-alarm rate (clean runs)")
  ax.set_ylabel("mean detection rate")
  ax.set_title("ROC over the threshold")
  ax.legend(fontsize=7)
  for ax in axes[len(kinds) + 2 :]:
    ax.axis("off")
  fig.suptitle(
    f"celerity_nano_2 fault campaign: residual r against t (mild orange, strong red; dotted: "
    f"injection), threshold {th}, smoothing {ch['smooth_frac']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _frame(ax, title: str, th: float):
  ax.axhline(th, color="k", ls="--", lw=0.7)
  ax.axhline(-th, color="k", ls="--", lw=0.7)
  ax.set_ylim(-0.3, 0.3)
  ax.set_xlim(0.55, 1.0)
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("t")
