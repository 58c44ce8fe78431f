"""Compiling a run's train step for a TPU topology on any machine, and what XLA reports about it:
memory per device, FLOPs, collectives and a roofline bound (the aot and plan commands, aot_fit)."""

from __future__ import annotations

import re
import time

from celerity_jax.commands import hlo_collectives, tpu_chips


def topology_devices(name: str, slices: int = 1) -> tuple[tpu_chips.Chip, list]:
  """Compile-only devices of `slices` slices of topology `name` (e.g. 'v5e:4x4')."""
  chip, dims = tpu_chips.parse_topology(name)
  from jax.experimental import topologies

  kwargs = {"num_slices": slices} if slices > 1 else {}
  if set(dims) == {1}:  # one chip (v5e:1x1, v5p:1x1x1): a host of one
    kwargs["chips_per_host_bounds"] = (1, 1, 1)
  try:
    return chip, list(
      topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    )
  except Exception as e:  # libtpu's errors name the problem; keep one line of it
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"--topology {name}: libtpu cannot describe it ({first})") from None


def abstract_inputs(training, cfg):
  """ShapeDtypeStructs of (state, batch) with the loop's shardings."""
  import jax
  import jax.numpy as jnp

  from celerity_jax import sharding
  from celerity_jax.train.state import abstract_state

  state = abstract_state(training.setup)
  rows = (training.resolved.batch_seqs, cfg.model.seq_len)
  batch_sharding = sharding.batch_sharding(training.mesh)
  keys = ["inputs", "targets"] + (["segment_ids"] if cfg.data.packing == "segments" else [])
  batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=batch_sharding) for k in keys}
  return state, batch


def compile_step(cfg, devices):
  """(training, compiled or None, seconds, error text): the loop's step for `devices`."""
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  training = prepare_training(
    cfg, resolve(cfg, len(devices), platform=devices[0].platform), devices
  )
  state, batch = abstract_inputs(training, cfg)
  start = time.perf_counter()
  with _cache_off():
    try:
      compiled = training.train_step.lower(state, batch).compile()
    except Exception as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return training, None, time.perf_counter() - start, str(e)
  return training, compiled, time.perf_counter() - start, ""


class _cache_off:
  """TPU executables must not enter the persistent compilation cache: later CPU runs sharing it
  warn that they cannot load them."""

  def __enter__(self):
    import jax

    self.saved = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)

  def __exit__(self, *exc):
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", self.saved)


def _needed_bytes(error: str) -> tuple[float | None, float | None]:
  """(bytes needed, HBM available) from XLA's RESOURCE_EXHAUSTED message."""

  def number(pattern):
    match = re.search(pattern, error)
    if not match:
      return None
    value, unit = float(match.group(1)), match.group(2)
    return value * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(unit, 1)

  return (
    number(r"required for [\w ]+\(([\d.]+)([KMGT]?)\)"),
    number(r"available HBM \(([\d.]+)([KMGT]?)\)"),
  )


# a step is said to fit when its peak leaves this share of HBM free: the eval step's program, the
# runtime's own buffers and fragmentation need some
HEADROOM = 0.05


