"""tools/gpu_check.py's verdicts and report: the checks against their tolerances, the speed table
with MFU, and the text a person reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

# dense bf16 peak of each chip, TFLOP/s (the vendors' datasheets, without sparsity), by a
# substring of jax's device_kind; the first match wins
PEAK_BF16_TFLOPS = (
  ("H100 PCIe", 756.0),
  ("H100", 989.4),
  ("H200", 989.4),
  ("H800", 989.4),
  ("A100", 312.0),
  ("B200", 2250.0),
  ("L40S", 362.1),
  ("L4", 121.0),
)
CORRECTNESS = ("twin_gpu", "twin_cpu", "attention", "bf16", "tf32")
FIRST = 30  # the steps compared one by one
REL_30 = 1e-4  # float32 GPU vs CPU, each of the first 30 steps (relative)
REL_END = 1e-3  # float32 GPU vs CPU, final training and held-out loss (relative)
RESIDUAL_ABS = 2e-3  # the monitor's residual, GPU vs CPU (its alert threshold is 0.04)
REL_LOW = 2e-2  # bf16 or TF32 vs float32, each of the first 30 steps (relative)
ATTENTION_REL = 3e-2  # a path in bf16 vs the float32 reference: max |error| / max |reference|


def run_rows(run_dir: Path) -> dict:
  """What a training run's files say that the checks need: per step the loss, the monitor's
  residual and alert; the held-out losses; the platform and devices."""
  rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "loss" in r]
  derived = json.loads((run_dir / "config.json").read_text())["derived"]
  return {
    "platform": derived["platform"],
    "steps": derived["steps"],
    "batch_seqs": derived["batch_seqs"],
    "loss": {r["step"]: r["loss"] for r in steps},
    "residual": {r["step"]: r["collapse_residual"] for r in steps if "collapse_residual" in r},
    "alerts": [r["step"] for r in steps if r.get("collapse_alert")],
    "eval_loss": {r["step"]: r["eval_loss"] for r in steps if "eval_loss" in r},
  }


def peak_tflops(device_kind: str, given: float) -> float | None:
  if given:
    return given
  return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def _json_keys(d: dict) -> dict:
  return {int(k): v for k, v in d.items()}  # a JSON round trip makes step keys strings


def _max_rel(a: dict, b: dict, steps) -> float:
  a, b = _json_keys(a), _json_keys(b)
  return max(abs(a[s] / b[s] - 1.0) for s in steps)


def alerts(run: dict) -> str:
  steps = run["alerts"]
  return f"{len(steps)} from {steps[0]}" if steps else "none"


def correctness(cells: dict, on_gpu: bool) -> list[dict]:
  """The checks whose cells ran; each {name, measured, tolerance, passed}."""
  ok = {n: c["result"] for n, c in cells.items() if c.get("status") == "ok" and n in CORRECTNESS}
  checks = []

  def add(name, measured, tolerance, passed=None):
    passed = measured <= tolerance if passed is None else passed
    checks.append({"name": name, "measured": measured, "tolerance": tolerance, "passed": passed})

  first = range(1, FIRST + 1)
  if "twin_gpu" in ok and "twin_cpu" in ok:
    gpu, cpu = ok["twin_gpu"], ok["twin_cpu"]
    add(
      f"float32 GPU vs CPU, loss of steps 1-{FIRST}, max relative",
      _max_rel(gpu["loss"], cpu["loss"], first),
      REL_30,
    )
    last = max(_json_keys(cpu["loss"]))
    add(
      "float32 GPU vs CPU, final loss, relative",
      _max_rel(gpu["loss"], cpu["loss"], [last]),
      REL_END,
    )
    evals = _json_keys(cpu["eval_loss"])
    if evals:
      add(
        "float32 GPU vs CPU, last held-out loss, relative",
        _max_rel(gpu["eval_loss"], cpu["eval_loss"], [max(evals)]),
        REL_END,
      )
    res_g, res_c = _json_keys(gpu["residual"]), _json_keys(cpu["residual"])
    both = [s for s in res_c if res_c[s] is not None and res_g.get(s) is not None]
    if both:
      add(
        "monitor residual GPU vs CPU, max absolute",
        max(abs(res_g[s] - res_c[s]) for s in both),
        RESIDUAL_ABS,
      )
    same = gpu["alerts"] == cpu["alerts"]
    add("monitor alerts GPU vs CPU (the steps that alert)", alerts(gpu), alerts(cpu), same)
  for path, errors in ok.get("attention", {}).items():
    if path == "shape" or ("error" in errors and not on_gpu):
      continue  # off a GPU, cuDNN cannot run: not a finding
    worst = max(errors.values()) if "error" not in errors else errors["error"]
    passed = "error" not in errors and worst <= ATTENTION_REL
    add(f"attention {path}, bf16 vs float32 reference, out and grads", worst, ATTENTION_REL, passed)
  for name, what in (("bf16", "bf16"), ("tf32", "TF32 (default precision)")):
    if name in ok and "twin_gpu" in ok:
      add(
        f"{what} vs float32, steps 1-{FIRST}, max relative",
        _max_rel(ok[name]["loss"], ok["twin_gpu"]["loss"], first),
        REL_LOW,
      )
  timed = [c["result"] for c in cells.values() if "tokens_per_s" in c.get("result", {})]
  if timed:
    bad = sum(not math.isfinite(r["loss"]) for r in timed)
    add(f"speed cells whose loss is not finite, of {len(timed)}", bad, 0)
  return checks  # fmt: skip


def speed_rows(cells: dict, peak: float | None, measured: float | None) -> list[dict]:
  rows = []
  for name, cell in cells.items():
    r = cell.get("result", {})
    if cell.get("status") != "ok" or "tokens_per_s" not in r:
      continue
    rows.append(
      {
        "cell": name,
        "seq_len": r["seq_len"],
        "attention": r["attention"],
        "batch_tokens": r["batch_tokens"],
        "microbatches": r["microbatches"],
        "tokens_per_s": r["tokens_per_s"],
        "tflops": r["tflops"],
        "mfu_peak": r["tflops"] / peak if peak else None,
        "mfu_measured_matmul": r["tflops"] / measured if measured else None,
        "peak_memory_gib": r["peak_memory_bytes"] / 2**30,
        "compile_s": r["compile_s"],
      }
    )
  return rows


def family_hours(rows: list[dict]) -> dict | None:
  """The GPU collapse family's training FLOPs at the best measured rate of celerity_gpu_50m."""
  rates = [r["tflops"] for r in rows if r["cell"].startswith("50m")]
  if not rates:
    return None
  from tools.collapse_plan import FAMILIES, budget

  _, totals = budget(FAMILIES["gpu"], [])
  return {
    "runs": totals["runs"],
    "flops": totals["flops"],
    "tflops": max(rates),
    "hours": totals["flops"] / (max(rates) * 1e12) / 3600,
  }


