"""The training loop's tokens/s against its step's alone, in one process.

  python -m tools.bench_loop recipe=celerity_tiny [section.key=value ...] [--steps 40]

Runs the real loop (`celerity_jax.main`'s run: data, logging, evaluation, checkpoints) for
`--steps` steps into a temporary run directory, and times the same jitted step alone on a fixed
batch (as tools.bench_step does) both before and after the loop: the step's rate is the mean of the
two, since a small machine's speed drifts by more than the gap being measured. The loop's rate is
its logged tokens over the time between its first and last logged rows, so compilation is left out
and everything after it (the reader, the metric fetches, TensorBoard, evaluation, checkpoint saves)
is in.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import jax

from celerity_jax.cli import ArgumentParser, run_cli


def loop_rate(metrics_path: Path) -> tuple[float, int]:
  """(tokens/s between the first and the last logged step row, steps in that span)."""
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
  rows = [r for r in rows if r.get("tokens_per_s")]  # step rows after the first
  seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in pairwise(rows))
  return (rows[-1]["tokens"] - rows[0]["tokens"]) / seconds, rows[-1]["step"] - rows[0]["step"]


def bench(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--bench-steps", type=int, default=3)
  args, rest = parser.parse_known_args(argv)

  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.loop import run
  from celerity_jax.train.step import prepare_training
  from tools.bench_step import interleaved_step_times

  with tempfile.TemporaryDirectory() as run_dir:
    overrides = [f"run.dir={run_dir}", "run.progress=false", f"train.stop_step={args.steps}"]
    cfg, _ = parse(rest + overrides)
    training = prepare_training(cfg, resolve(cfg, jax.device_count()))
    [batch] = placed_batches(cfg, training.resolved, training.mesh)
    runs = {"step": {"step": training.train_step, "state": training.setup.init(), "batch": batch}}
    tokens = training.resolved.batch_tokens
    before = tokens / interleaved_step_times(runs, args.bench_steps, rounds=3)["step"]
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    after = tokens / interleaved_step_times(runs, args.bench_steps, rounds=3)["step"]
    loop, span = loop_rate(Path(run_dir) / "metrics.jsonl")
  step = (before + after) / 2
  return {
    "batch_tokens": tokens,
    "microbatches": training.resolved.microbatches,
    "loop_steps_timed": span,
    "loop_tokens_per_s": round(loop, 1),
    "step_tokens_per_s_before": round(before, 1),
    "step_tokens_per_s_after": round(after, 1),
    "loop_over_step": round(loop / step, 3),
    "loop_wall_s": round(wall, 1),
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(bench(sys.argv[1:])))))
