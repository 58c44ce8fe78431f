"""Train-step benchmark: tokens/s and MFU against the matmul ceiling measured in the same process.

  python -m tools.bench_step recipe=celerity_tiny [section.key=value ...] [--steps 10]
  python -m tools.bench_step recipe=celerity_1b --compile-only   # compile time only, allocates nothing

FLOPs convention: 6 x (matmul params, unembedding included, input embedding excluded) per token
plus causal attention 6 x layers x seq_len x heads x d_head (MaxText; full attention doubles the
attention term, reported too). MFU = achieved FLOP/s / ceiling, where the ceiling is the best
throughput of a square matmul (size --ceiling-n) in the compute dtype, measured in this process.
Peak RSS is the process's maximum resident set size.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


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
  return 2.0 * n ** 3 / best


def compile_time(cfg, resolved, setup, step) -> dict:
  """Seconds to lower and compile the train step for abstract (never allocated) state and batch."""
  abstract_state = jax.eval_shape(setup.init)
  tokens = jax.ShapeDtypeStruct((resolved.batch_seqs, cfg.model.seq_len), jnp.int32)
  t0 = time.perf_counter()
  lowered = step.lower(abstract_state, {"inputs": tokens, "targets": tokens})
  lower_s = time.perf_counter() - t0
  lowered.compile()
  return {"n_params": resolved.n_params, "n_layers": cfg.model.n_layers,
          "scan_layers": cfg.model.scan_layers, "batch_seqs": resolved.batch_seqs,
          "lower_s": round(lower_s, 2), "compile_s": round(time.perf_counter() - t0 - lower_s, 2),
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--ceiling-n", type=int, default=2048)
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="use this chip peak (TFLOP/s) instead of the measured matmul ceiling")
  parser.add_argument("--compile-only", action="store_true",
                      help="lower and compile the step from abstract shapes; report compile time")
  args, rest = parser.parse_known_args(argv)

  from celerity_jax.main import parse
  from celerity_jax import sharding
  from celerity_jax.data.synthetic import SyntheticTokens
  from celerity_jax.train.step import prepare_training

  cfg, _ = parse(rest)
  mesh, resolved, setup, step = prepare_training(cfg)
  if args.compile_only:
    return compile_time(cfg, resolved, setup, step)
  state = setup.init()
  data = SyntheticTokens(cfg.model.vocab_size, cfg.model.seq_len, resolved.batch_seqs, 0)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = [{k: jax.device_put(v, batch_sharding) for k, v in data.batch(i).items()}
             for i in range(2)]

  t0 = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps

  dtype = jnp.dtype(cfg.model.dtype)
  ceiling = (args.peak_tflops * 1e12 if args.peak_tflops
             else matmul_ceiling(args.ceiling_n, dtype))
  tokens_per_s = resolved.batch_tokens / step_s
  achieved = tokens_per_s * resolved.flops_per_token
  return {
      "n_params": resolved.n_params, "batch_tokens": resolved.batch_tokens,
      "dtype": cfg.model.dtype, "devices": len(jax.devices()), "backend": jax.default_backend(),
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
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
  print(json.dumps(bench(sys.argv[1:])))
