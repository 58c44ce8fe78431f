"""The nano-family collapse experiment: does a family at fixed TPP with tau_opt collapse,
and how well do the surrogate and early alignment predict the largest member?

  python -m celerity_jax.tools.collapse_experiment [--out runs/collapse]
      [--figure docs/collapse.png] [--write-constants] [section.key=value ...]

Runs (all 20 TPP unless said; finished runs in --out are reused, so it resumes):
  matched     nano_2, nano_3, nano_4 at tau_opt(20), seed 0
  seeds       nano_2 seeds 1, 2 and nano_3 seed 1 (the noise floor sigma)
  mismatched  nano_2 at 3 tau_opt, nano_3 at tau_opt, nano_4 at tau_opt / 3
  fit extras  nano_2 at tau_opt / 3; nano_1 at 10, 40, 80 TPP; nano_2 at 10, 40 TPP (tau_opt(TPP))
Reports max Delta(t) over t in [0.2, 1] (std across sizes of L(t)/L(T)) for both families, sigma(t)
from the seeds, the monitor's seed-to-seed residual, the surrogate's MAE on nano_4 when fit without
it, and the error of nano_4's final loss predicted from its first 30%. --write-constants refits the
surrogate on every run and writes the package's surrogate_constants.json. Overrides apply to
every run (e.g. param.alpha_out=0.136875 for the lower-logit variant in docs/results.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from celerity_jax.collapse import predict, surrogate
from celerity_jax.collapse.curves import Curve, ema, ema_decay, seed_noise, spread
from celerity_jax.main import ArgumentParser, run_cli
from celerity_jax.tools import runs
from celerity_jax.tools.plot_collapse import plot

GRID = np.linspace(0.2, 1.0, 81)
TAU_OPT_20 = 0.785 * 20**-0.501
SIZES = ("celerity_nano_2", "celerity_nano_3", "celerity_nano_4")
PREDICT_STOPS = (0.3, 0.5, 0.7)


def monitor_window() -> tuple[float, float]:
  """The nano recipes' alignment window (the monitor's, so residuals here are what it would log)."""
  from celerity_jax import recipes

  col = recipes.load(SIZES[-1]).collapse
  return col.align_start, col.align_end


def plan() -> dict[str, tuple[str, list[str]]]:
  """name -> (recipe, overrides)."""
  p = {f"matched_{r[9:]}": (r, []) for r in SIZES}
  p |= {
    "seed1_nano_2": (SIZES[0], ["train.seed=1"]),
    "seed2_nano_2": (SIZES[0], ["train.seed=2"]),
    "seed1_nano_3": (SIZES[1], ["train.seed=1"]),
  }
  p |= {
    "mismatched_nano_2": (SIZES[0], [f"optim.tau={3 * TAU_OPT_20:.6g}"]),
    "mismatched_nano_4": (SIZES[2], [f"optim.tau={TAU_OPT_20 / 3:.6g}"]),
    "taulow_nano_2": (SIZES[0], [f"optim.tau={TAU_OPT_20 / 3:.6g}"]),
  }
  for tpp in (10, 40, 80):
    p[f"tpp{tpp}_nano_1"] = ("celerity_nano_1", [f"scaling.tpp={tpp}"])
  for tpp in (10, 40):
    p[f"tpp{tpp}_nano_2"] = (SIZES[0], [f"scaling.tpp={tpp}"])
  return p


def monitor_residual(run: Curve, reference: Curve) -> float:
  """max |r| over t > align_end, r as the monitor computes it with `reference`'s curve."""
  lo, hi = monitor_window()
  window = (run.t_hat >= lo) & (run.t_hat <= hi)
  ref = np.interp(run.t_hat, reference.t_hat, reference.normalized())
  estimate = predict.aligned_final_loss(run.loss_smooth[window], ref[window])
  after = run.t_hat > hi
  return float(np.abs(run.loss_smooth[after] / estimate - ref[after]).max())


def sustained_surrogate_residual(
  run: Curve, constants: surrogate.Constants, patience: int
) -> float:
  """The largest |r| held for `patience` steps against the surrogate: what an alert would need."""
  lo, hi = monitor_window()
  ref = surrogate.predict(run, constants)
  window = (run.t_hat >= lo) & (run.t_hat <= hi)
  estimate = predict.aligned_final_loss(run.loss_smooth[window], ref[window])
  after = run.t_hat > hi
  r = np.abs(run.loss_smooth[after] / estimate - ref[after])
  return float(max(r[i : i + patience].min() for i in range(len(r) - patience + 1)))


