"""Loss against batch size at fixed tokens and fixed tau: where the batch stops being free.

  python -m tools.critical_batch [recipe=celerity_nano_2] [--batches 8,16,32,64,160]
      [--seeds 0] [--out runs/critical_batch] [--tolerance 0.01] [section.key=value ...]

Every run trains the recipe's D tokens (its TPP) at train.batch_size=B with optim.tau held at the
recipe's tau, so lambda moves with B (tau = B / (eta lambda D)) and only the number of steps
changes. Below the critical batch a larger B reaches the same loss in fewer steps; above it the
loss rises (McCandlish et al. 2018; the paper's section 2 assumes B below it). The critical batch
reported is the largest B whose final loss (mean over the seeds) is within --tolerance of the best
B's. Finished runs in --out are reused, so the scan resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from celerity_jax.cli import ArgumentParser, recipe_name, run_cli
from celerity_jax.commands import runs


def critical(batches: list[int], losses: list[float], tolerance: float) -> int:
  """The largest batch whose loss is within `tolerance` (relative) of the lowest loss."""
  best = min(losses)
  return max(b for b, loss in zip(batches, losses, strict=True) if loss <= best * (1 + tolerance))


def int_list(parser, flag: str, text: str, least: int) -> list[int]:
  """A comma-separated list of distinct ints >= `least`, or a usage error naming the flag."""
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    parser.error(f"{flag} {text!r}: give comma-separated integers")
  if min(values) < least or len(set(values)) != len(values):
    parser.error(f"{flag} {text!r}: give distinct integers >= {least}")
  return values


def scan(recipe: str, batches, seeds, overrides: list[str], out: Path, tolerance: float) -> dict:
  import jax

  from celerity_jax.resolve import resolve

  base = resolve(runs.config(recipe, overrides, out / "base"), len(jax.devices()))
  tau = base.tau
  rows, started = [], time.monotonic()
  for b in batches:
    finals, steps = [], None
    for seed in seeds:
      curve = runs.train(
        recipe,
        [
          "collapse.reference=none",
          *overrides,
          f"train.batch_size={b}",
          f"optim.tau={tau:.6g}",
          f"train.seed={seed}",
        ],
        out / f"b{b}_seed{seed}",
      )
      finals.append(curve.final_loss)
      steps = curve.steps
      print(
        f"B={b} seed {seed}: final loss {curve.final_loss:.4f} in {steps} steps "
        f"({time.monotonic() - started:.0f} s so far)",
        file=sys.stderr,
      )
    rows.append(
      {
        "batch_seqs": b,
        "steps": steps,
        "final_losses": finals,
        "final_loss_mean": float(np.mean(finals)),
        "final_loss_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
      }
    )
  means = [r["final_loss_mean"] for r in rows]
  best = min(means)
  for r in rows:
    r["vs_best"] = r["final_loss_mean"] / best - 1
  return {
    "recipe": recipe,
    "n_params": base.n_params,
    "tau": tau,
    "tokens": base.tokens,
    "tolerance": tolerance,
    "critical_batch_seqs": critical([r["batch_seqs"] for r in rows], means, tolerance),
    "rows": rows,
    "wall_s": time.monotonic() - started,
  }


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="8,16,32,64,160")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--out", default="runs/critical_batch")
  parser.add_argument("--tolerance", type=float, default=0.01)
  args, rest = parser.parse_known_args(argv)
  recipe = recipe_name(rest)
  overrides = [a for a in rest if not a.startswith("recipe=")]
  batches, seeds = (
    int_list(parser, "--batches", args.batches, 1),
    int_list(parser, "--seeds", args.seeds, 0),
  )
  if not 0 <= args.tolerance < math.inf:  # NaN and inf fail this too
    parser.error(f"--tolerance {args.tolerance}: must be a finite number >= 0")
  out = Path(args.out) / recipe
  report = scan(recipe, batches, seeds, overrides, out, args.tolerance)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  print("| B (sequences) | steps | final loss | vs best |\n|---|---|---|---|")
  for r in report["rows"]:
    loss, vs = r["final_loss_mean"], r["vs_best"]
    print(f"| {r['batch_seqs']} | {r['steps']} | {loss:.4f} | {vs:+.2%} |")
  print(
    f"critical batch (within {args.tolerance:.0%} of the best): {report['critical_batch_seqs']}"
  )


if __name__ == "__main__":
  sys.exit(run_cli(main))
