"""The nano-family collapse experiment: does a family at fixed TPP with tau_opt collapse, does a
mismatched tau break it, how well do the surrogate and early alignment predict each member, and
does the monitor catch an injected fault?

  python -m celerity_jax.tools.collapse_experiment [--out runs/collapse]
      [--figure docs/collapse.png] [--write-constants] [section.key=value ...]

Runs (all 20 TPP at the recipes' B unless said; finished runs in --out are reused, so it resumes):
  matched     nano_1 .. nano_4 at tau_opt(20), seed 0 (the family is nano_2-4; nano_1 is an extra)
  seeds       nano_2 seeds 1-4 and nano_3 seed 1 (the noise floor sigma)
  mismatched  nano_2 at 3 tau_opt, nano_3 at tau_opt, nano_4 at tau_opt / 3
  half batch  nano_2 seeds 0-2 at B / 2 (same tokens and tau: twice the steps; not fitted)
  faults      nano_2 and nano_4 resumed at t = 0.6 with optim.lr_base x 3 (tau held)
  fit extras  nano_2 at tau_opt / 3; nano_1 at 10, 40, 80 TPP; nano_2 at 10, 40 TPP (tau_opt(TPP))
Reports (collapse_analysis): Delta against sigma for both families, the held-out surrogate MAE and
the final loss predicted from 30/50/70% for each member (surrogate fit without that size), the
tau sweep nano_2 at tau_opt x (1/3, 1, 3) ranked from its first 30% (the regret), the monitor's
alert time on each fault replayed against the surrogate, and a verdict on each pre-registered
threshold. --write-constants refits the surrogate on every run without a fault and writes the
package's surrogate_constants.json. Overrides apply to every run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from celerity_jax.collapse import predict, surrogate
from celerity_jax.collapse.curves import Curve
from celerity_jax.main import ArgumentParser, run_cli
from celerity_jax.tools import runs
from celerity_jax.tools.collapse_analysis import (
  LATE,
  THRESHOLDS,
  family_figures,
  fault_detection,
  held_out_member,
  pair_gap,
  verdicts,
)
from celerity_jax.tools.plot_collapse import plot

TAU_OPT_20 = 0.785 * 20**-0.501
SIZES = ("celerity_nano_2", "celerity_nano_3", "celerity_nano_4")
FAULT_AT, FAULT_LR = 0.6, 3.0


def short(recipe: str) -> str:
  return recipe.removeprefix("celerity_")


def monitor_settings() -> tuple[tuple[float, float], float, int]:
  """The nano recipes' monitor: (alignment window, threshold, patience)."""
  from celerity_jax import recipes

  col = recipes.load(SIZES[-1]).collapse
  return (col.align_start, col.align_end), col.threshold, col.patience


def plan() -> dict[str, tuple[str, list[str]]]:
  """name -> (recipe, overrides) for every run without a fault."""
  p = {f"matched_{short(r)}": (r, []) for r in ("celerity_nano_1", *SIZES)}
  p |= {f"seed{s}_nano_2": (SIZES[0], [f"train.seed={s}"]) for s in (1, 2, 3, 4)}
  p["seed1_nano_3"] = (SIZES[1], ["train.seed=1"])
  p |= {
    "mismatched_nano_2": (SIZES[0], [f"optim.tau={3 * TAU_OPT_20:.6g}"]),
    "mismatched_nano_4": (SIZES[2], [f"optim.tau={TAU_OPT_20 / 3:.6g}"]),
    "taulow_nano_2": (SIZES[0], [f"optim.tau={TAU_OPT_20 / 3:.6g}"]),
    "halfbatch_nano_2": (SIZES[0], [f"train.batch_size={nano_batch() // 2}"]),
  }
  for tpp in (10, 40, 80):
    p[f"tpp{tpp}_nano_1"] = ("celerity_nano_1", [f"scaling.tpp={tpp}"])
  for tpp in (10, 40):
    p[f"tpp{tpp}_nano_2"] = (SIZES[0], [f"scaling.tpp={tpp}"])
  return p


