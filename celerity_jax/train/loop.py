"""The training loop: mesh, state, data in; metrics, checkpoints, TensorBoard and progress out.

Metrics are fetched one step late: step k's metrics are read after step k+1 is dispatched, so the
host never waits on the device it is feeding. The same command with the same run.dir resumes from
the latest complete checkpoint and continues bit-identically.
"""
from __future__ import annotations

import functools
import json
import sys
import time

import jax
import numpy as np

from celerity_jax import checkpoint as ckpt_lib
from celerity_jax import config as config_lib
from celerity_jax import distributed, sharding, storage
from celerity_jax.collapse import monitor
from celerity_jax.config import ConfigError
from celerity_jax.data.pipeline import prefetch
from celerity_jax.data.sources import make_sources
from celerity_jax.metrics import MetricsWriter, Throughput, progress_bar
from celerity_jax.resolve import Resolved
from celerity_jax.train import control
from celerity_jax.train import signals
from celerity_jax.train.state import abstract_state
from celerity_jax.train.step import make_eval_step, prepare_training

HALT_NONFINITE = 4
HALT_COLLAPSE = 5


class RunHalted(Exception):
  """The run stopped itself (non-finite losses, a collapse alert under policy halt); `code` is the
  exit status."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


def describe(cfg, resolved: Resolved) -> dict:
  """The resolved config: what a user chose plus every derived quantity."""
  return {"config": config_lib.to_dict(cfg), "derived": resolved.as_dict()}


def _device_batch(local_batch: dict, batch_sharding, n_rows: int) -> dict:
  """Global arrays of `n_rows` rows from this process's rows (sharding.process_rows) of each key:
  every process contributes only the rows its devices hold, so each row is read once."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, value,
                                                      (n_rows, *value.shape[1:]))
          for key, value in local_batch.items()}


