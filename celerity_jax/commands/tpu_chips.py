"""TPU chips the AOT tools know: HBM, peak bf16 FLOP/s, HBM and ICI bandwidth per chip.

Sources (Google Cloud's per-version pages under https://cloud.google.com/tpu/docs/, read 2026-11):
the comparison table on the `tpu7x` page for v5p, v6e and tpu7x; the `v5e` page for v5e. v4 is left
out: its compile-only topologies have one device per TensorCore, two per chip, where a v4 VM shows
one per chip, so a mesh built over them would not be the one that runs. The v5p page itself states
4800 Gbps (600 GB/s) of ICI, half the newer table's 1200 GB/s;
the newer figure is used. ICI is the chip's total bidirectional inter-chip bandwidth, so the
step-time bound treats collectives at their best case. The HBM a program may use is what XLA
reports when it compiles (slightly below nominal); `hbm_bytes` is the nominal capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Chip:
  name: str  # the topology prefix jax accepts, e.g. "v5p" in "v5p:4x4x4"
  hbm_bytes: float
  peak_flops: float  # bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, bidirectional, all links of one chip
  source: str


CHIPS = {
  "v5e": Chip("v5e", 16 * GIB, 197e12, 819 * GB, 400 * GB, "v5e page"),
  "v5p": Chip("v5p", 95 * GIB, 459e12, 2765 * GB, 1200 * GB, "tpu7x page, comparison table"),
  "v6e": Chip("v6e", 32 * GIB, 918e12, 1638 * GB, 800 * GB, "tpu7x page, comparison table"),
  "tpu7x": Chip("tpu7x", 192 * GIB, 2307e12, 7380 * GB, 1200 * GB, "tpu7x page, comparison table"),
}


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5p:4x4x4' -> (the v5p chip, (4, 4, 4)); errors name what is accepted."""
  kind, _, shape = name.partition(":")
  if kind not in CHIPS or not shape:
    raise ValueError(
      f"--topology {name!r}: expected CHIP:AxB[xC] with CHIP one of "
      f"{', '.join(CHIPS)} (for example v5e:2x2, v5p:4x4x4, v6e:4x4); names like "
      f"v5litepod-4 are accelerator types, not topologies"
    )
  try:
    dims = tuple(int(d) for d in shape.split("x"))
  except ValueError:
    dims = ()
  if len(dims) not in (2, 3) or min(dims) < 1:
    raise ValueError(f"--topology {name!r}: the shape must be AxB or AxBxC positive integers")
  return CHIPS[kind], dims


# accelerator types count TensorCores on these generations (two per chip), chips on the others
_CORES_PER_CHIP = {"v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}
_CHIP_OF_TYPE = {"v5litepod": "v5e"}


def topology_for(accelerator_type: str) -> str:
  """The topology of a Cloud TPU accelerator type's default slice shape: 'v5p-64' -> 'v5p:2x4x4',
  'v5litepod-16' -> 'v5e:4x4', 'v6e-32' -> 'v6e:4x8'. Shapes grow as Google's tables do: from
  2x2x1 (3D) or 1x1 (2D), doubling the last of the smallest dimensions."""
  kind, _, count = accelerator_type.rpartition("-")
  if kind not in _CORES_PER_CHIP or not count.isdigit():
    raise ValueError(
      f"accelerator type {accelerator_type!r}: expected one of "
      f"{', '.join(t + '-N' for t in _CORES_PER_CHIP)} (e.g. v5p-64, v6e-16); "
      "name the topology itself for others"
    )
  chips, per_chip = int(count) // _CORES_PER_CHIP[kind], _CORES_PER_CHIP[kind]
  three_d = kind == "v5p"
  if chips < (4 if three_d else 1) or chips & (chips - 1) or int(count) % per_chip:
    raise ValueError(
      f"accelerator type {accelerator_type!r}: {chips} chips is not a slice size "
      f"this table knows (a power of two{', at least 4' if three_d else ''})"
    )
  dims = [1, 2, 2] if three_d else [1, 1]  # kept sorted while growing
  while math.prod(dims) < chips:
    last_smallest = max(i for i, d in enumerate(dims) if d == min(dims))
    dims[last_smallest] *= 2
    dims.sort()
  if three_d and chips == 4:
    dims = [2, 2, 1]  # Google writes the 4-chip slice 2x2x1
  return f"{_CHIP_OF_TYPE.get(kind, kind)}:{'x'.join(map(str, dims))}"


def chip_count(name: str) -> int:
  """Chips in a topology or accelerator type, without libtpu: 'v5p-64' -> 32."""
  return math.prod(parse_topology(resolve_topology(name))[1])


def resolve_topology(name: str) -> str:
  """A topology as given ('v5p:2x4x4') or the one of an accelerator type ('v5p-64')."""
  return name if ":" in name else topology_for(name)
