"""Our train step against the same model in PyTorch (eager and torch.compile), in one process.

  python -m tools.bench_vs_torch recipe=celerity_tiny [section.key=value ...]
      [--steps 3] [--rounds 3] [--ceiling-n 2048]

Each framework trains the config's shape (float32, the config's batch) on a fixed batch; rounds of
`--steps` steps of each are interleaved (the first round compiles and is dropped), so machine noise
hits all alike, and the median round gives tokens/s. Both frameworks' float32 matmul ceilings are
measured in the same run, and the step's FLOP/s are reported as a fraction of XLA's. PyTorch runs
with as many threads as the machine has cores; ours, like every command on a CPU, with one device
per core, data-parallel (celerity_jax/platform.py). The PyTorch model is
tools/torch_reference.py (with ALiBi as an additive mask when the config uses ALiBi, and also plain
`is_causal=True` attention, the fastest PyTorch path; the best of them is the comparison).
Needs the `test` extra (torch).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError


def bench(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--ceiling-n", type=int, default=2048)
  parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  args, rest = parser.parse_known_args(argv)
  # PyTorch's OpenMP threads spin after each op by default, taking the cores from XLA's next step
  # in an interleaved run; passive waiting is fair to both (it must be set before torch loads)
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import torch
  except ImportError:
    raise ConfigError("bench_vs_torch needs torch: pip install -e '.[test]'") from None

  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training
  from tools import torch_reference as ref
  from tools.bench_step import matmul_ceiling

  cfg, _ = parse(rest)
  m = cfg.model
  if m.experts or m.dtype != "float32":
    raise ConfigError("bench_vs_torch compares dense float32 models (model.experts=0)")
  torch.set_num_threads(os.cpu_count() or 1)
  resolved = resolve(cfg, jax.device_count())
  training = prepare_training(cfg, resolved)
  [batch] = placed_batches(cfg, resolved, training.mesh)
  host = jax.device_get(batch)
  inputs = torch.from_numpy(np.asarray(host["inputs"]).astype(np.int64))
  targets = torch.from_numpy(np.asarray(host["targets"]).astype(np.int64))

  state = {"state": training.setup.init()}

  def ours():
    state["state"], metrics = training.train_step(state["state"], batch)
    return metrics["loss"]

  runs = {"celerity_jax": (ours, lambda out: jax.block_until_ready(out))}
  variants = [("alibi", True), ("causal", False)] if m.position == "alibi" else [("causal", False)]
  for compiled in (False,) if args.no_compile else (False, True):
    for name, alibi in variants:
      model, opt, loss_fn = ref.make_step(m, alibi, compiled)
      step = lambda model=model, opt=opt, fn=loss_fn: ref.train_step(  # noqa: E731
        model, opt, fn, inputs, targets
      )
      runs[f"torch_{'compile' if compiled else 'eager'}_{name}"] = (step, lambda out: out.item())

  times = {name: [] for name in runs}
  for round_ in range(args.rounds + 1):
    for name, (step, wait) in runs.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        out = step()
      wait(out)
      if round_:
        times[name].append((time.perf_counter() - t0) / args.steps)
  tokens = resolved.batch_tokens
  rates = {name: tokens / float(np.median(t)) for name, t in times.items()}
  best_torch = max((n for n in rates if n.startswith("torch")), key=rates.get)
  xla_ceiling = matmul_ceiling(args.ceiling_n, np.float32)
  achieved = rates["celerity_jax"] * resolved.flops_per_token
  return {
    "n_params": resolved.n_params,
    "batch_tokens": tokens,
    "threads": torch.get_num_threads(),
    "jax_devices": jax.device_count(),
    "tokens_per_s": {n: round(r, 1) for n, r in rates.items()},
    "best_torch": best_torch,
    "ours_over_best_torch": round(rates["celerity_jax"] / rates[best_torch], 3),
    "achieved_gflops": round(achieved / 1e9, 2),
    "xla_matmul_gflops": round(xla_ceiling / 1e9, 2),
    "torch_matmul_gflops": round(ref.matmul_ceiling(args.ceiling_n) / 1e9, 2),
    "fraction_of_xla_ceiling": round(achieved / xla_ceiling, 3),
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(bench(sys.argv[1:])))))
