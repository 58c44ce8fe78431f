"""Where the train step's time goes: a jax.profiler trace of a few steps, each XLA op's time charged
to the part of the model that emitted it.

  python -m tools.profile_step recipe=celerity_tiny [section.key=value ...] [--steps 3]

Each executed op (fusion, matmul, copy) is looked up in the compiled step's HLO; the innermost
Python function in its source metadata names the part (forward and backward ops share their
source, so both count); collectives between devices are a part of their own. With several devices
(a command on a CPU runs one per core) each has its own timeline and the shares are of their sum;
"host" is the time of a step's timelines not spent in any op: dispatch, runtime and waiting.
Prints a JSON object: seconds per step and share per part, and the top ops.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

from celerity_jax.cli import ArgumentParser, run_cli

PARTS = {  # innermost function -> part of the step
  "Mlp.__call__": "MLP matmuls and activation",
  "mlp_activation": "MLP matmuls and activation",
  "Attention.project": "QKV and output projections",
  "Attention.output": "QKV and output projections",
  "rope": "QKV and output projections",
  "Norm.__call__": "norms",
  "Decoder.logits": "unembedding, softmax and loss",
  "cross_entropy": "unembedding, softmax and loss",
  "Decoder.embed_tokens": "embedding",
}
ATTENTION_FILE = "models/attention.py"
OPTIMIZER_FILES = ("optax/", "celerity_jax/optim.py")


COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"}


def op_parts(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> part, from each instruction's stack frame (innermost function)."""

  def table(title):
    block = hlo_text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^(\d+) (.*)$", block, re.M))

  files = {k: v.strip('"') for k, v in table("FileNames").items()}
  functions = {k: v.strip('"') for k, v in table("FunctionNames").items()}
  locations = table("FileLocations")
  frames = table("StackFrames")

  def part(frame_id: str) -> str:
    location = re.search(r"file_location_id=(\d+)", frames.get(frame_id, ""))
    if location is None:
      return "other"
    fields = dict(re.findall(r"(\w+)=(\d+)", locations.get(location.group(1), "")))
    file, function = (
      files.get(fields.get("file_name_id"), ""),
      functions.get(fields.get("function_name_id"), ""),
    )
    if ATTENTION_FILE in file:
      return "attention (scores, softmax, weighted sum)"
    if any(f in file for f in OPTIMIZER_FILES):
      return "optimizer and norms of the update"
    if "collapse/" in file:
      return "collapse monitor"
    return PARTS.get(function, "other (residuals, casts, copies)")

  out = {}
  for name, frame in re.findall(r"%([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo_text):
    out.setdefault(name, part(frame))
  return out


def profile(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  args, rest = parser.parse_known_args(argv)

  from celerity_jax.cli import parse
  from celerity_jax.data.synthetic import placed_batches
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  cfg, _ = parse(rest)
  resolved = resolve(cfg, jax.device_count())
  training = prepare_training(cfg, resolved)
  state = training.setup.init()
  [batch] = placed_batches(cfg, resolved, training.mesh)
  parts = op_parts(training.train_step.lower(state, batch).compile().as_text())
  for _ in range(2):  # compile and warm up
    state, metrics = training.train_step(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = training.train_step(state, batch)
      jax.block_until_ready(metrics)
      wall = (time.perf_counter() - t0) / args.steps
    [trace] = Path(trace_dir).rglob("*.trace.json.gz")
    events = json.load(gzip.open(trace))["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in parts:
      per_op[e["name"]] += e["dur"] / 1e6 / args.steps
  per_part = collections.Counter()
  for name, seconds in per_op.items():
    collective = name.split(".")[0] in COLLECTIVES
    per_part["collectives between devices" if collective else parts[name]] += seconds
  # each device has its own timeline (a CPU command runs one per core): shares are of their sum
  busy = wall * jax.device_count()
  per_part["host (dispatch, runtime, waits)"] = max(0.0, busy - sum(per_op.values()))
  return {
    "n_params": resolved.n_params,
    "batch_tokens": resolved.batch_tokens,
    "step_s": round(wall, 4),
    "tokens_per_s": round(resolved.batch_tokens / wall, 1),
    "note": "profiled steps run slower than bench_step's; shares are what to read",
    "parts": {
      part: {"s": round(s, 4), "share": round(s / busy, 3)} for part, s in per_part.most_common()
    },
    "top_ops": {f"{n} [{parts[n]}]": round(s, 4) for n, s in per_op.most_common(8)},
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(profile(sys.argv[1:]), indent=2))))