def half_batch_seeds() -> dict[str, tuple[str, list[str]]]:
  """Seeds 1-2 of nano_2 at B / 2: only for the half-batch comparison (kept out of every fit, so
  the surrogate constants come from plan()'s runs alone)."""
  half = f"train.batch_size={nano_batch() // 2}"
  return {f"halfbatch_seed{s}_nano_2": (SIZES[0], [half, f"train.seed={s}"]) for s in (1, 2)}


def nano_batch() -> int:
  from celerity_jax import recipes

  return recipes.load(SIZES[0]).train.batch_size


def fault_overrides(recipe: str, overrides: list[str]) -> list[str]:
  """The fault: every group's LR x FAULT_LR from the resume on (tau held, so lambda / FAULT_LR)."""
  from celerity_jax import recipes
  from celerity_jax.config import apply_overrides

  lr = apply_overrides(recipes.load(recipe), overrides).optim.lr_base
  return [f"optim.lr_base={FAULT_LR * lr:.6g}"]


def tau_sweep(c: dict[str, Curve], constants: surrogate.Constants, stop: float = 0.3) -> dict:
  """nano_2's runs at tau_opt x (1/3, 1, 3) as an early-stopped sweep (tools.sweep's rule): rank by
  the final loss predicted from the first `stop`, then the regret of that pick."""
  settings = {
    "tau_opt/3": "taulow_nano_2",
    "tau_opt": "matched_nano_2",
    "3 tau_opt": "mismatched_nano_2",
  }
  rows = {
    k: {
      "predicted_final": predict.predict_final_loss(
        predict.truncate(c[name], stop), constants=constants
      ),
      "true_final": c[name].final_loss,
    }
    for k, name in settings.items()
  }
  pick = min(rows, key=lambda k: rows[k]["predicted_final"])
  best = min(rows, key=lambda k: rows[k]["true_final"])
  return {
    "stop": stop,
    "settings": rows,
    "picked": pick,
    "best": best,
    "regret": rows[pick]["true_final"] - rows[best]["true_final"],
    "compute_saved_frac": 1 - stop,
    "max_abs_prediction_error": max(
      abs(r["predicted_final"] / r["true_final"] - 1) for r in rows.values()
    ),
  }


def analyse(
  c: dict[str, Curve], faults: dict[str, Curve], checks: dict[str, Curve]
) -> tuple[dict, surrogate.Constants]:
  matched = [c[f"matched_{short(r)}"] for r in SIZES]
  mismatched = [c["mismatched_nano_2"], c["matched_nano_3"], c["mismatched_nano_4"]]
  seeds_2 = [c["matched_nano_2"], *(c[f"seed{s}_nano_2"] for s in (1, 2, 3, 4))]
  seeds = [seeds_2, [c["matched_nano_3"], c["seed1_nano_3"]]]
  report = family_figures(matched, mismatched, seeds)
  with_nano_1 = family_figures([c["matched_nano_1"], *matched], mismatched, seeds)
  report["with_nano_1"] = {
    k: with_nano_1[k] for k in ("max_delta_matched", "mean_delta_matched", "supercollapse_frac")
  }
  halves = {0: ("matched_nano_2", "halfbatch_nano_2")}
  halves |= {s: (f"seed{s}_nano_2", f"halfbatch_seed{s}_nano_2") for s in (1, 2)}
  both = {**c, **checks}
  report["half_batch_gap_nano_2"] = max(pair_gap(both[a], both[b]) for a, b in halves.values())
  report["half_batch_gaps_nano_2"] = {
    str(s): {"all": pair_gap(both[a], both[b]), "late": pair_gap(both[a], both[b], LATE)}
    for s, (a, b) in halves.items()
  }
  report["seed_gap_nano_2_max"] = max(pair_gap(seeds_2[0], x) for x in seeds_2[1:])
  everything = list(c.values())
  report["members"], held = {}, {}
  for i, m in enumerate(matched):
    row, held[m.n_params] = held_out_member(
      m,
      everything,
      matched[i - 1] if i else None,
      seeds_2 if i == 0 else seeds[1] if i == 1 else [m],
    )
    report["members"][short(SIZES[i])] = row
  # the sweep's surrogate never saw nano_2 (held[...] is the fit without its size)
  report["tau_sweep_nano_2"] = tau_sweep(c, held[matched[0].n_params])
  constants, objective = surrogate.fit(everything)
  window, threshold, patience = monitor_settings()
  controls = [x for x in everything if x.tpp == matched[0].tpp and x.tau == matched[0].tau]
  report["faults"] = {
    name: fault_detection(f, controls, constants, window, threshold, patience)
    for name, f in faults.items()
  }
  report["monitor"] = {"window": window, "threshold": threshold, "patience": patience}
  report["surrogate_all"] = constants._asdict()
  report["surrogate_fit_mae_all"] = objective
  report["runs"] = {
    k: {
      "n_params": x.n_params,
      "tpp": x.tpp,
      "tau": x.tau,
      "seed": x.seed,
      "steps": x.steps,
      "final_loss": x.final_loss,
      "initial_loss": float(x.loss[0]),
      "normalized_at_0_2": float(np.interp(0.2, x.t_hat, x.normalized())),
      "surrogate_mae": surrogate.mae(x, constants),
    }
    for k, x in {**c, **checks, **faults}.items()
  }
  report["thresholds"] = THRESHOLDS
  report["verdicts"] = verdicts(report)
  return report, constants


