"""The fault-injection campaign: how often does the collapse monitor catch a fault, how late, and
how often does it cry wolf?

  python -m tools.fault_campaign [--out runs/faults] [--workers 2] [--runs-per-cell 10]
      [--kinds K,...] [--figure docs/faults.png] [--analyse-only]

One command, resumable: finished runs (a `done.json` beside their metrics) are never trained
again, an unfinished one is trained again from its start. Clean runs: celerity_nano_1 seeds 0-9,
celerity_nano_2 seeds 0-19, celerity_nano_3 seeds 0-9 (the false-alarm set). Fault runs: for every
kind and severity (tools/fault_kinds.py), `--runs-per-cell` runs of celerity_nano_2, run i branched
from clean seed i's checkpoint at an injection step drawn uniformly from the multiples of 5 with
t in [0.2, 0.8] (numpy seed from the kind, severity and i), then resumed through the fault's
segments. Every process runs on one CPU device, so a run's numbers do not depend on --workers.
The analysis (tools/fault_analysis.py, pre-registered in docs/faults.md) replays the monitor
offline from each run's logged raw losses against its planned reference curve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from celerity_jax.cli import ArgumentParser, run_cli
from tools.fault_kinds import KINDS, SEVERITIES, Planned, fault_sources, segments

FAULT_RECIPE = "celerity_nano_2"
CLEAN = {"celerity_nano_1": range(10), "celerity_nano_2": range(20), "celerity_nano_3": range(10)}
EVERY = 5  # the branch points: base runs keep a checkpoint every EVERY steps
INJECT_RANGE = (0.2, 0.8)
COMMON = ["train.eval_every=0", "run.progress=false", "run.tensorboard=false"]


@dataclass(frozen=True)
class Spec:
  name: str
  recipe: str
  seed: int
  kind: str = ""  # "": a clean run
  severity: str = ""
  inject_step: int = 0


def inject_step(kind: str, severity: str, i: int, steps: int) -> int:
  rng = np.random.default_rng(zlib.crc32(f"{kind}/{severity}/{i}".encode()))
  lo, hi = (int(np.ceil(f * steps / EVERY)) for f in INJECT_RANGE)
  return EVERY * int(rng.integers(lo, min(hi, (steps - 1) // EVERY) + 1))


def plan(runs_per_cell: int, kinds=KINDS, steps: int = 0) -> tuple[list[Spec], list[Spec]]:
  """(clean runs, fault runs); a fault run of seed i branches from the fault recipe's clean run
  of seed i, whose T is `steps` (0: no fault runs yet, before the clean runs exist)."""
  clean = [
    Spec(f"clean_{r.removeprefix('celerity_')}_s{s}", r, s) for r, seeds in CLEAN.items()
    for s in seeds
  ]  # fmt: skip
  faults = [
    Spec(f"{k}_{v}_{i}", FAULT_RECIPE, i, k, v, inject_step(k, v, i, steps))
    for k in kinds
    for v in SEVERITIES
    for i in range(runs_per_cell)
  ] if steps else []  # fmt: skip
  return clean, faults


def base_name(seed: int) -> str:
  return f"clean_{FAULT_RECIPE.removeprefix('celerity_')}_s{seed}"


def clean_overrides(spec: Spec, runs_per_cell: int) -> list[str]:
  o = [*COMMON, f"train.seed={spec.seed}"]
  if spec.recipe == FAULT_RECIPE and spec.seed < runs_per_cell:  # a branch point of fault runs
    return [*o, f"checkpoint.every_steps={EVERY}", f"checkpoint.keep_every={EVERY}"]
  return [*o, "checkpoint.every_steps=0"]


def done(run_dir: Path) -> bool:
  return (run_dir / "done.json").is_file()


def finish(run_dir: Path, spec: Spec, started: float):
  record = asdict(spec) | {"wall_s": round(time.monotonic() - started, 2)}
  (run_dir / "done.json").write_text(json.dumps(record) + "\n")


def train_clean(spec: Spec, out: Path, runs_per_cell: int):
  from celerity_jax.commands import runs

  run_dir = out / spec.name
  if done(run_dir):
    return
  started = time.monotonic()
  shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
  runs.train(spec.recipe, clean_overrides(spec, runs_per_cell), run_dir)
  finish(run_dir, spec, started)


def planned(out: Path) -> Planned:
  """The fault recipe's planned settings, from its clean seed-0 run (which the data faults'
  files and tokenizer come from)."""
  base = out / base_name(0)
  derived = json.loads((base / "config.json").read_text())
  cfg, d = derived["config"], derived["derived"]
  tokenizer = next(str(p) for p in sorted(base.glob("tokenizer.*")))
  return Planned(
    d["steps"], d["batch_seqs"], cfg["optim"]["lr_base"], d["weight_decay"], out / "data", tokenizer
  )


def branch(spec: Spec, base: Path, run_dir: Path):
  """run_dir as the clean run `base` was at the injection step: its config, tokenizer, metrics
  rows up to that step and that step's checkpoint."""
  run_dir.mkdir(parents=True)
  for f in base.glob("tokenizer*"):
    shutil.copy2(f, run_dir / f.name)
  shutil.copy2(base / "config.json", run_dir / "config.json")
  rows = []
  for line in (base / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row.get("step", 0) <= spec.inject_step:
      rows.append(line)
  (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
  shutil.copytree(
    base / "checkpoints" / str(spec.inject_step), run_dir / "checkpoints" / str(spec.inject_step)
  )


def train_fault(spec: Spec, out: Path, p: Planned):
  from celerity_jax.commands import runs
  from celerity_jax.train import loop

  run_dir = out / spec.name
  if done(run_dir):
    return
  started = time.monotonic()
  shutil.rmtree(run_dir, ignore_errors=True)
  branch(spec, out / base_name(spec.seed), run_dir)
  base = [*COMMON, f"train.seed={spec.seed}", "checkpoint.every_steps=0"]
  for seg in segments(spec.kind, spec.severity, spec.inject_step, p):
    extra = [
      *seg.overrides,
      "checkpoint.allow_config_change=true",
      f"checkpoint.restore_optimizer={str(seg.restore_optimizer).lower()}",
      f"train.stop_step={seg.until or 0}",
    ]
    loop.run(runs.config(spec.recipe, [*base, *extra], run_dir))
  finish(run_dir, spec, started)


def work(out: Path, phase: str, worker: int, workers: int, runs_per_cell: int, kinds):
  """One worker's share of a phase (every workers-th run)."""
  if phase == "clean":
    for spec in plan(runs_per_cell, kinds)[0][worker::workers]:
      train_clean(spec, out, runs_per_cell)
  else:
    p = planned(out)
    for spec in plan(runs_per_cell, kinds, p.steps)[1][worker::workers]:
      train_fault(spec, out, p)


def prebuild(recipe: str, overrides: list[str]):
  """Tokenizes (once, cached) the data a phase's runs read, in this process, so that the workers
  never build the same token store at once."""
  from celerity_jax import recipes
  from celerity_jax.data.prepare import prepare

  cfg = recipes.configure(recipe, [*COMMON, *overrides])
  prepare(cfg.data, cfg.model.vocab_size)


def run_phase(out: Path, phase: str, workers: int, runs_per_cell: int, kinds):
  """The phase's runs split over `workers` processes, one CPU device each."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "tools.fault_campaign",
        "--out",
        str(out),
        "--phase",
        phase,
        "--worker",
        str(i),
        "--workers",
        str(workers),
        "--runs-per-cell",
        str(runs_per_cell),
        "--kinds",
        ",".join(kinds),
      ],
      env=env,
    )  # fmt: skip
    for i in range(workers)
  ]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(
      f"fault_campaign: a {phase} worker failed (exit codes {codes}); rerun to resume"
    )


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/faults")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--runs-per-cell", type=int, default=10)
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--figure", default="docs/faults.png")
  parser.add_argument("--analyse-only", action="store_true")
  parser.add_argument("--phase", choices=("clean", "faults"), help=argparse.SUPPRESS)
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  out, kinds = Path(args.out), [k for k in args.kinds.split(",") if k]
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    parser.error(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(KINDS)}")
  if args.phase:  # a worker
    work(out, args.phase, args.worker, args.workers, args.runs_per_cell, kinds)
    return
  started = time.monotonic()
  if not args.analyse_only:
    out.mkdir(parents=True, exist_ok=True)
    prebuild(FAULT_RECIPE, [])
    run_phase(out, "clean", args.workers, args.runs_per_cell, kinds)
    p = planned(out)
    for path in fault_sources(p.data_dir, p.tokenizer).values():
      prebuild(FAULT_RECIPE, [f"data.paths={path}", f"data.tokenizer={p.tokenizer}"])
    run_phase(out, "faults", args.workers, args.runs_per_cell, kinds)
  from tools import fault_analysis

  report = fault_analysis.analyse(out, *plan(args.runs_per_cell, kinds, planned(out).steps))
  report["wall_s"] = round(time.monotonic() - started, 1)
  (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  fault_analysis.figure(out, report, args.figure)
  print(fault_analysis.tables(report))
  print(f"report: {out / 'report.json'}; figure: {args.figure}")


if __name__ == "__main__":
  sys.exit(run_cli(main))
