"""The collapse experiment: does a family at fixed TPP with tau_opt collapse, does a mismatched
tau break it, how well do the surrogate and early alignment predict each member, and does the
monitor catch an injected fault?

  python -m tools.collapse_experiment [--family nano|gpu] [--out DIR] [--figure PNG]
      [--write-constants] [--dry-run] [section.key=value ...]

Families (tools/collapse_plan.py): `nano`, celerity_nano_2..4 (plus nano_1) on the stdlib corpus,
10-13 minutes on 2 CPU cores; `gpu`, celerity_gpu_10m..150m at the batch law's B, about 3.7
hours on one H100 at 40% MFU (--dry-run), on a corpus of at least 3e9 training tokens
(data.paths=...; the corpus is tokenized and its size checked before any training). Runs (20 TPP
unless said; finished runs in --out are reused, so it resumes):
  matched     every size at tau_opt(20), seed 0 (and the nano family's extra member, nano_1)
  seeds       the first size with seeds 1-4 and the second with seed 1 (the noise floor sigma)
  mismatched  the first size at 3 tau_opt, the second at tau_opt, the third at tau_opt / 3
  half batch  the first size at B / 2, seeds 0-2 (same tokens and tau: twice the steps; not fitted)
  faults      the smallest and largest size resumed at t = 0.6 with optim.lr_base x 3 (tau held)
  fit extras  the first size at tau_opt / 3; two small members at 10-80 TPP (tau_opt(TPP))
Reports (collapse_analysis): Delta against sigma for both families, the held-out surrogate MAE and
the final loss predicted from 30/50/70% for each member (surrogate fit without that size), the
tau sweep of the first size at tau_opt x (1/3, 1, 3) ranked from its first 30% (the regret), the
monitor's alert time on each fault replayed against the surrogate, and a verdict on each
pre-registered threshold. The surrogate refit on every run without a fault is written to
DIR/surrogate_constants.json; --write-constants also makes it the package's
surrogate_constants.json. --dry-run prints every run's N, D, B, T and FLOPs and trains nothing.
Overrides apply to every run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.collapse import predict, surrogate
from celerity_jax.collapse.curves import Curve
from celerity_jax.commands import runs
from celerity_jax.commands.plan import PEAK_TFLOPS
from celerity_jax.commands.plot_collapse import plot
from tools.collapse_analysis import (
  LATE,
  THRESHOLDS,
  family_figures,
  fault_detection,
  held_out_member,
  pair_gap,
  verdicts,
)
from tools.collapse_plan import (
  FAMILIES,
  FAULT_AT,
  Family,
  budget,
  check_corpus,
  fault_overrides,
  fault_runs,
  half_batch_seeds,
  mismatched,
  plan,
  short,
)


def monitor_settings(f: Family) -> tuple[tuple[float, float], float, int]:
  """The family's monitor (its largest recipe's): (alignment window, threshold, patience)."""
  from celerity_jax import recipes

  col = recipes.load(f.sizes[-1]).collapse
  return (col.align_start, col.align_end), col.threshold, col.patience


def tau_sweep(
  c: dict[str, Curve], first: str, constants: surrogate.Constants, stop: float = 0.3
) -> dict:
  """The first size's runs at tau_opt x (1/3, 1, 3) as an early-stopped sweep (the sweep command's
  rule): rank by the final loss predicted from the first `stop`, then the regret of that pick."""
  settings = {
    "tau_opt/3": f"taulow_{first}",
    "tau_opt": f"matched_{first}",
    "3 tau_opt": f"mismatched_{first}",
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
  f: Family, c: dict[str, Curve], faults: dict[str, Curve], checks: dict[str, Curve]
) -> tuple[dict, surrogate.Constants]:
  first, second = (short(r) for r in f.sizes[:2])
  matched = [c[f"matched_{short(r)}"] for r in f.sizes]
  mismatched_family = [c[name] for name in mismatched(f)]
  seeds_first = [c[f"matched_{first}"], *(c[f"seed{s}_{first}"] for s in f.seeds)]
  seeds = [seeds_first, [c[f"matched_{second}"], c[f"seed1_{second}"]]]
  report = family_figures(matched, mismatched_family, seeds)
  report["family"] = {"name": f.name, "sizes": [short(r) for r in f.sizes], "first": first}
  if f.extra:
    more = family_figures([c[f"matched_{short(f.extra)}"], *matched], mismatched_family, seeds)
    report["with_extra"] = {"extra": short(f.extra)} | {
      k: more[k] for k in ("max_delta_matched", "mean_delta_matched", "supercollapse_frac")
    }
  halves = {0: (f"matched_{first}", f"halfbatch_{first}")}
  halves |= {s: (f"seed{s}_{first}", f"halfbatch_seed{s}_{first}") for s in (1, 2)}
  both = {**c, **checks}
  report["half_batch_gap"] = max(pair_gap(both[a], both[b]) for a, b in halves.values())
  report["half_batch_gaps"] = {
    str(s): {"all": pair_gap(both[a], both[b]), "late": pair_gap(both[a], both[b], LATE)}
    for s, (a, b) in halves.items()
  }
  report["seed_gap_max"] = max(pair_gap(seeds_first[0], x) for x in seeds_first[1:])
  everything = list(c.values())
  report["members"], held = {}, {}
  for i, m in enumerate(matched):
    row, held[m.n_params] = held_out_member(
      m,
      everything,
      matched[i - 1] if i else None,
      seeds_first if i == 0 else seeds[1] if i == 1 else [m],
    )
    report["members"][short(f.sizes[i])] = row
  # the sweep's surrogate never saw the first size (held[...] is the fit without its size)
  report["tau_sweep"] = tau_sweep(c, first, held[matched[0].n_params])
  constants, objective = surrogate.fit(everything)
  window, threshold, patience = monitor_settings(f)
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
  sw, first = r["tau_sweep"], r["family"]["first"]
  lines += [
    "",
    f"tau sweep ({first}, stopped at {sw['stop']:.0%}): picked {sw['picked']}, best {sw['best']}, "
    f"regret {sw['regret']:.4f}, max prediction error {sw['max_abs_prediction_error']:.2%}; "
    f"B / 2 vs B ({first}, seeds 0-2) max gap {r['half_batch_gap']:.4f} (seed vs seed max "
    f"{r['seed_gap_max']:.4f})",
  ]
  if "with_extra" in r:
    x = r["with_extra"]
    lines[-1] += (
      f"; with {x['extra']} ({len(r['members']) + 1} sizes) supercollapse fraction "
      f"{x['supercollapse_frac']:.2f}, max Delta {x['max_delta_matched']:.4f}"
    )
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


def dry_run(f: Family, base: list[str]) -> None:
  """Every run the experiment would train, with its size and cost; nothing is trained."""
  rows, totals = budget(f, base)
  print(f"{'run':<26} {'N':>11} {'D':>14} {'B seq':>6} {'T':>6} {'FLOPs':>9}")
  for r in rows:
    print(
      f"{r['name']:<26} {r['n_params']:>11,} {r['tokens']:>14,.0f} {r['batch_seqs']:>6} "
      f"{r['steps']:>6} {r['flops']:>9.3g}"
    )
  hours = totals["flops"] / (PEAK_TFLOPS["h100"] * 1e12 * 0.4) / 3600
  print(
    f"{totals['runs']} runs, {totals['flops']:.3g} FLOPs ({hours:.2f} h on one H100 at 40% MFU); "
    f"the corpus must hold {totals['max_tokens']:,.0f} training tokens"
  )


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", choices=sorted(FAMILIES), default="nano")
  parser.add_argument("--out", default=None, help="default: runs/collapse (nano), ..._gpu (gpu)")
  parser.add_argument("--figure", default=None, help="default: docs/collapse.png, ..._gpu.png")
  parser.add_argument("--write-constants", action="store_true")
  parser.add_argument("--dry-run", action="store_true", help="print the runs and their cost")
  parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
  args = parser.parse_args(argv)
  f = FAMILIES[args.family]
  out, figure = Path(args.out or f.out), args.figure or f.figure
  base = ["collapse.reference=none", *args.overrides]
  if args.dry_run:
    dry_run(f, base)
    return
  started = time.monotonic()
  check_corpus(f.sizes[-1], base, budget(f, base)[1]["max_tokens"])
  curves, faults = {}, {}
  for name, (recipe, overrides) in plan(f, base).items():
    curves[name] = runs.train(recipe, [*base, *overrides], out / name)
    print(
      f"{name}: final loss {curves[name].final_loss:.4f} "
      f"({time.monotonic() - started:.0f} s so far)",
      file=sys.stderr,
    )
  checks = {
    name: runs.train(recipe, [*base, *overrides], out / name)
    for name, (recipe, overrides) in half_batch_seeds(f, base).items()
  }
  for name, recipe in fault_runs(f).items():
    faults[name] = train_with_fault(recipe, base, out / name)
  report, constants = analyse(f, curves, faults, checks)
  report["wall_s"] = time.monotonic() - started
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  command = f"python -m tools.collapse_experiment --family {f.name} --write-constants"
  meta = {"fit_mae": report["surrogate_fit_mae_all"], "runs": sorted(curves), "command": command}
  surrogate.save_constants(out / "surrogate_constants.json", constants, meta)
  if args.write_constants:
    surrogate.save_constants(surrogate.PACKAGED, constants, meta)
  second = short(f.sizes[1])
  matched = [k for k in curves if k.startswith(("matched", "seed"))]
  if f.extra:
    matched = [k for k in matched if not k.endswith(short(f.extra))]
  plot(
    {
      "matched (tau_opt)": [curves[k] for k in matched],
      "mismatched tau": [curves[name] for name in mismatched(f)],
      "LR x3 from t = 0.6": list(faults.values()),
    },
    figure,
    reference=curves[f"matched_{second}"],
    title=f"{f.title}: residuals against {second}'s curve",
  )
  print(table(report))
  print(f"report: {out / 'report.json'}; figure: {figure}")


if __name__ == "__main__":
  sys.exit(run_cli(main))