def resmoothed(c: Curve, smooth_frac: float) -> Curve:
  """The curve re-smoothed offline from its raw losses with another EMA time constant."""
  return dataclasses.replace(
    c, smooth_frac=smooth_frac, loss_smooth=ema(c.loss, ema_decay(smooth_frac, 1.0 / c.steps))
  )


def analyse(c: dict[str, Curve]) -> tuple[dict, surrogate.Constants]:
  matched = [c["matched_nano_2"], c["matched_nano_3"], c["matched_nano_4"]]
  mismatched = [c["mismatched_nano_2"], c["matched_nano_3"], c["mismatched_nano_4"]]
  seeds = [
    [c["matched_nano_2"], c["seed1_nano_2"], c["seed2_nano_2"]],
    [c["matched_nano_3"], c["seed1_nano_3"]],
  ]
  sigma = seed_noise(seeds, GRID)
  largest = max(x.n_params for x in c.values())
  without = [x for x in c.values() if x.n_params != largest]
  consts_wo, objective_wo = surrogate.fit(without)
  big = c["matched_nano_4"]
  err_surrogate, err_collapse = {}, {}
  for stop in PREDICT_STOPS:
    partial = predict.truncate(big, stop)
    err_surrogate[stop] = (
      predict.predict_final_loss(partial, constants=consts_wo) / big.final_loss - 1
    )
    err_collapse[stop] = (
      predict.predict_final_loss(partial, reference=c["matched_nano_3"]) / big.final_loss - 1
    )
  seed_pairs = [(g[i], g[j]) for g in seeds for i in range(len(g)) for j in range(len(g)) if i != j]
  consts_all, objective_all = surrogate.fit(list(c.values()))
  smoothing = {
    sf: {
      "max_delta_matched": float(spread([resmoothed(x, sf) for x in matched], GRID).max()),
      "max_delta_mismatched": float(spread([resmoothed(x, sf) for x in mismatched], GRID).max()),
    }
    for sf in (0.05, 0.1)
  }
  from celerity_jax import recipes

  patience = recipes.load(SIZES[-1]).collapse.patience
  report = {
    "max_delta_matched": float(spread(matched, GRID).max()),
    "max_delta_mismatched": float(spread(mismatched, GRID).max()),
    "max_delta_matched_late": float(spread(matched, GRID)[GRID >= 0.4].max()),
    "max_delta_mismatched_late": float(spread(mismatched, GRID)[GRID >= 0.4].max()),
    "max_sigma_seeds_late": float(sigma[GRID >= 0.4].max()),
    "max_sigma_seeds": float(sigma.max()),
    "mean_sigma_seeds": float(sigma.mean()),
    "supercollapse_frac": float((spread(matched, GRID) < sigma).mean()),
    "monitor_seed_residual_max": max(monitor_residual(a, b) for a, b in seed_pairs),
    "monitor_residual_matched_vs_nano_3": monitor_residual(big, c["matched_nano_3"]),
    "monitor_residual_mismatched_vs_nano_3": monitor_residual(
      c["mismatched_nano_4"], c["matched_nano_3"]
    ),
    "surrogate_without_largest": consts_wo._asdict(),
    "surrogate_fit_mae_without_largest": objective_wo,
    "surrogate_mae_largest_matched": surrogate.mae(big, consts_wo),
    "surrogate_mae_largest_mismatched": surrogate.mae(c["mismatched_nano_4"], consts_wo),
    "monitor_window": monitor_window(),
    "final_loss_true": big.final_loss,
    "final_loss_err_surrogate": err_surrogate,
    "final_loss_err_nano_3_curve": err_collapse,
    "final_loss_err_30pct_surrogate": err_surrogate[0.3],
    "final_loss_err_30pct_nano_3_curve": err_collapse[0.3],
    "smoothing_sensitivity": smoothing,
    "sustained_residual_nano_4_vs_surrogate_all": sustained_surrogate_residual(
      big, consts_all, patience
    ),
    "surrogate_all": consts_all._asdict(),
    "surrogate_fit_mae_all": objective_all,
    "runs": {
      k: {
        "n_params": x.n_params,
        "tpp": x.tpp,
        "tau": x.tau,
        "seed": x.seed,
        "steps": x.steps,
        "final_loss": x.final_loss,
        "initial_loss": float(x.loss[0]),
        "normalized_at_0_2": float(np.interp(0.2, x.t_hat, x.normalized())),
        "surrogate_mae": surrogate.mae(x, consts_all),
      }
      for k, x in c.items()
    },
  }
  return report, consts_all


