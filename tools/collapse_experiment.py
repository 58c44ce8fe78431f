"""The collapse experiment: does a family at fixed TPP and tau_opt collapse under the published
definitions (Qiu et al.'s and Celerity's) and ours, does a mismatched tau break it, does the
surrogate fitted without the largest member predict it, how well do 10/20/30% of a run predict its
final loss, and does an early-stopped tau x eta sweep pick the best setting?

  python -m tools.collapse_experiment [--family long|gpu] [--out DIR] [--figure PNG]
      [--workers N] [--analyse-only] [--dry-run] [section.key=value ...]

Families and runs: tools/collapse_plan.py. `long` (the default): celerity_long_1..4 (74k-339k
parameters at depth 2, 5,785-26,462 steps) on the stdlib corpus, 31 runs with the follow-up's
long_5, about 45 minutes on 2 CPU cores with --workers 2; `gpu`: celerity_gpu_10m..150m on a
corpus of at least 3e9 training tokens (data.paths=...; --workers 1). Stage 1 sweeps the first
size over tau x eta; stage 2 trains the family at tau_opt and the sweep's best eta. Finished runs
are reused and an unfinished one resumes from its last checkpoint, so the same command resumes
the experiment. Runs are split over --workers processes, one CPU device each, so a run's numbers
do not depend on --workers (one worker trains in this process, on its own devices).
Definitions and marks: celerity_jax/collapse/definitions.py and tools/collapse_analysis.py
(pre-registered in docs/collapse_long.md). --dry-run prints every run's N, D, B, T
and FLOPs and trains nothing. Overrides apply to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.commands import runs
from celerity_jax.commands.plan import PEAK_TFLOPS
from tools.collapse_plan import (
  FAMILIES,
  Family,
  Run,
  budget,
  check_corpus,
  eval_overrides,
  family,
  lr_star,
  resolved,
  stage_record,
  sweep,
)


def stage_runs(f: Family, stage: str, out: Path, base: list[str]) -> list[Run]:
  return sweep(f, base) if stage == "sweep" else family(f, lr_star(f, out), base)


def shares(f: Family, todo: list[Run], base: list[str], workers: int) -> list[list[Run]]:
  """The runs split over the workers by cost, longest first onto the least loaded (LPT)."""
  cost = {}
  for r in todo:
    x = resolved(r.recipe, [*base, *r.overrides])
    cost[r.name] = x.tokens * x.flops_per_token
  loads, out = [0.0] * workers, [[] for _ in range(workers)]
  for r in sorted(todo, key=lambda r: -cost[r.name]):
    i = loads.index(min(loads))
    loads[i] += cost[r.name]
    out[i].append(r)
  return out


def train_run(f: Family, r: Run, out: Path, base: list[str]):
  overrides = [*base, *r.overrides]
  started = time.monotonic()
  curve = runs.train(r.recipe, [*overrides, *eval_overrides(f, r.recipe, overrides)], out / r.name)
  print(
    f"{r.name}: final loss {curve.final_loss:.4f} ({time.monotonic() - started:.0f} s)",
    file=sys.stderr,
  )


def work(f: Family, stage: str, out: Path, base: list[str], worker: int, workers: int):
  for r in shares(f, stage_runs(f, stage, out, base), base, workers)[worker]:
    train_run(f, r, out, base)


def run_stage(f: Family, stage: str, out: Path, overrides: list[str], workers: int):
  """The stage's runs over `workers` processes, one CPU device each; with one worker, in this
  process (on its devices: a GPU, or the CPU devices it was started with)."""
  if workers == 1:
    work(f, stage, out, ["collapse.reference=none", *overrides], 0, 1)
    return
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  command = [sys.executable, "-m", "tools.collapse_experiment", "--family", f.name]
  command += ["--out", str(out), "--stage", stage, "--workers", str(workers)]
  procs = [
    subprocess.Popen([*command, "--worker", str(i), *overrides], env=env) for i in range(workers)
  ]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(
      f"collapse_experiment: a {stage} worker failed (exit codes {codes}); rerun to resume"
    )


def dry_run(f: Family, base: list[str]) -> None:
  """Every run the experiment would train, with its size and cost; nothing is trained."""
  rows, totals = budget(f, base)
  print(f"{'run':<22} {'stage':<7} {'N':>11} {'D':>14} {'B seq':>6} {'T':>7} {'FLOPs':>9}")
  for r in rows:
    print(
      f"{r['name']:<22} {r['stage']:<7} {r['n_params']:>11,} {r['tokens']:>14,.0f} "
      f"{r['batch_seqs']:>6} {r['steps']:>7} {r['flops']:>9.3g}"
    )
  hours = totals["flops"] / (PEAK_TFLOPS["h100"] * 1e12 * 0.4) / 3600
  print(
    f"{totals['runs']} runs (the family stage at eta x 1), {totals['flops']:.3g} FLOPs "
    f"({hours:.2f} h on one H100 at 40% MFU); the corpus must hold {totals['max_tokens']:,.0f} "
    f"training tokens"
  )


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", choices=sorted(FAMILIES), default="long")
  parser.add_argument("--out", default=None, help="default: runs/collapse_long, ..._gpu")
  parser.add_argument("--figure", default=None, help="default: docs/collapse_long.png, ..._gpu")
  parser.add_argument("--workers", type=int, default=2, help="processes (one CPU device each)")
  parser.add_argument("--analyse-only", action="store_true", help="report on the runs there")
  parser.add_argument("--dry-run", action="store_true", help="print the runs and their cost")
  parser.add_argument("--stage", choices=("sweep", "family"), help=argparse.SUPPRESS)
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
  args = parser.parse_args(argv)
  if args.workers < 1:
    parser.error(f"--workers must be at least 1 (got {args.workers})")
  f = FAMILIES[args.family]
  out, figure = Path(args.out or f.out), args.figure or f.figure
  base = ["collapse.reference=none", *args.overrides]
  if args.stage:  # a worker
    work(f, args.stage, out, base, args.worker, args.workers)
    return
  if args.dry_run:
    dry_run(f, base)
    return
  started = time.monotonic()
  if not args.analyse_only:
    check_corpus(f.sizes[-1], base, budget(f, base)[1]["max_tokens"])
    out.mkdir(parents=True, exist_ok=True)
    run_stage(f, "sweep", out, args.overrides, args.workers)
    stage_record(out, lr_star(f, out))
    run_stage(f, "family", out, args.overrides, args.workers)
  from tools import collapse_analysis, collapse_report

  report, drawn = collapse_analysis.analyse(f, out, base)
  report["wall_s"] = round(time.monotonic() - started, 1)
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  collapse_report.figure(report, drawn, figure)
  print(collapse_report.tables(report))
  print(f"report: {out / 'report.json'}; figure: {figure}")


if __name__ == "__main__":
  sys.exit(run_cli(main))