def finish(report: dict, given_peak: float) -> None:
  """Adds checks, speed rows and what is missing to `report` (after every cell, so that a run cut
  short still leaves them)."""
  cells = report["cells"]
  env = cells.get("env", {}).get("result", {})
  peak = peak_tflops(env.get("device_kind", ""), given_peak)
  report["peak_bf16_tflops"] = peak
  report["checks"] = correctness(cells, report["mode"] == "gpu")
  report["speed"] = speed_rows(cells, peak, env.get("matmul_bf16_tflops"))
  report["missing"] = [n for n in CORRECTNESS if cells.get(n, {}).get("status") != "ok"]
  report["family"] = family_hours(report["speed"]) if report["mode"] == "gpu" else None


def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:.2e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e5) else f"{x:.3g}"
  return str(x)


def text(report: dict) -> str:
  cells = report["cells"]
  env = cells.get("env", {}).get("result", {})
  pk = env.get("packages", {})
  plugin = next((f"{k} {v}" for k, v in pk.items() if "plugin" in k), "no CUDA plugin")
  lines = [
    f"GPU check ({report['mode']} mode) on {env.get('device_kind', '?')} x{env.get('devices', '?')}"
    f" ({env.get('backend', '?')}): jax {pk.get('jax', '?')}, jaxlib {pk.get('jaxlib', '?')},"
    f" {plugin}, cuDNN {env.get('cudnn')}, flax {pk.get('flax', '?')}, python {env.get('python')}",
    f"matmul {env.get('matmul_n')}^3: bf16 {env.get('matmul_bf16_tflops')} TFLOP/s, float32 "
    f"{env.get('matmul_f32_tflops')} TFLOP/s; chip bf16 peak {report.get('peak_bf16_tflops')}",
    "",
    "correctness" + " " * 57 + "measured   tolerance  verdict",
  ]
  for c in report["checks"]:
    verdict = "pass" if c["passed"] else "FAIL"
    lines.append(f"{c['name']:64}  {_fmt(c['measured']):>9}  {_fmt(c['tolerance']):>9}  {verdict}")
  if report["missing"]:
    lines.append(f"not run or failed: {', '.join(report['missing'])} (see the cells below)")
  lines += [
    "",
    "speed, bf16                ctx  attention  tokens/step  tokens/s   TFLOP/s  MFU(peak)  "
    "MFU(matmul)  peak GiB  compile s",
  ]
  for r in report["speed"]:
    mfu_p = f"{r['mfu_peak']:.1%}" if r["mfu_peak"] is not None else "-"
    mfu_m = f"{r['mfu_measured_matmul']:.1%}" if r["mfu_measured_matmul"] is not None else "-"
    lines.append(
      f"{r['cell']:24} {r['seq_len']:6}  {r['attention']:9}  {r['batch_tokens']:11}  "
      f"{r['tokens_per_s']:8.0f}  {r['tflops']:8.3g}  {mfu_p:>9}  {mfu_m:>11}  "
      f"{r['peak_memory_gib']:8.2f}  {r['compile_s']:9.1f}"
    )
  if report.get("family"):
    f = report["family"]
    lines.append(
      f"the GPU collapse family ({f['runs']} runs, {f['flops']:.3g} FLOPs) at "
      f"celerity_gpu_50m's {f['tflops']:.3g} TFLOP/s: {f['hours']:.2f} h on this GPU"
    )
  lines += ["", "cells"]
  for name, c in cells.items():
    detail = c.get("message", "").splitlines()[-1:] if c["status"] != "ok" else []
    lines.append(
      f"  {name:24} {c['status']:8} {c.get('seconds', '-'):>6} s  {' '.join(detail)[:200]}"
    )
  return "\n".join(lines) + "\n"  # fmt: skip
