"""The one-shot GPU check: versions, correctness against the CPU, bf16 speed and MFU per attention
path, the collapse monitor against its CPU twin. One command, within a time budget; it writes
gpu_check.json and gpu_check.txt to --out and exits 1 if a correctness check failed.

  python -m tools.gpu_check --out DIR [--budget-s 540]   # with a GPU: a 9-minute budget
  python -m tools.gpu_check --out DIR --tiny             # the same code on tiny shapes, any CPU

What it runs, most important first, each cell in its own process (tools/gpu_cells.py, or the
training command itself), skipping what the remaining budget cannot hold:
1. env: package versions, the device, cuDNN, the best bf16 and f32 matmul (TFLOP/s);
2. twin: `celerity_tiny` (B pinned to 320 sequences so that any device count takes it, blockwise
   attention on both sides), the whole run in float32 through `celerity_jax.main`, on the GPU at
   jax's `highest` matmul precision and on the same machine's CPU. Checks: the loss of each of the
   first 30 steps within REL_30 of the CPU's, the final and held-out losses within REL_END, the
   collapse monitor's residual within RESIDUAL_ABS at every step and its alerts the same (the
   tolerances are in tools/gpu_report.py);
3. attention: every attention path's output and gradients in bf16 against the float32
   reference (1B heads, 1024 tokens), within ATTENTION_REL of its largest value;
4. bf16: the first 30 steps in bf16, within REL_LOW of the float32 twin;
5. speed: a `celerity_1b`-shaped step in bf16 at full width and depth (26 layers, d_model 1152,
   9 heads of 128, vocab 128256), 16,384 tokens per step in microbatches of 8,192 (the recipe's
   own), at context 2048 and 8192, for the blockwise XLA tiles, cuDNN's fused kernel and the
   Pallas GPU (Triton) kernels. Each: tokens/s, MFU (resolve.flops_per_token's causal accounting,
   as MaxText counts) against the chip's bf16 peak and against the matmul of cell 1, the
   device's peak memory (jax may take 92% of it), compile time;
6. tf32: the first 30 steps in float32 at jax's default GPU precision (TF32 matmuls where the chip
   has them), within REL_LOW of the float32 twin;
7. more speed: `celerity_gpu_50m` as planned and in larger microbatches (and the GPU family's
   hours at its rate); the 1B step at 2048 without remat, and with the materialized scores (2048
   only: at 8192 they would take 4.8 GB per layer).

The tolerances come from this project's CPU runs: two CPU device counts (another order of every
reduction) differ by at most 3e-7 in the first 30 steps, bf16 from float32 by 7e-4
(docs/results.md, "GPU check").
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli
from tools import gpu_report

FIRST = gpu_report.FIRST
TWIN = ["recipe=celerity_tiny", "train.batch_size=320", "model.attention=blockwise"]
TINY_SHAPE = [
  "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_head=16", "model.d_ff=128",
  "model.vocab_size=256", "model.seq_len=32", "train.batch_size=16", "scaling.tpp=1",
  "param.d_base=32",
]  # fmt: skip
TINY_TWIN = [
  "recipe=celerity_tiny", *TINY_SHAPE, "data.corpus=synthetic", "model.attention=blockwise",
  "train.eval_every=20",
]  # fmt: skip
ONE_B = ["recipe=celerity_1b", "model.dtype=bfloat16"]  # (its layout: microbatch rows, remat dots)
TINY_ONE_B = ["recipe=celerity_tiny", *TINY_SHAPE, "model.dtype=bfloat16"]


@dataclasses.dataclass
class Cell:
  name: str
  kind: str  # env | attention | speed (tools/gpu_cells.py) | run (celerity_jax.main)
  args: list[str]
  what: str
  limit_s: float  # killed after this long
  need_s: float  # skipped when less budget than this is left
  env: dict = dataclasses.field(default_factory=dict)


def microbatch(length: int, tiny: bool) -> str:
  """8,192 tokens per microbatch, as celerity_1b's own layout (one row at its context 8192): the
  step then fits an 80 GB H100 (its 128k-vocabulary logits dominate). The CPU test: 2 per step."""
  return "train.microbatches=2" if tiny else f"train.microbatch_rows={8192 // length}"


def speed_cells(
  base: list[str], contexts: dict, paths: list[str], tiny: bool, extra=(), suffix=""
) -> list[Cell]:
  cells = []
  for length, rows in contexts.items():
    for path in paths:
      if path == "reference" and length != min(contexts):
        continue
      cells.append(
        Cell(
          f"1b_{length}_{path}{suffix}",
          "speed",
          [
            *base,
            f"model.seq_len={length}",
            f"train.batch_size={rows}",
            microbatch(length, tiny),
            f"model.attention={path}",
            *extra,
          ],
          f"1B-shaped bf16 step, context {length}, {rows} x {length} tokens in 2 microbatches, "
          f"{path} attention" + (f" ({' '.join(extra)})" if extra else ""),
          60 if tiny else 180,
          10 if tiny else 75,
        )
      )
  return cells


def plan(tiny: bool) -> list[Cell]:
  """The cells in the order they run (the order of importance)."""
  twin, one_b = (TINY_TWIN, TINY_ONE_B) if tiny else (TWIN, ONE_B)
  member = ["recipe=celerity_gpu_50m", *(TINY_SHAPE + ["train.batch_size=32"] if tiny else [])]
  s = 1 if tiny else 3  # time scale of limits
  cells = [
    Cell("env", "env", ["--matmul-n", "256" if tiny else "8192"], "versions, device", 60 * s, 10),
    Cell("twin_gpu", "run", twin, "float32, highest precision, whole run", 60 * s, 10 * s,
         {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}),
    Cell("twin_cpu", "run", twin, "the same on the CPU", 90 * s, 15 * s,
         {"JAX_PLATFORMS": "cpu", **({"JAX_NUM_CPU_DEVICES": "2"} if tiny else {})}),
    Cell("attention", "attention", ["--attention-shape", "2x128x2x16" if tiny else "2x1024x9x128"],
         "each attention path in bf16 against the float32 reference", 40 * s, 8 * s),
    Cell("bf16", "run", [*twin, "model.dtype=bfloat16", f"train.stop_step={FIRST}"],
         "bf16, first 30 steps", 40 * s, 8 * s),
  ]  # fmt: skip
  contexts = {64: 8, 128: 4} if tiny else {2048: 8, 8192: 2}
  cells += speed_cells(one_b, contexts, ["blockwise", "cudnn", "triton"], tiny)
  cells += [
    Cell("tf32", "run", [*twin, f"train.stop_step={FIRST}"],
         "float32 at jax's default GPU precision, first 30 steps", 40 * s, 8 * s),
    Cell("50m", "speed", member, "celerity_gpu_50m as planned (microbatches of 16 rows)",
         60 * s, 10 * s),
    Cell("50m_rows32", "speed", [*member, f"train.microbatch_rows={8 if tiny else 32}"],
         "celerity_gpu_50m in microbatches of 32 rows", 60 * s, 10 * s),
  ]  # fmt: skip
  cells += speed_cells(
    one_b, dict([min(contexts.items())]), ["blockwise"], tiny, ["model.remat=none"], "_noremat"
  )
  cells += speed_cells(one_b, contexts, ["reference"], tiny)
  return cells


def run_cell(cell: Cell, work: Path, limit_s: float, tiny: bool) -> dict:
  """Runs one cell in a child process; its record: status ok | refused (a config error: this
  device cannot run it) | error | timeout, the seconds it took, its result or last output."""
  out = work / f"{cell.name}.json"
  run_dir = work / cell.name
  if cell.kind == "run":
    argv = ["-m", "celerity_jax.main", *cell.args, f"run.dir={run_dir}", "run.progress=false"]
    argv.append(f"data.cache_dir={work / 'cache'}")
  else:
    steps = ["--steps", "2" if tiny else "10"] if cell.kind == "speed" else []
    argv = ["-m", "tools.gpu_cells", cell.kind, str(out), *steps, *cell.args]
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **cell.env}
  if not tiny:  # jax takes 75% of a GPU's memory by default; the 1B cells without remat need more
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # the cells' batches are sized for one GPU
  if tiny:  # the CPU test's cells see one device (the twin's CPU side two), whatever the caller has
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    env["JAX_NUM_CPU_DEVICES"] = cell.env.get("JAX_NUM_CPU_DEVICES", "1")
  start = time.monotonic()
  try:
    proc = subprocess.run(
      [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=limit_s
    )
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "seconds": round(time.monotonic() - start, 1), "limit_s": limit_s}
  record = {"status": "ok", "seconds": round(time.monotonic() - start, 1)}
  if proc.returncode:
    lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
    record["status"] = "refused" if proc.returncode == 2 else "error"
    record["exit"] = proc.returncode
    record["message"] = lines[-1][:500] if proc.returncode == 2 else "\n".join(lines[-15:])
    return record
  if cell.kind == "run":
    record["result"] = gpu_report.run_rows(run_dir)
  else:
    record["result"] = json.loads(out.read_text())
  return record


def check(args) -> int:
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
  work.mkdir(parents=True, exist_ok=True)
  report = {"mode": "tiny" if args.tiny else "gpu", "budget_s": args.budget_s, "cells": {}}
  report["plan"] = {c.name: {"what": c.what, "args": c.args, "env": c.env} for c in plan(args.tiny)}
  deadline = time.monotonic() + args.budget_s
  for cell in plan(args.tiny):
    left = deadline - time.monotonic()
    if left < cell.need_s:
      report["cells"][cell.name] = {"status": "skipped", "message": f"{left:.0f} s of budget left"}
    else:
      print(f"gpu_check: {cell.name}: {cell.what}", file=sys.stderr, flush=True)
      report["cells"][cell.name] = run_cell(cell, work, min(cell.limit_s, left), args.tiny)
      print(f"  {report['cells'][cell.name]['status']}", file=sys.stderr, flush=True)
    gpu_report.finish(report, args.peak_tflops)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
  text = gpu_report.text(report)
  (out / "gpu_check.txt").write_text(text)
  print(text)
  failed = [c for c in report["checks"] if not c["passed"]]
  return 1 if failed or report["missing"] else 0


def main(argv: list[str]) -> int:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.txt")
  parser.add_argument("--work", default="", help="folder for the cells' runs (default: a temp)")
  parser.add_argument("--budget-s", type=float, default=540.0)
  parser.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU test of this tool")
  parser.add_argument(
    "--peak-tflops", type=float, default=0.0, help="the chip's bf16 peak if not in the table"
  )
  return check(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
