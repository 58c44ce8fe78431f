"""Train-step benchmark: tokens/s and MFU against the matmul ceiling measured in the same process.

  python -m tools.bench_step recipe=celerity_tiny [section.key=value ...] [--steps 10]
  python -m tools.bench_step recipe=celerity_1b --compile-only   # allocates nothing
  python -m tools.bench_step recipe=celerity_tiny --monitor-overhead   # monitor cost

FLOPs convention: 6 x (matmul params, unembedding included, input embedding excluded) per token
plus causal attention 6 x layers x seq_len x heads x d_head (MaxText; full attention doubles the
attention term, reported too). MFU = achieved FLOP/s / ceiling, where the ceiling is the best
throughput of a square matmul (size --ceiling-n) in the compute dtype, measured in this process.
Peak RSS is the process's maximum resident set size.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from celerity_jax.cli import ArgumentParser, run_cli


def matmul_ceiling(n: int, dtype, repeats: int = 10) -> float:
  """Best FLOP/s of an n x n x n matmul in `dtype` (float32 accumulation for bf16)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def compile_time(cfg, resolved, setup, step) -> dict:
  """Seconds to lower and compile the train step for abstract (never allocated) state and batch."""
  abstract_state = jax.eval_shape(setup.init)
  tokens = jax.ShapeDtypeStruct((resolved.batch_seqs, cfg.model.seq_len), jnp.int32)
  t0 = time.perf_counter()
  lowered = step.lower(abstract_state, {"inputs": tokens, "targets": tokens})
  lower_s = time.perf_counter() - t0
  lowered.compile()
  return {
    "n_params": resolved.n_params,
    "n_layers": cfg.model.n_layers,
    "scan_layers": cfg.model.scan_layers,
    "batch_seqs": resolved.batch_seqs,
    "lower_s": round(lower_s, 2),
    "compile_s": round(time.perf_counter() - t0 - lower_s, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


def timed_steps(step, state, batches, warmup: int, steps: int) -> tuple[float, float, dict]:
  """(seconds of the first step, which compiles; mean seconds per step of `steps` steps after
  `warmup` more; the last step's metrics), cycling through `batches`."""
  t0 = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  return compile_s, (time.perf_counter() - t0) / steps, metrics


def interleaved_step_times(runs: dict, steps: int, rounds: int) -> dict:
  """Median seconds per step of each run {name: {"step", "state", "batch"}}, timed in interleaved
  rounds of `steps` steps (round 0 compiles and is dropped), so machine noise hits all alike."""
  times = {name: [] for name in runs}
  for round_ in range(rounds + 1):
    for name, run in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        run["state"], metrics = run["step"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      if round_:
        times[name].append((time.perf_counter() - t0) / steps)
  return {name: float(np.median(t)) for name, t in times.items()}


def monitor_overhead(cfg, setup, with_monitor, without, mesh, resolved, steps: int) -> dict:
  """Interleaved rounds of `steps` steps of each variant; the ratio of median round times."""
  from celerity_jax.data.synthetic import placed_batches

  [batch] = placed_batches(cfg, resolved, mesh)
  runs = {
    name: {"step": fn, "state": setup.init(), "batch": batch}
    for name, fn in (("with", with_monitor), ("without", without))
  }
  med = interleaved_step_times(runs, steps, rounds=6)
  # the ratio above is within this machine's noise, so also time the monitor alone: 1000 updates
  # in one jitted scan, per update (an upper bound: in the step XLA fuses it with the loss)
  from celerity_jax.collapse import monitor

  spec = monitor.build_spec(cfg, resolved)

  @jax.jit
  def updates(losses):
    body = lambda st, x: monitor.update(spec, st, x[0], x[1], True)  # noqa: E731
    return jax.lax.scan(body, monitor.init_state(), (losses, jnp.arange(1, 1001)))[1]

  losses = jnp.linspace(5.0, 3.0, 1000)
  jax.block_until_ready(updates(losses))
  t0 = time.perf_counter()
  jax.block_until_ready(updates(losses))
  alone = (time.perf_counter() - t0) / 1000
  return {
    "n_params": resolved.n_params,
    "batch_tokens": resolved.batch_tokens,
    "reference": cfg.collapse.reference,
    "step_s_with_monitor": round(med["with"], 5),
    "step_s_without": round(med["without"], 5),
    "monitor_overhead_frac": round(med["with"] / med["without"] - 1, 4),
    "monitor_update_s": alone,
    "monitor_update_frac_of_step": alone / med["without"],
  }


def bench(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--ceiling-n", type=int, default=2048)
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="use this chip peak (TFLOP/s) instead of the measured matmul ceiling",
  )
  parser.add_argument(
    "--compile-only",
    action="store_true",
    help="lower and compile the step from abstract shapes; report compile time",
  )
  parser.add_argument(
    "--monitor-overhead",
    action="store_true",
    help="step time with the collapse monitor vs the same step without it",
  )
  args, rest = parser.parse_known_args(argv)

  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  cfg, _ = parse(rest)
  resolved = resolve(cfg, jax.device_count())
  training = prepare_training(cfg, resolved)
  setup, step, mesh = training.setup, training.train_step, training.mesh
  if args.compile_only:
    return compile_time(cfg, resolved, setup, step)
  if args.monitor_overhead:
    without = prepare_training(cfg, resolved, with_monitor=False).train_step
    return monitor_overhead(cfg, setup, step, without, mesh, resolved, args.steps)
  batches = placed_batches(cfg, resolved, mesh, steps=2)

  compile_s, step_s, metrics = timed_steps(step, setup.init(), batches, args.warmup, args.steps)

  dtype = jnp.dtype(cfg.model.dtype)
  ceiling = args.peak_tflops * 1e12 if args.peak_tflops else matmul_ceiling(args.ceiling_n, dtype)
  tokens_per_s = resolved.batch_tokens / step_s
  achieved = tokens_per_s * resolved.flops_per_token
  return {
    "n_params": resolved.n_params,
    "batch_tokens": resolved.batch_tokens,
    "dtype": cfg.model.dtype,
    "devices": len(jax.devices()),
    "backend": jax.default_backend(),
    "compile_s": round(compile_s, 2),
    "step_s": round(step_s, 4),
    "tokens_per_s": round(tokens_per_s, 1),
    "flops_per_token": resolved.flops_per_token,
    "achieved_gflops": round(achieved / 1e9, 2),
    "ceiling_gflops": round(ceiling / 1e9, 2),
    "ceiling": "chip peak" if args.peak_tflops else f"measured {args.ceiling_n}^3 matmul",
    "mfu": round(achieved / ceiling, 4),
    "mfu_full_attn_flops": round(tokens_per_s * resolved.flops_per_token_full_attn / ceiling, 4),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "final_loss": float(np.asarray(metrics["loss"])),
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(bench(sys.argv[1:])))))