def _keep_rows_until(path, step: int):
  """On resume, forget rows logged after the restored step (they are about to be recomputed,
  events included) and lines a crash cut short or garbled (warned about, never fatal)."""
  if not distributed.is_primary() or not path.exists():
    return
  lines = path.read_bytes().split(b"\n")
  kept, unreadable, later = [], 0, 0
  for line in lines:
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
      row_step = row.get("step", 0) if isinstance(row, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
      row_step = None
    if not isinstance(row_step, (int, float)):
      unreadable += 1
    elif row_step > step:
      later += 1
    else:
      kept.append(line.decode("utf-8") + "\n")
  if unreadable:
    _say(f"celerity_jax: warning: {path}: dropped {unreadable} unreadable line(s) (a write cut "
         f"short by a crash?); the complete rows are kept")
  if unreadable or later:
    storage.write_atomic(path, "".join(kept))


def _restore(cfg, described, ckpt, setup):
  """(step, state, meta) from the newest usable checkpoint, or None for a fresh run. Refuses
  (ConfigError) a checkpoint made with other trajectory settings before anything is written."""
  def load(step):
    meta = ckpt.meta(step)
    changes = ckpt_lib.config_changes(meta["described"], described)
    if changes and not cfg.checkpoint.allow_config_change:
      raise ConfigError(f"run.dir {cfg.run.dir} holds a checkpoint (step {step}) made with "
                        f"different settings: {', '.join(changes)}; use another run.dir, restore "
                        f"the settings, or pass checkpoint.allow_config_change=true")
    return ckpt.restore(step, abstract_state(setup)), meta, changes
  found = ckpt.first_usable(load)
  return None if found is None else (found[0], *found[1])


def _say(text: str):
  """A line on stderr from process 0 only (every process runs the same loop)."""
  if distributed.is_primary():
    print(text, file=sys.stderr)


def run(cfg) -> dict:
  """Trains per `cfg` and returns the last metrics row; raises RunHalted for a halted run."""
  run_dir = storage.location(cfg.run.dir)
  storage.check_writable(run_dir, "run.dir")        # before any compile: a typo fails at once
  mesh, resolved, setup, train_step, monitor_spec = prepare_training(cfg)
  described = describe(cfg, resolved)
  rows = sharding.process_rows(mesh, resolved.batch_seqs)
  train_data, held_out = make_sources(cfg, resolved, rows, cfg.run.progress)
  eval_step = make_eval_step(setup, cfg, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  device_batch = functools.partial(_device_batch, batch_sharding=batch_sharding,
                                   n_rows=resolved.batch_seqs)
  eval_batches = [device_batch(held_out.batch(i))
                  for i in range(cfg.data.eval_batches)] if held_out else []

  def evaluate(params) -> float:
    return sum(float(eval_step(params, b)) for b in eval_batches) / len(eval_batches)

  ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
  writer = None
  try:
    # nothing is written to run.dir until the data, the settings and a checkpoint are accepted
    restored = _restore(cfg, described, ckpt, setup)
    if distributed.is_primary():
      storage.write_atomic(run_dir / "config.json", json.dumps(described, indent=2) + "\n")
    writer = MetricsWriter(run_dir, cfg.run.tensorboard, enabled=distributed.is_primary())
    _keep_rows_until(writer.path, restored[0] if restored else 0)
    if restored is None:
      state, restarts = setup.init(), 0
    else:
      step, state, meta, changes = restored
      restarts = meta["restarts"] + 1
      writer.row({"event": "restart", "step": step, "restarts": restarts,
                  "config_changes": changes})
      _say(f"celerity_jax: resumed from step {step} (restart {restarts})"
           + (f"; changed settings: {', '.join(changes)}" if changes else ""))
    return _train(cfg, resolved, described, state, restarts, train_step, train_data,
                  device_batch, evaluate if eval_batches else None, writer, ckpt, mesh, run_dir,
                  monitor_spec.source)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def _train(cfg, resolved, described, state, restarts, train_step, train_data, device_batch,
           evaluate, writer, ckpt, mesh, run_dir, reference) -> dict:
  start = int(state.step)
  writer.row({"event": "start", "step": start, "mesh": dict(mesh.shape), "restarts": restarts,
              "n_params": resolved.n_params, "n_active": resolved.n_active,
              "tpp_effective": resolved.tpp_effective, "steps": resolved.steps,
              "stop_step": resolved.stop_step, "tau": resolved.tau,
              "tau_groups": resolved.tau_groups, "collapse_reference": reference})
  moe = (f" (active {resolved.n_active:,}, effective TPP {resolved.tpp_effective:.3g})"
         if resolved.n_active != resolved.n_params else "")
  _say(f"celerity_jax: N={resolved.n_params:,}{moe} D={resolved.tokens:.4g} B={resolved.batch_seqs}x"
       f"{cfg.model.seq_len} T={resolved.steps} warmup={resolved.warmup_steps} "
       f"lambda={resolved.weight_decay:.4g} tau={resolved.tau:.4g} per-group tau="
       + ", ".join(f"{g}:{t:.4g}" for g, t in resolved.tau_groups.items() if t is not None))
  c = cfg.checkpoint
  meta = {"described": described, "config_hash": ckpt_lib.trajectory_hash(described),
          "restarts": restarts, "versions": ckpt_lib.versions()}
  throughput, last_row, pending = Throughput(), {}, None
  last_save, last_save_step = time.monotonic(), start
  flags = {"loss_spike": 0, "collapse_alert": 0}     # last step's flags: report rising edges once
  bar = progress_bar(resolved.stop_step, start, cfg.run.progress and distributed.is_primary())
  agreement = control.Agreement(mesh)

  def save(step, state):
    nonlocal last_save, last_save_step
    writer.flush()                  # rows up to `step` are stored before its checkpoint commits
    ckpt.save(step, state, {**meta, "step": step, "tokens": step * resolved.batch_tokens,
                            "data": {"seed": cfg.train.seed, "next_step": step}}, force=True)
    last_save, last_save_step = time.monotonic(), step

  def local_flags(signal) -> int:
    """This process's votes: a signal reached it; its clock says a timed save is due."""
    timed = c.every_minutes and time.monotonic() - last_save >= 60 * c.every_minutes
    return (control.STOP if signal is not None else 0) | (control.SAVE if timed else 0)

  def halt(step, values, cause, code, message):
    record = {"step": step, "cause": cause, **values, "config_hash": meta["config_hash"],
              "last_row": last_row}
    if distributed.is_primary():
      storage.write_atomic(run_dir / "diagnostics.json", json.dumps(record, indent=2) + "\n")
    writer.row({"event": "halt", "step": step, "cause": cause, **values})
    raise RunHalted(code, f"{message}; diagnostics in {run_dir / 'diagnostics.json'}")

  def check_collapse(step, values):
    """Spike and collapse-alert events on their first step; halts per collapse.policy."""
    for key in flags:
      now, before = int(values.get(key, 0)), flags[key]
      flags[key] = now
      if not now or before:
        continue
      detail = {k: values[k] for k in ("loss", "loss_smooth", "collapse_residual",
                                       "final_loss_estimate") if k in values}
      writer.row({"event": key, "step": step, "frac": step / resolved.steps, **detail})
      text = ", ".join(f"{k} {v:.4g}" for k, v in detail.items())
      if key == "loss_spike":
        _say(f"celerity_jax: warning: loss spike at step {step} ({text}; smoothed loss above "
             f"{cfg.collapse.spike_factor}x its minimum)")
      elif cfg.collapse.policy == "halt":
        halt(step, values, "collapse", HALT_COLLAPSE,
             f"off the collapse reference at step {step} ({text}; |residual| > "
             f"{cfg.collapse.threshold} for {cfg.collapse.patience} steps)")
      else:
        _say(f"celerity_jax: warning: off the collapse reference at step {step} ({text}; "
             f"|residual| > {cfg.collapse.threshold} for {cfg.collapse.patience} steps)")

  def emit(step, metrics, decision, extra, log) -> int:
    """Logs a step's metrics and acts on them (halts, events); returns the processes' agreed
    decision voted at that step (control.STOP | control.SAVE bits)."""
    nonlocal last_row
    fetched, decision = jax.device_get((metrics, decision))
    decision = int(decision)
    if decision & control.SAVE and step <= last_save_step:
      decision &= ~control.SAVE       # voted before the save that has since happened
    values = monitor.host_fields({k: (float(v) if np.ndim(v) == 0 else np.round(v, 5).tolist())
                                  for k, v in fetched.items()})
    values |= extra
    if values["nonfinite"] and (cfg.train.on_nonfinite == "halt"
                                or values["bad_steps"] >= cfg.train.max_bad_steps):
      halt(step, values, "nonfinite", HALT_NONFINITE,
           f"non-finite loss or gradient at step {step} ({int(values['bad_steps'])} in a row, "
           f"policy {cfg.train.on_nonfinite})")
    check_collapse(step, values)
    if not log:
      return decision
    tokens = step * resolved.batch_tokens
    rate = throughput.update(tokens)
    last_row = {"step": step, "tokens": tokens, "frac": step / resolved.steps, **values,
                "tokens_per_s": rate, "microbatches": resolved.microbatches,
                "dtype": cfg.model.dtype, "restarts": restarts}
    writer.row(last_row)
    shown = {"loss": f"{values['loss']:.4f}"}
    if rate is not None:
      shown["tok_s"] = f"{rate:,.0f}"
    bar.set_postfix(shown, refresh=False)
    return decision

  def emit_or_halt(pending, done, state) -> int:
    try:
      return emit(*pending)
    except RunHalted as halted:
      if halted.code == HALT_COLLAPSE:            # keep the state for a look or a resume
        save(done, state)
        ckpt.wait()
      raise

  batches = prefetch(train_data.batch, start, resolved.stop_step, cfg.data.threads)
  with signals.guarded() as guard:
    try:
      for step, host_batch in zip(range(start, resolved.stop_step), batches, strict=True):
        state, metrics = train_step(state, device_batch(host_batch))
        guard.training()              # compiled and stepped: a signal now saves first
        decision = agreement.vote(local_flags(guard.signal))
        done = step + 1
        agreed = emit_or_halt(pending, done, state) if pending is not None else 0
        evaluate_now = evaluate is not None and (done % cfg.train.eval_every == 0
                                                 or done == resolved.stop_step)
        extra = {"eval_loss": evaluate(state.params)} if evaluate_now else {}
        log = (done % cfg.run.log_every == 0 or done == resolved.stop_step or done == 1
               or evaluate_now)
        pending = (done, metrics, decision, extra, log)
        bar.update(1)
        stop = agreed & control.STOP              # every process stops at the same step
        if (stop or agreed & control.SAVE or (c.every_steps and done % c.every_steps == 0)
            or (done == resolved.stop_step and (c.every_steps or c.every_minutes))):
          # the saved step's row is written before its checkpoint: a resume never misses it
          stop |= emit_or_halt(pending, done, state) & control.STOP
          pending = None
          save(done, state)
        if stop:
          ckpt.wait()
          writer.row({"event": "preempted", "step": done, "signal": guard.signal})
          print(f"celerity_jax: stopped at step {done} "
                + (f"by signal {guard.signal}" if guard.signal else "(a signal reached another "
                   "process)") + "; checkpoint saved; run the same command to resume",
                file=sys.stderr)
          return last_row
      if pending is not None:
        emit(*pending)
      ckpt.wait()
    finally:
      bar.close()
  return last_row