def report(cfg, topology: str, slices: int = 1, devices=None, step=None) -> dict:
  """Everything celerity_jax.commands.aot prints, as one JSON-able dict (`devices`: reuse
  topology_devices; `step`: reuse compile_step's result for those devices)."""
  chip, devices = topology_devices(topology, slices) if devices is None else devices
  training, compiled, seconds, error = step or compile_step(cfg, devices)
  r, n = training.resolved, len(devices)
  out = {
    "recipe_shape": {
      "n_params": r.n_params,
      "batch_seqs": r.batch_seqs,
      "seq_len": cfg.model.seq_len,
      "microbatches": r.microbatches,
      "remat": cfg.model.remat,
      "mesh": dict(training.mesh.shape),
    },
    "topology": topology,
    "slices": slices,
    "devices": n,
    "chip": chip.name,
    "compile_s": round(seconds, 2),
  }
  if compiled is None:
    needed, available = _needed_bytes(error)
    available = available or chip.hbm_bytes
    out["memory"] = {
      "fits": False,
      "hbm_bytes": available,
      "needed_bytes": needed,
      "usable_bytes": available,
      "over_bytes": needed - available if needed else None,
      "xla": error.strip().splitlines()[0][:500],
    }
    return out
  mem, usable = compiled.memory_analysis(), (1 - HEADROOM) * chip.hbm_bytes
  peak = getattr(mem, "peak_memory_in_bytes", 0) or (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  out["memory"] = {
    "argument_bytes": mem.argument_size_in_bytes,
    "output_bytes": mem.output_size_in_bytes,
    "alias_bytes": mem.alias_size_in_bytes,
    "temp_bytes": mem.temp_size_in_bytes,
    "peak_bytes": peak,
    "hbm_bytes": chip.hbm_bytes,
    "usable_bytes": usable,
    "fits": peak <= usable,
    "headroom_bytes": chip.hbm_bytes - peak,
  }
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  comms = hlo_collectives.collectives(compiled.as_text(), n)
  out["xla_cost"] = {
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
  }
  out["collectives"] = comms
  out["bound"] = roofline(chip, out["xla_cost"], comms, r, cfg.model, n)
  return out


def recompute_flops_per_token(model) -> float:
  """Forward FLOPs per token that rematerialization runs again in the backward pass: every block's
  matmuls and attention under `full`; under `dots` (matmul results without batch dimensions are
  saved) the attention score and value products, whose dot_generals batch over heads."""
  from celerity_jax import scaling

  if model.remat == "none":
    return 0.0
  attention_forward = 2.0 * model.n_layers * model.seq_len * model.n_heads * model.d_head
  if model.remat == "dots":
    return attention_forward
  counts = scaling.param_counts(model)
  norms = (2 * model.n_layers + 1) * (2 if model.norm == "layernorm" else 1) * model.d_model
  return 2.0 * (counts["active"] - counts["embedding"] - norms) + attention_forward


def roofline(chip, cost: dict, comms: dict, resolved, model, n_devices: int) -> dict:
  """Lower bounds on one step's time per device from compute, HBM traffic and ICI traffic. XLA
  counts a loop body's FLOPs once, so compute uses the larger of XLA's FLOPs and the model's
  (6 N D per step plus attention, the plan command's count, plus what remat computes again)
  shared by the devices. MFU counts the model's FLOPs only, as MFU does."""
  model_flops = resolved.flops_per_token * resolved.batch_tokens
  executed = (resolved.flops_per_token + recompute_flops_per_token(model)) * resolved.batch_tokens
  flops = max(cost["flops"], executed / n_devices)
  times = {
    "compute_s": flops / chip.peak_flops,
    "hbm_s": cost["bytes_accessed"] / chip.hbm_bandwidth,
    "ici_s": sum(c["traffic"] for c in comms.values()) / chip.ici_bandwidth,
  }
  step = max(times.values())
  return {
    **times,
    "step_s": step,
    "limited_by": max(times, key=times.get)[:-2],
    "model_flops_per_step": model_flops,
    "executed_flops_per_step": executed,
    "mfu_at_bound": model_flops / (n_devices * chip.peak_flops * step) if step else None,
  }


def gb(x) -> str:
  """Bytes for people: 3 significant digits in the largest unit below the value."""
  if x is None:
    return "?"
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(x) >= size:
      return f"{x / size:.3g} {unit}"
  return f"{x:.0f} B"


def table(rep: dict) -> str:
  """The report for people."""
  shape = rep["recipe_shape"]
  lines = [
    f"{rep['topology']} x{rep['slices']} ({rep['devices']} devices, {rep['chip']}), mesh "
    + " ".join(f"{k}={v}" for k, v in shape["mesh"].items())
    + f"; B={shape['batch_seqs']}x{shape['seq_len']}, microbatches "
    f"{shape['microbatches']}, remat {shape['remat']}; compiled in {rep['compile_s']} s"
  ]
  m = rep["memory"]
  if "needed_bytes" in m:  # XLA refused to compile it
    lines.append(
      f"DOES NOT FIT: needs {gb(m['needed_bytes'])} per device, XLA has "
      f"{gb(m['hbm_bytes'])} of HBM (over by {gb(m['over_bytes'])})"
    )
    return "\n".join(lines)
  lines.append(
    f"memory per device: arguments {gb(m['argument_bytes'])}, outputs "
    f"{gb(m['output_bytes'])} (aliased {gb(m['alias_bytes'])}), temporaries "
    f"{gb(m['temp_bytes'])}; peak {gb(m['peak_bytes'])} of {gb(m['hbm_bytes'])} ("
    f"{m['peak_bytes'] / m['hbm_bytes']:.0%}): "
    + (
      "fits"
      if m["fits"]
      else f"DOES NOT FIT in the {1 - HEADROOM:.0%} a step may use ({gb(m['usable_bytes'])})"
    )
  )
  c = rep["xla_cost"]
  lines.append(
    f"XLA per device and step: {c['flops']:.4g} FLOPs, {gb(c['bytes_accessed'])} "
    "accessed (a loop body counted once)"
  )
  for kind, row in rep["collectives"].items():
    lines.append(
      f"  {kind:<19}{row['count']:>8.0f} per step {gb(row['bytes']):>14} result, "
      f"{gb(row['traffic']):>12} through each device's links"
    )
  b = rep["bound"]
  lines.append(
    f"step time >= {b['step_s'] * 1e3:,.1f} ms (compute {b['compute_s'] * 1e3:,.1f}, "
    f"HBM {b['hbm_s'] * 1e3:,.1f}, ICI {b['ici_s'] * 1e3:,.1f} ms): "
    f"{b['limited_by']}-bound; MFU at that bound {b['mfu_at_bound']:.0%}"
  )
  return "\n".join(lines)
