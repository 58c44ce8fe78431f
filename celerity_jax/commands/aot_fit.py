"""`celerity_jax.commands.aot --fit`: the fastest predicted layout of a recipe's step that fits
a TPU slice.

A layout is the mesh over one slice's chips (data x fsdp x tensor x expert), the remat policy and
the sequences each device takes per microbatch (`train.microbatch_rows`; the microbatch count
follows from B). The batch B is part of the training trajectory (tau = B / (eta lambda D) fixes
lambda from it), and every layout rounds the law's B to its own granule, data-parallel size x
rows. So layouts are first filtered by B: those within `max_batch_change` of the
law are kept (or, when none is, those as close as the slice allows), and the report states B's
deviation and the lambda that follows.

The rest are ranked by a predicted step time: compute (the model's FLOPs plus what remat computes
again) and an estimate of the collective traffic (FSDP gathers and reduce-scatters per
microbatch, data-parallel gradient all-reduces, tensor-parallel activation all-reduces), and
compiled in that order. A layout that does not fit also rules out, without a compile, every
layout that needs at least as much memory: the same model-parallel axes with no more FSDP shards,
no more remat and no fewer rows. The search stops after `keep` layouts fit or
`max_compiles` compiles; fitting layouts are ranked by their compiled roofline bound. Layout keys
given on the command line (`mesh.tensor=1`, `model.remat=full`, ...) stay fixed; the search varies
the others.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from celerity_jax.commands import aot_compile

REMATS = ("none", "dots", "full")  # more memory saved, more computed again
LAYOUT_KEYS = {
  "mesh.data": "data",
  "mesh.fsdp": "fsdp",
  "mesh.tensor": "tensor",
  "mesh.expert": "expert",
  "model.remat": "remat",
  "train.microbatch_rows": "rows",
}
MAX_ROWS = 256


@dataclass(frozen=True)
class Layout:
  data: int
  fsdp: int
  tensor: int
  expert: int
  remat: str
  rows: int  # sequences per device per microbatch

  def overrides(self) -> list[str]:
    return [
      f"mesh.data={self.data}",
      f"mesh.fsdp={self.fsdp}",
      f"mesh.tensor={self.tensor}",
      f"mesh.expert={self.expert}",
      f"model.remat={self.remat}",
      f"train.microbatch_rows={self.rows}",
    ]

  def __str__(self) -> str:
    return " ".join(self.overrides())


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def meshes(model, per_slice: int) -> list[tuple[int, int, int, int]]:
  """(data, fsdp, tensor, expert) over one slice whose model dimensions divide: tensor splits
  heads, kv heads, the MLP and the vocabulary; expert splits the experts; fsdp splits d_model."""
  kv = model.n_kv_heads or model.n_heads
  out = []
  for tensor in _divisors(per_slice):
    widths = (model.n_heads, kv, model.d_ff, model.expert_d_ff or model.d_ff, model.vocab_size)
    if any(w % tensor for w in widths):
      continue
    for expert in _divisors(per_slice // tensor):
      if expert > 1 and (not model.experts or model.experts % expert):
        continue
      for fsdp in _divisors(per_slice // (tensor * expert)):
        if model.d_model % fsdp == 0:
          out.append((per_slice // (tensor * expert * fsdp), fsdp, tensor, expert))
  return out


def law_batch_seqs(cfg) -> float:
  """The batch law's B in sequences before any rounding (resolve's, on one device)."""
  from celerity_jax.config import MeshConfig
  from celerity_jax.resolve import resolve

  one = dataclasses.replace(
    cfg, mesh=MeshConfig(), train=dataclasses.replace(cfg.train, microbatches=1, microbatch_rows=0)
  )
  return resolve(one, 1).batch_seqs_law


def with_layout(cfg, layout: Layout):
  return dataclasses.replace(
    cfg,
    mesh=dataclasses.replace(
      cfg.mesh, data=layout.data, fsdp=layout.fsdp, tensor=layout.tensor, expert=layout.expert
    ),
    model=dataclasses.replace(cfg.model, remat=layout.remat),
    train=dataclasses.replace(cfg.train, microbatches=1, microbatch_rows=layout.rows),
  )


def predicted(cfg, resolved, chip, n_devices: int) -> dict:
  """Analytic step time per device for ordering the search: compute at peak and collective bytes
  through one chip's links on rings (bf16 gathers, float32 gradient reductions)."""
  m, mesh = cfg.model, cfg.mesh
  compute = (
    (resolved.flops_per_token + aot_compile.recompute_flops_per_token(m))
    * resolved.batch_tokens
    / n_devices
    / chip.peak_flops
  )
  params = resolved.n_params / (mesh.tensor * mesh.expert)  # what one model-parallel rank holds
  share = lambda k: (k - 1) / k  # noqa: E731
  micro = resolved.microbatches
  gathers = 2 + (m.remat == "full")  # forward, backward, recompute
  ici = micro * params * share(mesh.fsdp) * (2 * gathers + 4)
  data = mesh.data * mesh.slices
  ici += 2 * 4 * params / mesh.fsdp * share(data)
  rows = resolved.batch_seqs / resolved.data_parallel  # per device, whole step
  activation = rows * m.seq_len * m.d_model * 2
  ici += m.n_layers * (4 + 2 * (m.remat == "full")) * 2 * activation * share(mesh.tensor)
  ici_s = ici / chip.ici_bandwidth
  step = max(compute, ici_s)
  return {"compute_s": compute, "ici_s": ici_s, "step_s": step, "run_s": step * resolved.steps}


