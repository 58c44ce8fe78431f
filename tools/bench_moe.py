"""MoE step-time benchmark: a mixture-of-experts recipe against the dense model with the same active
parameters, both dispatch modes, timed in interleaved rounds in one process.

  python -m tools.bench_moe recipe=celerity_moe_nano_4 [section.key=value ...] \
      [--steps 3]
      [--rounds 5] [--peak-tflops 989]

The dense twin is the recipe with model.experts=0 and d_ff = top_k x expert width, so its active
parameters equal the MoE's minus the router, and D, B and T match. MFU counts active-parameter FLOPs
(6 N_active + causal attention, as bench_step) against the measured matmul ceiling or the given chip
peak. Ratios are medians of per-round step times.
"""

from __future__ import annotations

import json
import sys

import jax

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError


def variants(cfg) -> dict:
  from celerity_jax.config import apply_overrides
  from celerity_jax.config_checks import validate

  model = cfg.model
  if not model.experts:
    raise ConfigError("tools.bench_moe: the recipe has model.experts=0; give an MoE recipe")
  width = model.top_k * (model.expert_d_ff or model.d_ff)
  out = {"dense": validate(apply_overrides(cfg, ["model.experts=0", f"model.d_ff={width}"]))}
  for dispatch in ("dropless", "capacity"):
    out[f"moe_{dispatch}"] = validate(apply_overrides(cfg, [f"model.dispatch={dispatch}"]))
  return out


def bench(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="steps per round")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm round)")
  parser.add_argument("--peak-tflops", type=float, default=0.0)
  parser.add_argument("--ceiling-n", type=int, default=2048)
  args, rest = parser.parse_known_args(argv)

  import jax.numpy as jnp

  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training
  from tools.bench_step import interleaved_step_times, matmul_ceiling

  cfg, _ = parse(rest)
  runs = {}
  for name, variant in variants(cfg).items():
    resolved = resolve(variant, jax.device_count())
    training = prepare_training(variant, resolved)
    [batch] = placed_batches(variant, resolved, training.mesh)
    runs[name] = {
      "step": training.train_step,
      "state": training.setup.init(),
      "batch": batch,
      "resolved": resolved,
    }
  step_s = interleaved_step_times(runs, args.steps, args.rounds)
  ceiling = (
    args.peak_tflops * 1e12
    if args.peak_tflops
    else matmul_ceiling(args.ceiling_n, jnp.dtype(cfg.model.dtype))
  )
  dense_s = step_s["dense"]
  out = {
    "backend": jax.default_backend(),
    "devices": len(jax.devices()),
    "ceiling": "chip peak" if args.peak_tflops else f"measured {args.ceiling_n}^3 matmul",
    "experts": cfg.model.experts,
    "top_k": cfg.model.top_k,
  }
  for name, run in runs.items():
    r, s = run["resolved"], step_s[name]
    out[name] = {
      "n_params": r.n_params,
      "n_active": r.n_active,
      "batch_tokens": r.batch_tokens,
      "flops_per_token": r.flops_per_token,
      "step_s": round(s, 4),
      "step_ratio_vs_dense": round(s / dense_s, 3),
      "mfu": round(r.batch_tokens / s * r.flops_per_token / ceiling, 4),
    }
  return out


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(bench(sys.argv[1:])))))
