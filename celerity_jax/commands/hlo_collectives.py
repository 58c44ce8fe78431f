"""The collectives in a compiled (optimized) HLO module, with their bytes per step.

XLA's cost analysis counts a while loop's body once, but the layers of a scanned model run in a
loop: each collective is weighted by how many times its computation runs per step, the product of
the trip counts of the loops around it. A trip count is read from the loop's condition, which for
a scan compares the counter with one integer constant (`counter < N`); a loop whose condition does
not have that form counts once. Bytes are the size of the collective's result on one device;
`traffic` is what a ring algorithm moves through one device's links for it, the figure the
step-time bound divides by ICI bandwidth.
"""

from __future__ import annotations

import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s4": 0.5,
  "u4": 0.5,
}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLS = re.compile(
  r"\b(body|condition|to_apply|calls|branch_computations|"
  r"true_computation|false_computation)=(?:\{([^}]*)\}|%?([\w.\-]+))"
)
_INT_CONSTANT = re.compile(r"\bs32\[\][^=]*\bconstant\((\d+)\)")


def _bytes(shape_text: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * DTYPE_BYTES[dtype]
  return total


def _group_size(rest: str, n_devices: int) -> int:
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if mesh:  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: the named axes
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
    size = 1
    for axis in re.findall(r"'([^']+)'", mesh.group(2)):
      size *= sizes.get(axis, 1)
    return size
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if groups and groups.group(1):
    return len(groups.group(1).split(","))
  return n_devices  # empty groups: every device


def _computations(hlo_text: str) -> tuple[dict, str | None]:
  """{name: [instruction lines]} and the entry computation's name."""
  bodies, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      bodies[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.strip() not in ("", "}"):
      bodies[current].append(line)
  return bodies, entry


def _trip_count(condition_lines: list[str]) -> int:
  constants = [int(c) for line in condition_lines for c in _INT_CONSTANT.findall(line)]
  compares = [line for line in condition_lines if " compare(" in line]
  if len(constants) == 1 and len(compares) == 1 and "direction=LT" in compares[0]:
    return constants[0]
  return 1


def collectives(hlo_text: str, n_devices: int) -> dict:
  """{kind: {"count", "bytes", "traffic"}} per step, loops unrolled by their trip counts."""
  bodies, entry = _computations(hlo_text)
  found = defaultdict(list)  # computation -> [(kind, bytes, group)]
  calls = defaultdict(list)  # computation -> [(callee, times)]
  for name, lines in bodies.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, op, rest = match.groups()
      base = op[: -len("-start")] if op.endswith("-start") else op
      if base in KINDS:
        # an async `-start` returns a tuple (operand, result, ...): its largest array is the result
        size = (
          max((_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(shape)), default=0.0)
          if op != base
          else _bytes(shape)
        )
        found[name].append((base, size, _group_size(rest, n_devices)))
      called = {
        role: [c.strip().lstrip("%") for c in (listed or single).split(",")]
        for role, listed, single in _CALLS.findall(rest)
      }
      trips = (
        _trip_count(bodies.get(called["condition"][0], []))
        if op == "while" and "condition" in called
        else 1
      )
      for role, callees in called.items():
        for callee in callees:
          calls[name].append((callee, trips if role == "body" else 1))
  times = defaultdict(float)

  def visit(name: str, weight: float, depth: int = 0):
    if depth > 64:
      return
    times[name] += weight
    for callee, n in calls.get(name, ()):
      visit(callee, weight * n, depth + 1)

  if entry:
    visit(entry, 1.0)
  out = {kind: {"count": 0.0, "bytes": 0.0, "traffic": 0.0} for kind in KINDS}
  for name, ops in found.items():
    weight = times.get(name, 0.0)
    for kind, size, group in ops:
      row = out[kind]
      row["count"] += weight
      row["bytes"] += weight * size
      row["traffic"] += weight * _ring_traffic(kind, size, group)
  return {kind: row for kind, row in out.items() if row["count"]}


def _ring_traffic(kind: str, result_bytes: float, group: int) -> float:
  """Bytes through one device's links for one collective on a ring of `group` devices."""
  if group <= 1:
    return 0.0
  share = (group - 1) / group
  if kind == "all-gather":
    return result_bytes * share
  if kind == "reduce-scatter":
    return result_bytes * (group - 1)  # the input is `group` results
  if kind == "all-reduce":
    return 2 * result_bytes * share
  if kind == "all-to-all":
    return result_bytes * share
  return result_bytes  # collective-permute: one send
