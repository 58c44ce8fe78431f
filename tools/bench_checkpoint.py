"""Checkpoint benchmark: how long the training loop is blocked per async save, against step time.

  python -m tools.bench_checkpoint recipe=celerity_tiny [section.key=value ...] \
      [--saves 5]

The blocked time is the duration of the `save()` call (device-to-host copy and dispatch; the write
itself runs in the background), measured over --saves saves with the previous save finished first.
Reported as a fraction of one step and amortized over checkpoint.every_steps.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli


def main(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  args, rest = parser.parse_known_args(argv)

  import jax

  from celerity_jax.checkpoint import Checkpointer
  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  cfg, _ = parse(rest)
  resolved = resolve(cfg, jax.device_count())
  training = prepare_training(cfg, resolved)
  step = training.train_step
  state = training.setup.init()
  [batch] = placed_batches(cfg, resolved, training.mesh)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - t0)
  step_s = statistics.median(step_times)
  state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6

  blocked = []
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = Checkpointer(Path(tmp), cfg.checkpoint)
    for i in range(args.saves):
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      t0 = time.perf_counter()
      ckpt.save(i + 1, state, {"step": i + 1}, force=True)
      blocked.append(time.perf_counter() - t0)
      ckpt.wait()
    ckpt.close()
  blocked_s = statistics.median(blocked)
  every = cfg.checkpoint.every_steps or 1
  return {
    "n_params": resolved.n_params,
    "state_mb": round(state_mb, 1),
    "step_s": round(step_s, 4),
    "blocked_s": round(blocked_s, 4),
    "blocked_over_step": round(blocked_s / step_s, 4),
    "every_steps": every,
    "blocked_over_step_amortized": round(blocked_s / (every * step_s), 5),
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(main(sys.argv[1:])))))
