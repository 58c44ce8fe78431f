"""Early-stopped hyperparameter sweep (docs/method.md section 7): run every setting to --stop of its
tokens, predict each final loss by aligning the partial curve to the surrogate at that run's tau,
TPP and schedule, rank, optionally finish the winner, and report the compute saved.

  python -m celerity_jax.commands.sweep recipe=celerity_nano_2 --set optim.tau=0.09 \\
      --set optim.tau=0.175 --set optim.tau=0.35 [--stop 0.3] [--out runs/sweep] [--complete] \\
      [--full] [--grid section.key=v1,v2,...]

Each --set is one setting: space-separated section.key=value overrides. Each --grid multiplies the
settings by the values of one key (the cartesian product; with no --set it starts from one empty
setting), e.g. `--grid optim.lr_base=0.05,0.1 --grid param.alpha_out=2,4` is four settings.
--complete resumes the predicted winner to the end; --full also finishes every setting, to
measure the prediction error and the regret (true final loss of the chosen setting minus the best
true final loss). Settings that change B should hold tau fixed (set optim.tau, never
optim.weight_decay): then lambda moves with B/eta and the curves keep their shape, so
mid-training losses rank the settings fairly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.collapse import predict, surrogate
from celerity_jax.commands import runs
from celerity_jax.resolve import resolve


def expand(settings: list[list[str]], grids: list[str]) -> list[list[str]]:
  """The settings times every --grid key's values, in order (the last key varies fastest)."""
  out = settings or [[]]
  for grid in grids:
    key, _, values = grid.partition("=")
    if not key or not values or "," not in values:
      raise ValueError(f"--grid {grid!r}: give section.key=v1,v2[,...]")
    out = [[*s, f"{key}={v}"] for s in out for v in values.split(",")]
  return out


def sweep(
  recipe: str,
  settings: list[list[str]],
  out: Path,
  stop: float,
  complete: bool,
  full: bool,
  constants: surrogate.Constants,
) -> dict:
  rows = []
  for i, overrides in enumerate(settings):
    curve = runs.train(recipe, overrides, out / f"setting_{i}", stop)
    partial = predict.truncate(curve, stop)
    rows.append(
      {
        "setting": i,
        "overrides": overrides,
        "n_params": curve.n_params,
        "tau": curve.tau,
        "steps": curve.steps,
        "loss_at_stop": float(partial.loss_smooth[-1]),
        "predicted_final": predict.predict_final_loss(partial, constants=constants),
        "tokens": resolve(runs.config(recipe, overrides, out)).tokens,
      }
    )
  ranked = sorted(rows, key=lambda r: r["predicted_final"])
  winner = ranked[0]
  for r in rows:
    finish = full or (complete and r is winner)
    if finish:
      r["true_final"] = runs.train(
        recipe, r["overrides"], out / f"setting_{r['setting']}", 1.0
      ).final_loss
  # compute counted in tokens (settings may differ in B, and so in steps)
  full_tokens = sum(r["tokens"] for r in rows)
  used = stop * full_tokens + ((1.0 - stop) * winner["tokens"] if complete else 0.0)
  report = {
    "recipe": recipe,
    "stop": stop,
    "ranking": [r["setting"] for r in ranked],
    "winner": winner["setting"],
    "settings": rows,
    "compute_used_frac": used / full_tokens,
    "compute_saved_frac": 1 - used / full_tokens,
  }
  done = [r for r in rows if "true_final" in r]
  if len(done) == len(rows):
    best = min(done, key=lambda r: r["true_final"])
    report["true_winner"] = best["setting"]
    report["regret"] = winner["true_final"] - best["true_final"]
    report["max_abs_prediction_error"] = max(
      abs(r["predicted_final"] - r["true_final"]) / r["true_final"] for r in done
    )
  return report


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("recipe", help="recipe=NAME")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    dest="settings",
    help="one setting: space-separated section.key=value overrides",
  )
  parser.add_argument(
    "--grid",
    action="append",
    default=[],
    help="section.key=v1,v2,...: multiply the settings by these values (repeatable)",
  )
  parser.add_argument("--stop", type=float, default=0.3)
  parser.add_argument("--out", default="runs/sweep")
  parser.add_argument("--complete", action="store_true", help="finish the predicted winner")
  parser.add_argument("--full", action="store_true", help="finish every setting (evaluation)")
  parser.add_argument("--surrogate", default="", help="constants JSON (default: packaged)")
  args = parser.parse_args(argv)
  if not args.recipe.startswith("recipe="):
    parser.error("the first argument is recipe=NAME")
  try:
    settings = expand([s.split() for s in args.settings], args.grid)
  except ValueError as e:
    parser.error(str(e))
  if len(settings) < 2 or not 0.2 < args.stop <= 1.0:
    parser.error("give at least two settings (--set or --grid) and --stop in (0.2, 1]")
  report = sweep(
    args.recipe.split("=", 1)[1],
    settings,
    Path(args.out),
    args.stop,
    args.complete,
    args.full,
    surrogate.load_constants(args.surrogate),
  )
  Path(args.out, "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps(report, indent=2))
  winner = report["winner"]
  print(
    f"winner: setting {winner} ({' '.join(report['settings'][winner]['overrides'])}); "
    f"compute saved {100 * report['compute_saved_frac']:.1f}%"
    + (f"; regret {report['regret']:.4f}" if "regret" in report else "")
  )


if __name__ == "__main__":
  sys.exit(run_cli(main))