def table(r: dict) -> str:
  """The report as the markdown tables docs/results.md carries."""
  v, th = r["verdicts"], r["thresholds"]
  mark = lambda k: "holds" if v[k]["holds"] else "**fails**"  # noqa: E731
  largest = max(r["members"], key=lambda k: r["members"][k]["n_params"])
  big = r["members"][largest]
  alert = lambda t: "none" if t is None else f"t = {t:.3f}"  # noqa: E731
  lines = [
    "| claim | pre-registered mark | measured | verdict |",
    "|---|---|---|---|",
    f"| supercollapse: fraction of t in [0.2, 1] with Delta < sigma | >= {th['supercollapse_frac']}"
    f" | {r['supercollapse_frac']:.2f} (max Delta {r['max_delta_matched']:.4f}, max sigma "
    f"{r['max_sigma_seeds']:.4f}) | {mark('supercollapse')} |",
    f"| mismatched tau breaks it: max Delta_mismatched / max sigma | > {th['mismatch_over_sigma']}"
    f" | {r['mismatch_over_sigma']:.2f} (max Delta {r['max_delta_mismatched']:.4f}) | "
    f"{mark('mismatch_breaks_collapse')} |",
    f"| surrogate MAE on {largest}, fit without it | <= {th['surrogate_mae']:.0%} | "
    f"{big['surrogate_mae']:.2%} | {mark('surrogate_mae_largest')} |",
    f"| {largest}'s final loss from its first 30% (surrogate) | within {th['predict_30pct']:.0%} | "
    f"{big['predict_err_surrogate']['0.3']:+.2%} | {mark('predict_30pct_largest')} |",
    f"| LR x3 from t = 0.6 alerts; no alert without a fault | by t = {th['fault_alert_by']} | "
    + "; ".join(f"{k}: {alert(f['alert_t'])}" for k, f in r["faults"].items())
    + f"; false alarms {sum(len(f['false_alarms']) for f in r['faults'].values())} | "
    f"{mark('fault_alerts')} |",
    "",
    "| member | N | T | final loss | surrogate MAE (held out) | from 30% / 50% / 70%: surrogate |"
    " smaller member's curve |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, m in r["members"].items():
    s, c = m["predict_err_surrogate"], m["predict_err_smaller_curve"]
    lines.append(
      f"| {name} | {m['n_params']:,} | {m['steps']} | {m['final_loss']:.4f} | "
      f"{m['surrogate_mae']:.2%} | "
      + " / ".join(f"{s[k]:+.2%}" for k in ("0.3", "0.5", "0.7"))
      + " | "
      + (" / ".join(f"{c[k]:+.2%}" for k in ("0.3", "0.5", "0.7")) if c else "-")
      + " |"
    )
  sw = r["tau_sweep_nano_2"]
  lines += [
    "",
    f"tau sweep (nano_2, stopped at {sw['stop']:.0%}): picked {sw['picked']}, best {sw['best']}, "
    f"regret {sw['regret']:.4f}, max prediction error {sw['max_abs_prediction_error']:.2%}; "
    f"B / 2 vs B (nano_2, seeds 0-2) max gap {r['half_batch_gap_nano_2']:.4f} (seed vs seed max "
    f"{r['seed_gap_nano_2_max']:.4f}); with nano_1 (four sizes) supercollapse fraction "
    f"{r['with_nano_1']['supercollapse_frac']:.2f}, "
    f"max Delta {r['with_nano_1']['max_delta_matched']:.4f}",
  ]
  return "\n".join(lines)


def train_with_fault(recipe: str, overrides: list[str], run_dir: Path) -> Curve:
  """The run to t = FAULT_AT, then resumed to the end with fault_overrides (reused if done)."""
  from celerity_jax.config import ConfigError
  from celerity_jax.train import loop

  faulty = [*overrides, *fault_overrides(recipe, overrides), "checkpoint.allow_config_change=true"]
  cfg = runs.config(recipe, faulty, run_dir)
  try:
    if runs.reached(cfg, run_dir, 1.0):  # the second part is there, or under way
      return runs.load_run(run_dir)
  except ConfigError:  # the directory holds the first part only
    pass
  else:
    if (run_dir / "config.json").is_file():
      loop.run(cfg)
      return runs.load_run(run_dir)
  runs.train(recipe, overrides, run_dir, FAULT_AT)
  print(f"  fault: {' '.join(faulty[-2:-1])} from t = {FAULT_AT}", file=sys.stderr)
  loop.run(cfg)
  return runs.load_run(run_dir)


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/collapse")
  parser.add_argument("--figure", default="docs/collapse.png")
  parser.add_argument("--write-constants", action="store_true")
  parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
  args = parser.parse_args(argv)
  out, started = Path(args.out), time.monotonic()
  base = ["collapse.reference=none", *args.overrides]
  curves, faults = {}, {}
  for name, (recipe, overrides) in plan().items():
    curves[name] = runs.train(recipe, [*base, *overrides], out / name)
    print(
      f"{name}: final loss {curves[name].final_loss:.4f} "
      f"({time.monotonic() - started:.0f} s so far)",
      file=sys.stderr,
    )
  checks = {
    name: runs.train(recipe, [*base, *overrides], out / name)
    for name, (recipe, overrides) in half_batch_seeds().items()
  }
  for recipe in (SIZES[0], SIZES[-1]):
    name = f"fault_{short(recipe)}"
    faults[name] = train_with_fault(recipe, base, out / name)
  report, constants = analyse(curves, faults, checks)
  report["wall_s"] = time.monotonic() - started
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  if args.write_constants:
    surrogate.save_constants(
      surrogate.PACKAGED,
      constants,
      {
        "fit_mae": report["surrogate_fit_mae_all"],
        "runs": sorted(curves),
        "command": "python -m celerity_jax.tools.collapse_experiment --write-constants",
      },
    )
  matched = [k for k in curves if k.startswith(("matched", "seed")) and "nano_1" not in k]
  plot(
    {
      "matched (tau_opt)": [curves[k] for k in matched],
      "mismatched tau": [
        curves["mismatched_nano_2"],
        curves["matched_nano_3"],
        curves["mismatched_nano_4"],
      ],
      "LR x3 from t = 0.6": list(faults.values()),
    },
    args.figure,
    reference=curves["matched_nano_3"],
    title="nano family, 20 TPP, B = 32: residuals against nano_3's curve",
  )
  print(table(report))
  print(f"report: {out / 'report.json'}; figure: {args.figure}")


if __name__ == "__main__":
  sys.exit(run_cli(main))