TABLE = """| quantity | value |
|---|---|
| max Delta(t), t in [0.2, 1], matched family (tau_opt) | {max_delta_matched:.4f} |
| max Delta(t), mismatched family (3x, 1x, 1/3x tau_opt) | {max_delta_mismatched:.4f} |
| max Delta(t), t in [0.4, 1]: matched / mismatched | {max_delta_matched_late:.4f} /
{max_delta_mismatched_late:.4f} |
| seed noise sigma(t): max / mean; max over t in [0.4, 1] | {max_sigma_seeds:.4f} /
{mean_sigma_seeds:.4f}; {max_sigma_seeds_late:.4f} |
| fraction of t where Delta < sigma (supercollapse) | {supercollapse_frac:.2f} |
| max Delta, [0.2, 1], re-smoothed offline at smooth_frac 0.05 / 0.1: matched | {sm05m:.4f} /
{sm10m:.4f} |
| ... mismatched | {sm05x:.4f} / {sm10x:.4f} |
| nano_4 residual against the shipped surrogate, held for `patience` steps |
{sustained_residual_nano_4_vs_surrogate_all:.4f} |
| monitor residual max (window {monitor_window}), seed vs seed | {monitor_seed_residual_max:.4f} |
| monitor residual max, nano_4 vs nano_3 curve: matched / mismatched |
{monitor_residual_matched_vs_nano_3:.4f} / {monitor_residual_mismatched_vs_nano_3:.4f} |
| surrogate MAE on nano_4 fit without it: matched / mismatched | {surrogate_mae_largest_matched:.4f}
/ {surrogate_mae_largest_mismatched:.4f} |
| nano_4 final loss from 30%: surrogate / nano_3 curve (true {final_loss_true:.4f}) |
{final_loss_err_30pct_surrogate:+.2%} / {final_loss_err_30pct_nano_3_curve:+.2%} |
| ... from 50% / 70%: surrogate | {err_s50:+.2%} / {err_s70:+.2%} |
| ... from 50% / 70%: nano_3 curve | {err_c50:+.2%} / {err_c70:+.2%} |
"""


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/collapse")
  parser.add_argument("--figure", default="docs/collapse.png")
  parser.add_argument("--write-constants", action="store_true")
  parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
  args = parser.parse_args(argv)
  out, started = Path(args.out), time.monotonic()
  curves = {}
  for name, (recipe, overrides) in plan().items():
    curves[name] = runs.train(
      recipe, ["collapse.reference=none", *args.overrides, *overrides], out / name
    )
    print(
      f"{name}: final loss {curves[name].final_loss:.4f} "
      f"({time.monotonic() - started:.0f} s so far)",
      file=sys.stderr,
    )
  report, constants = analyse(curves)
  smoothing = report["smoothing_sensitivity"]
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
  plot(
    {
      "matched (tau_opt)": [curves[k] for k in curves if k.startswith(("matched", "seed"))],
      "mismatched tau": [
        curves["mismatched_nano_2"],
        curves["matched_nano_3"],
        curves["mismatched_nano_4"],
      ],
    },
    args.figure,
    reference=curves["matched_nano_3"],
    title="nano family, 20 TPP: residuals against nano_3's curve",
  )
  print(
    TABLE.format(
      **report,
      err_s50=report["final_loss_err_surrogate"][0.5],
      err_s70=report["final_loss_err_surrogate"][0.7],
      err_c50=report["final_loss_err_nano_3_curve"][0.5],
      err_c70=report["final_loss_err_nano_3_curve"][0.7],
      sm05m=smoothing[0.05]["max_delta_matched"],
      sm10m=smoothing[0.1]["max_delta_matched"],
      sm05x=smoothing[0.05]["max_delta_mismatched"],
      sm10x=smoothing[0.1]["max_delta_mismatched"],
    )
  )
  print(f"report: {out / 'report.json'}; figure: {args.figure}")


if __name__ == "__main__":
  sys.exit(run_cli(main))