def fixed_keys(overrides: list[str]) -> dict:
  """{Layout field: value} for the layout keys set in `overrides` (the last setting wins)."""
  out = {}
  for item in overrides:
    key, _, value = item.partition("=")
    if key in LAYOUT_KEYS:
      out[LAYOUT_KEYS[key]] = value if key == "model.remat" else int(value)
  return out


def candidates(
  cfg, chip, n_devices: int, slices: int, max_batch_change: float, fixed: dict | None = None
):
  """(kept, rejected): kept = [(layout, cfg, resolved, prediction)] in predicted order; rejected =
  [(layout, reason)] for layouts ruled out by B. Layouts disagreeing with `fixed` are not made."""
  fixed = fixed or {}
  from celerity_jax.config import ConfigError
  from celerity_jax.resolve import resolve

  law, options = law_batch_seqs(cfg), []
  for data, fsdp, tensor, expert in meshes(cfg.model, n_devices // slices):
    for rows in range(1, MAX_ROWS + 1):
      if rows > 1 and rows * data * slices * fsdp * expert > law * (1 + max_batch_change):
        break  # the granule alone is past the law: B only grows
      for remat in REMATS:
        layout = Layout(data, fsdp, tensor, expert, remat, rows)
        if any(getattr(layout, k) != v for k, v in fixed.items() if v != -1):
          continue
        layout_cfg = with_layout(cfg, layout)
        try:
          r = resolve(layout_cfg, n_devices, platform="tpu")
        except ConfigError:
          continue  # a fixed train.batch_size this granule does not divide
        options.append((layout, layout_cfg, r, abs(r.batch_seqs / law - 1)))
  if not options:
    return [], []
  allowed = max(max_batch_change, min(o[3] for o in options) + 1e-9)
  kept, rejected = [], []
  for layout, layout_cfg, r, change in options:
    if change > allowed:
      rejected.append(
        (
          layout,
          f"B = {r.batch_seqs} sequences is {r.batch_seqs / law - 1:+.1%} "
          f"from the law's {law:.1f} (allowed {allowed:.1%})",
        )
      )
    else:
      kept.append((layout, layout_cfg, r, predicted(layout_cfg, r, chip, n_devices)))
  # layouts differ in B, so they are compared by the whole run's time (to 1%: T's rounding must not
  # decide); among equals, less model parallelism, then the one that saves the most memory first:
  # if it does not fit, it rules the others out without a compile
  kept.sort(key=lambda k: (_bucket(k[3]["run_s"]), k[0].tensor, k[0].expert, -k[0].fsdp, k[0].rows))
  return kept, rejected


def _bucket(seconds: float) -> int:
  """Times within 1% of each other share a bucket."""
  return round(math.log(max(seconds, 1e-12)) / math.log(1.01))


def _needs_at_least(a: Layout, b: Layout) -> bool:
  """Whether layout a needs at least the memory of layout b."""
  return (
    (a.tensor, a.expert) == (b.tensor, b.expert)
    and a.fsdp <= b.fsdp
    and (REMATS.index(a.remat) <= REMATS.index(b.remat))
    and a.rows >= b.rows
  )


def search(
  cfg,
  topology: str,
  slices: int = 1,
  max_batch_change: float = 0.05,
  keep: int = 3,
  max_compiles: int = 12,
  progress=None,
  fixed: dict | None = None,
) -> dict:
  """The fit report: the chosen layout's full report, runner-ups and every rejected layout."""
  from celerity_jax.config import ConfigError

  start = time.perf_counter()
  chip, devices = aot_compile.topology_devices(topology, slices)
  n = len(devices)
  kept, rejected = candidates(cfg, chip, n, slices, max_batch_change, fixed)
  too_big, fits, compiles, reasons = [], [], 0, []
  for layout, layout_cfg, r, guess in kept:
    blocker = next((b for b in too_big if _needs_at_least(layout, b[0])), None)
    if blocker is not None:
      reasons.append(
        {
          "layout": str(layout),
          "kind": "dominated",
          "by": str(blocker[0]),
          "reason": f"needs at least the memory of {blocker[0]} ({blocker[1]})",
        }
      )
      continue
    if len(fits) >= keep or compiles >= max_compiles:
      reasons.append(
        {
          "layout": str(layout),
          "kind": "slower" if len(fits) >= keep else "budget",
          "reason": (
            f"predicted slower than the {keep} fitting layouts found"
            if len(fits) >= keep
            else f"not compiled: --max-compiles {max_compiles} reached"
          ),
          "predicted_run_s": guess["run_s"],
        }
      )
      continue
    if progress:
      progress(f"compiling {layout} (B={r.batch_seqs})")
    try:
      rep = aot_compile.report(layout_cfg, topology, slices, devices=(chip, devices))
    except ConfigError as e:
      reasons.append({"layout": str(layout), "kind": "error", "reason": str(e)})
      continue
    compiles += 1
    mem = rep["memory"]
    rep.update(
      layout=str(layout),
      overrides=layout.overrides()
      + (["train.microbatches=1"] if cfg.train.microbatches != 1 else []),
      predicted=guess,
      batch=_batch_change(r),
      run_s=rep.get("bound", {}).get("step_s", 0) * r.steps,
    )
    if mem["fits"]:
      fits.append(rep)
    else:
      need = mem.get("needed_bytes") or mem.get("peak_bytes")
      what = (
        f"needs {aot_compile.gb(need)} per device, {aot_compile.gb(mem['usable_bytes'])} usable"
      )
      too_big.append((layout, what))
      reasons.append({"layout": str(layout), "kind": "memory", "reason": f"does not fit: {what}"})
  # equal bounds (compute-bound layouts) go to B nearer the law, fewer microbatches, fewer bytes
  # moved between chips
  fits.sort(
    key=lambda rep: (
      _bucket(rep["run_s"]),
      round(abs(rep["batch"]["change"]) * 100),
      rep["recipe_shape"]["microbatches"],
      sum(c["traffic"] for c in rep["collectives"].values()),
      -rep["memory"]["headroom_bytes"],
    )
  )
  reasons += [{"layout": str(layout), "kind": "batch", "reason": why} for layout, why in rejected]
  return {
    "topology": topology,
    "slices": slices,
    "devices": n,
    "chip": chip.name,
    "law_batch_seqs": law_batch_seqs(cfg),
    "max_batch_change": max_batch_change,
    "fixed": fixed or {},
    "best": fits[0] if fits else None,
    "runner_ups": fits[1:],
    "rejected": reasons,
    "compiles": compiles,
    "search_s": round(time.perf_counter() - start, 1),
  }


def _batch_change(resolved) -> dict:
  """B and lambda of a layout next to the law's (lambda follows B at fixed tau)."""
  law = resolved.batch_seqs_law
  return {
    "batch_seqs": resolved.batch_seqs,
    "law_batch_seqs": law,
    "change": resolved.batch_seqs / law - 1,
    "weight_decay": resolved.weight_decay,
    "weight_decay_at_law": resolved.weight_decay * law / resolved.batch_seqs,
    "steps": resolved.steps,
    "tau": resolved.tau,
  }


def table(result: dict) -> str:
  """The fit report for people: the best layout in full, the runner-ups, every layout that was
  compiled and rejected, and counts of the rest."""
  lines = [
    f"layout search on {result['topology']} x{result['slices']} ({result['devices']} "
    f"{result['chip']} chips): {result['compiles']} compiles in {result['search_s']} s"
    + "".join(f"; {k} fixed at {v}" for k, v in result.get("fixed", {}).items())
  ]
  best = result["best"]
  if best is None:
    lines.append("NO LAYOUT FITS")
  else:
    b = best["batch"]
    lines += [
      f"best: {best['layout']}",
      f"  B = {b['batch_seqs']} sequences ({b['change']:+.1%} from the law's "
      f"{b['law_batch_seqs']:.1f}), T = {b['steps']:,}, lambda = {b['weight_decay']:.4g} "
      f"(at the law's B: {b['weight_decay_at_law']:.4g}), tau = {b['tau']:.3f}; the run "
      f"takes >= {best['run_s'] / 3600:,.3g} h at the bound",
      *("  " + line for line in aot_compile.table(best).splitlines()),
    ]
    for rep in result["runner_ups"]:
      m = rep["memory"]
      lines.append(
        f"runner-up: {rep['layout']}: B = {rep['batch']['batch_seqs']}, peak "
        f"{aot_compile.gb(m['peak_bytes'])}, run >= {rep['run_s'] / 3600:,.3g} h"
      )
  counts, dominated = {}, {}
  for row in result["rejected"]:
    if row["kind"] == "dominated":
      dominated[row["by"]] = dominated.get(row["by"], 0) + 1
    elif row["kind"] not in ("memory", "error"):
      counts[row["kind"]] = counts.get(row["kind"], 0) + 1
  for row in result["rejected"]:
    if row["kind"] in ("memory", "error"):
      lines.append(f"rejected: {row['layout']}: {row['reason']}")
      if dominated.get(row["layout"]):
        lines.append(
          f"  and, without compiling, {dominated[row['layout']]} layouts that need at "
          "least as much (fewer FSDP shards, less remat, as many rows or more)"
        )
  words = {
    "slower": "predicted slower, not compiled",
    "budget": "not compiled (--max-compiles)",
    "batch": f"B more than {result['max_batch_change']:.0%} from the law",
  }
  if counts:
    lines.append(
      "also rejected: "
      + "; ".join(f"{n} {words[k]}" for k, n in counts.items())
      + " (--json lists every layout)"
    )
  return "\n".join(lines)
