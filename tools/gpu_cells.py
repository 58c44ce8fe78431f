"""The measurements of tools/gpu_check.py, each run in its own process so that an out-of-memory
error, a crash or a hung compile costs one cell, and each cell's peak memory is its own.

  python -m tools.gpu_cells env OUT.json [--matmul-n 8192]
  python -m tools.gpu_cells speed OUT.json recipe=NAME [key=value ...] [--steps 10]
  python -m tools.gpu_cells attention OUT.json [--attention-shape 2x1024x9x128]

Writes one JSON object to OUT.json. A config error (a path this device cannot run) exits 2 with
its one line, as every command does; gpu_check records it as `refused`.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from celerity_jax.cli import ArgumentParser, run_cli
from tools.bench_step import matmul_ceiling, timed_steps

PACKAGES = (
  "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
  "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "numpy", "nvidia-cudnn-cu13",
  "nvidia-cudnn-cu12", "nvidia-cublas", "nvidia-nccl-cu13",
)  # fmt: skip


def versions() -> dict:
  found = {}
  for name in PACKAGES:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return found


def cudnn_version() -> int | None:
  try:  # jax's own probe of the cuDNN it loaded (private; absent without the CUDA plugin)
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

    return int(check_cudnn_version())
  except Exception:
    return None


def env(args) -> dict:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {
    "python": platform.python_version(),
    "packages": versions(),
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "devices": jax.device_count(),
    "memory_bytes": stats.get("bytes_limit"),
    "cudnn": cudnn_version(),
    "matmul_n": args.matmul_n,
    "matmul_bf16_tflops": round(matmul_ceiling(args.matmul_n, jnp.bfloat16) / 1e12, 2),
    "matmul_f32_tflops": round(matmul_ceiling(args.matmul_n, jnp.float32) / 1e12, 2),
    "environment": jax.print_environment_info(return_string=True),
  }


def peak_memory_bytes() -> tuple[int, str]:
  """The device allocator's peak where it keeps one (GPU, TPU), else the process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def speed(args, overrides: list[str]) -> dict:
  """The train step of `overrides` on synthetic batches: compile, 2 warm-up steps, then
  args.steps timed steps."""
  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  cfg, _ = parse(overrides)
  resolved = resolve(cfg, jax.device_count())
  training = prepare_training(cfg, resolved)
  batches = placed_batches(cfg, resolved, training.mesh, steps=2)
  state = training.setup.init()
  compile_s, step_s, metrics = timed_steps(training.train_step, state, batches, 2, args.steps)
  peak, peak_of = peak_memory_bytes()
  m = cfg.model
  return {
    "n_params": resolved.n_params,
    "d_model": m.d_model,
    "n_layers": m.n_layers,
    "seq_len": m.seq_len,
    "dtype": m.dtype,
    "attention": resolved.attention,
    "batch_seqs": resolved.batch_seqs,
    "batch_tokens": resolved.batch_tokens,
    "microbatches": resolved.microbatches,
    "compile_s": round(compile_s, 2),
    "step_s": step_s,
    "tokens_per_s": resolved.batch_tokens / step_s,
    "flops_per_token": resolved.flops_per_token,
    "tflops": resolved.batch_tokens / step_s * resolved.flops_per_token / 1e12,
    "peak_memory_bytes": peak,
    "peak_memory_of": peak_of,
    "loss": float(np.asarray(metrics["loss"])),
  }


def attention_paths(args) -> dict:
  """Each attention path's output and gradients in bf16 against the float32 materialized
  reference, on one (batch, length, heads of head dim) shape with ALiBi: max |error| / max
  |reference|, or the error the path raised (cuDNN off a GPU)."""
  from celerity_jax.models import attention, triton_attention

  b, length, n, h = (int(x) for x in args.attention_shape.split("x"))
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cot = (jax.random.normal(key, (b, length, n, h), jnp.float32) for key in keys)
  scale = h**-0.5
  paths = {
    "reference": lambda q, k, v: attention.reference(q, k, v, None, scale, True),
    "blockwise": lambda q, k, v: attention.blockwise(q, k, v, None, scale, True, 512),
    "cudnn": lambda q, k, v: attention.cudnn(q, k, v, None, scale, True),
    "triton": lambda q, k, v: triton_attention.causal(q, k, v, None, scale, True),
  }

  def value_and_grads(f, dtype):
    loss = lambda *a: (f(*a).astype(jnp.float32) * cot).sum()  # noqa: E731
    args_ = [x.astype(dtype) for x in (q, k, v)]
    out = jax.jit(f)(*args_).astype(jnp.float32)
    return [out, *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args_)]

  want = value_and_grads(paths["reference"], jnp.float32)
  found = {"shape": [b, length, n, h]}
  for name, f in paths.items():
    try:
      got = value_and_grads(f, jnp.bfloat16)
    except Exception as e:  # a path this device cannot run: recorded, not fatal
      found[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      continue
    errors = [
      float(jnp.abs(g - w).max() / jnp.abs(w).max()) for g, w in zip(got, want, strict=True)
    ]
    found[name] = {"out": errors[0], "dq": errors[1], "dk": errors[2], "dv": errors[3]}
  return found


def main(argv: list[str]) -> int:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("cell", choices=("env", "speed", "attention"))
  parser.add_argument("out")
  parser.add_argument("--matmul-n", type=int, default=8192)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--attention-shape", default="2x1024x9x128", help="BxLxNxH")
  args, rest = parser.parse_known_args(argv)
  cells = {"env": env, "attention": attention_paths}
  result = cells[args.cell](args) if args.cell in cells else speed(args, rest)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
