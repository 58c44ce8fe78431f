"""What each CPU speed measure gains, measured in one run: the step as planned against the same
step with one measure off at a time.

  python -m tools.bench_cpu_measures [recipe=celerity_tiny] [section.key=value ...] [--steps 5]

Plan-level measures (celerity_jax/execution.py) are switched off in the resolved plan itself, so
every variant runs in this process on the same data: blockwise attention (off: reference),
unrolled layers (off: scanned), the cache split (off: train.cpu_microbatch_tokens=0) and
per-device accumulation (off: accumulated under jit's sharding). Process-level measures
(celerity_jax/platform.py) need a fresh process each: one CPU device per core (off:
JAX_NUM_CPU_DEVICES=1) and glibc's huge pages (off: CELERITY_JAX_NO_HUGEPAGES=1), timed with
tools.bench_step against a fresh process with both on. Variants are timed in interleaved rounds
and each keeps its best round. `gain` = step time with the measure off / with every measure on
(for the process-level measures, tokens per second with both on / with the measure off).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.platform import CPU_DEVICES, OPT_OUT

REPO = Path(__file__).resolve().parent.parent


def plan_variants(cfg, resolved) -> dict:
  """name -> (cfg, Resolved) with that one measure off; "planned" has them all on."""
  from celerity_jax.resolve import resolve

  unsplit_cfg = dataclasses.replace(
    cfg, train=dataclasses.replace(cfg.train, cpu_microbatch_tokens=0)
  )
  unsplit = resolve(unsplit_cfg, jax.device_count())
  variants = {"planned": (cfg, resolved)}
  if resolved.attention == "blockwise":
    variants["blockwise attention"] = (cfg, dataclasses.replace(resolved, attention="reference"))
  if not resolved.scan_layers:
    variants["unrolled layers"] = (cfg, dataclasses.replace(resolved, scan_layers=True))
  if unsplit.microbatches != resolved.microbatches:
    variants["cache split"] = (unsplit_cfg, unsplit)
  if resolved.accumulate_per_device:
    off = dataclasses.replace(resolved, accumulate_per_device=False)
    variants["per-device accumulation"] = (cfg, off)
  return variants


def time_plans(variants: dict, steps: int, rounds: int) -> dict:
  """name -> best seconds per step over `rounds` interleaved rounds of `steps` steps."""
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.train.step import prepare_training

  runs = {}
  for name, (cfg, resolved) in variants.items():
    training = prepare_training(cfg, resolved)
    state = training.setup.init()
    batches = placed_batches(cfg, resolved, training.mesh, steps=2)
    state, metrics = training.train_step(state, batches[0])  # compile
    jax.block_until_ready(metrics)
    runs[name] = [training.train_step, state, batches, float("inf")]
  for _ in range(rounds):
    for run in runs.values():
      step, state, batches, best = run
      start = time.perf_counter()
      for i in range(steps):
        state, metrics = step(state, batches[i % 2])
      jax.block_until_ready(metrics)
      run[1], run[3] = state, min(best, (time.perf_counter() - start) / steps)
  return {name: run[3] for name, run in runs.items()}


def time_process(argv: list[str], steps: int, env_change: dict) -> float:
  """Tokens per second of tools.bench_step in a fresh process with `env_change` applied (with
  one CPU device, B may round to another multiple: tokens per second compare, steps do not)."""
  env = {k: v for k, v in os.environ.items() if k not in (CPU_DEVICES, OPT_OUT, "GLIBC_TUNABLES")}
  env.update(env_change)
  cmd = [sys.executable, "-m", "tools.bench_step", *argv, "--steps", str(steps)]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.splitlines()[-1])["tokens_per_s"]


def bench(argv: list[str]) -> dict:
  parser = ArgumentParser(prog="python -m tools.bench_cpu_measures", description=__doc__)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  args, rest = parser.parse_known_args(argv)
  from celerity_jax.cli import parse
  from celerity_jax.resolve import resolve

  cfg, _ = parse(rest)
  if jax.default_backend() != "cpu":
    from celerity_jax.config import ConfigError

    raise ConfigError(
      f"the CPU measures are for CPUs; this process runs on {jax.default_backend()}"
    )
  resolved = resolve(cfg, jax.device_count())
  times = time_plans(plan_variants(cfg, resolved), args.steps, args.rounds)
  base = times.pop("planned")
  gains = {name: round(t / base, 3) for name, t in times.items()}
  process = {"planned": time_process(rest, args.steps, {})}
  process["one CPU device per core"] = time_process(rest, args.steps, {CPU_DEVICES: "1"})
  process["huge pages"] = time_process(rest, args.steps, {OPT_OUT: "1"})
  process_base = process.pop("planned")
  gains |= {name: round(process_base / tps, 3) for name, tps in process.items()}
  return {
    "devices": jax.device_count(),
    "step_s_planned": round(base, 4),
    "tokens_per_s_planned_fresh_process": round(process_base, 1),
    "gain": gains,
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(bench(sys.argv[1:]), indent=2))))
