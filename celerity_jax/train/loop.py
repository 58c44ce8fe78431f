"""The training loop: mesh, state, data in; metrics.jsonl, TensorBoard and progress out.

Metrics are fetched one step late: step k's metrics are read after step k+1 is dispatched, so the
host never waits on the device it is feeding.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from celerity_jax import config as config_lib
from celerity_jax import sharding
from celerity_jax.data.pipeline import prefetch
from celerity_jax.data.sources import make_sources
from celerity_jax.metrics import MetricsWriter, Throughput, progress_bar
from celerity_jax.resolve import Resolved, resolve
from celerity_jax.train import state as state_lib
from celerity_jax.train.step import make_eval_step, make_train_step

def describe(cfg, resolved: Resolved) -> dict:
  """The resolved config: what a user chose plus every derived quantity."""
  return {"config": config_lib.to_dict(cfg), "derived": resolved.as_dict()}


def _device_batch(global_batch: dict, batch_sharding) -> dict:
  """Global arrays from each process's contiguous slice of the rows (all rows on one process)."""
  n, i = jax.process_count(), jax.process_index()
  out = {}
  for key, value in global_batch.items():
    rows = value.shape[0] // n
    out[key] = jax.make_array_from_process_local_data(
        batch_sharding, value[i * rows:(i + 1) * rows], global_shape=value.shape)
  return out


def run(cfg) -> dict:
  """Trains per `cfg` and returns the last metrics row."""
  mesh = sharding.make_mesh(cfg.mesh)
  resolved = resolve(cfg, len(jax.devices()))
  sharding.check_batch(resolved.batch_seqs, cfg.train.microbatches, mesh)
  run_dir = Path(cfg.run.dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(json.dumps(describe(cfg, resolved), indent=2) + "\n")

  train_data, held_out = make_sources(cfg, resolved, cfg.run.progress)
  setup = state_lib.build(cfg, resolved, mesh)
  state = setup.init()
  train_step = make_train_step(setup, cfg, mesh)
  eval_step = make_eval_step(setup, cfg, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  eval_batches = [_device_batch(held_out.batch(i), batch_sharding)
                  for i in range(cfg.data.eval_batches)] if held_out else []

  def evaluate(params) -> float:
    return sum(float(eval_step(params, b)) for b in eval_batches) / len(eval_batches)

  writer = MetricsWriter(run_dir, cfg.run.tensorboard)
  writer.row({"event": "start", "mesh": dict(mesh.shape), "n_params": resolved.n_params,
              "steps": resolved.steps, "stop_step": resolved.stop_step,
              "tau": resolved.tau, "tau_groups": resolved.tau_groups})
  print(f"celerity_jax: N={resolved.n_params:,} D={resolved.tokens:.4g} B={resolved.batch_seqs}x"
        f"{cfg.model.seq_len} T={resolved.steps} warmup={resolved.warmup_steps} "
        f"lambda={resolved.weight_decay:.4g} tau={resolved.tau:.4g} per-group tau="
        + ", ".join(f"{g}:{t:.4g}" for g, t in resolved.tau_groups.items() if t is not None),
        file=sys.stderr)

  throughput = Throughput()
  bar = progress_bar(resolved.stop_step, int(state.step), cfg.run.progress)
  last_row, pending = {}, None

  def emit(step, metrics, extra):
    nonlocal last_row
    values = {k: float(v) for k, v in jax.device_get(metrics).items()} | extra
    tokens = step * resolved.batch_tokens
    rate = throughput.update(tokens)
    last_row = {"step": step, "tokens": tokens, "frac": step / resolved.steps, **values,
                "tokens_per_s": rate, "microbatches": cfg.train.microbatches,
                "dtype": cfg.model.dtype}
    writer.row(last_row)
    shown = {"loss": f"{values['loss']:.4f}"}
    if rate is not None:
      shown["tok_s"] = f"{rate:,.0f}"
    bar.set_postfix(shown, refresh=False)

  start = int(state.step)
  batches = prefetch(train_data.batch, start, resolved.stop_step, cfg.data.threads)
  try:
    for step, host_batch in zip(range(start, resolved.stop_step), batches, strict=True):
      state, metrics = train_step(state, _device_batch(host_batch, batch_sharding))
      if pending is not None:
        emit(*pending)
        pending = None
      done = step + 1
      evaluate_now = eval_batches and (done % cfg.train.eval_every == 0
                                       or done == resolved.stop_step)
      extra = {"eval_loss": evaluate(state.params)} if evaluate_now else {}
      if (done % cfg.run.log_every == 0 or done == resolved.stop_step or done == 1
          or evaluate_now):
        pending = (done, metrics, extra)
      bar.update(1)
    if pending is not None:
      emit(*pending)
  finally:
    bar.close()
    writer.close()
  return last_row
