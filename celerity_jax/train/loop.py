"""The training loop: a config in; metrics, checkpoints, TensorBoard and progress out.

`run` resolves the config once (keeping a resumed run's batch), builds the mesh, the sharded state
and the jitted step, opens the data, restores the newest usable checkpoint, and hands the rest to
`Loop`. Metrics are fetched one step late: step k's metrics are read after step k+1 is dispatched,
so the host never waits on the device it is feeding. The same command with the same run.dir
resumes from the latest complete checkpoint and continues bit-identically.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np

from celerity_jax import checkpoint as ckpt_lib
from celerity_jax import distributed, sharding, storage, wandb_mirror
from celerity_jax.collapse import monitor
from celerity_jax.data.pipeline import prefetch
from celerity_jax.metrics import (
  MetricsWriter,
  Throughput,
  keep_rows_until,
  peak_flops,
  progress_bar,
)
from celerity_jax.resolve import describe, resolve
from celerity_jax.run_lock import RunDirInUse, RunLock
from celerity_jax.train import control, events, resume, signals
from celerity_jax.train.console import Console
from celerity_jax.train.downstream import make_downstream
from celerity_jax.train.evaluate import make_evaluator
from celerity_jax.train.state import abstract_state
from celerity_jax.train.step import Training, prepare_training


@dataclass(frozen=True)
class Outputs:
  """Where a run writes: its directory, the metrics writer (process 0 only), the checkpoints, the
  lock that makes the directory this run's (process 0 only) and the console."""

  run_dir: object
  writer: MetricsWriter
  ckpt: ckpt_lib.Checkpointer
  lock: RunLock | None
  console: Console


def run(cfg) -> dict:
  """Trains per `cfg` and returns the last metrics row; raises RunHalted for a halted run. A run
  refused before it starts (settings, data, a directory in use) leaves run.dir as it found it,
  and does not leave one behind that it created."""
  run_dir = storage.location(cfg.run.dir, "run.dir")
  wandb_mirror.check_installed(cfg.run.wandb)
  created = storage.check_writable(run_dir, "run.dir")  # before any compile: a typo fails at once
  lock, accepted = None, False
  try:
    lock = _own(run_dir)
    resumed = ckpt_lib.newest_meta(run_dir / "checkpoints")
    position = None if resumed is None else ckpt_lib.position(resumed)
    planned = None if resumed is None else monitor.planned_by(resumed["described"])
    training = prepare_training(cfg, resolve(cfg, jax.device_count(), position), planned=planned)
    resolved, mesh = training.resolved, training.mesh
    sources = resume.open_data(
      cfg, resolved, sharding.process_rows(mesh, resolved.batch_seqs), resumed
    )
    described = describe(cfg, resolved, sources.fingerprint)
    described["collapse_plan"] = dict(training.monitor.plan)  # kept by every resume
    evaluate = make_evaluator(cfg, training, sources.held_out, sources.weights)
    downstream = make_downstream(cfg, training, sources.tokenizer)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    writer = None
    try:
      # nothing is written to run.dir until the data, the settings and a checkpoint are accepted
      restored = resume.restore(cfg, described, ckpt, training)
      accepted = True
      if distributed.is_primary():
        storage.write_atomic(run_dir / "config.json", json.dumps(described, indent=2) + "\n")
        if sources.tokenizer is not None:  # what sampling and export decode text with
          resume.save_tokenizer(run_dir, sources.tokenizer)
      writer = MetricsWriter(
        run_dir, cfg.run.tensorboard, distributed.is_primary(), (cfg.run.wandb, described)
      )
      console = Console(cfg.run.dir, distributed.is_primary(), cfg.run.progress)
      if distributed.is_primary():
        keep_rows_until(writer.path, restored[0] if restored else 0)
      if restored is None:
        state, restarts = _fresh_state(cfg, training, console), 0
      else:
        step, state, meta, changes = restored
        restarts = meta["restarts"] + 1
        reset = not cfg.checkpoint.restore_optimizer
        if reset:
          state = resume.fresh_optimizer(state, training.setup)
        writer.row(
          {"event": "restart", "step": step, "restarts": restarts, "config_changes": changes}
          | ({"optimizer_reset": True} if reset else {})
        )
        console.say(resume.announce(step, restarts, meta, changes, described, resolved, reset))
        if note := monitor.plan_note(training.monitor, cfg, resolved):
          console.say(note)
      if sources.event:
        at = restored[0] if restored else 0
        writer.row({"event": "mixture", "step": at, "weights": sources.weights})
        console.say(f"celerity_jax: {sources.event}")
      out = Outputs(run_dir, writer, ckpt, lock, console)
      loop = Loop(cfg, training, described, out, restarts, (evaluate, downstream))
      last = loop.train(state, sources.train)
      if last.get("step") == resolved.stop_step:
        console.say(loop.summary(sources.tokenizer is not None))
      return last
    finally:
      ckpt.close()
      if writer is not None:
        writer.close()
  finally:
    if lock is not None:
      lock.release()
    if not accepted and distributed.is_primary():
      storage.remove_if_empty(created)


def _fresh_state(cfg, training: Training, console: Console):
  """Step 0: random params from the seed, or the weights init.from names (init_weights.py)."""
  setup = training.setup
  if not cfg.init.from_:
    return setup.init()
  from celerity_jax import init_weights

  abstract = abstract_state(setup).params
  params = init_weights.params(cfg, training.resolved.multipliers, abstract)
  start = init_weights.read(cfg.init)
  reference = "" if cfg.collapse.reference != "none" else "; collapse.reference=none: spike checks"
  console.say(f"celerity_jax: weights from {start.where} ({start.about}){reference}")
  return setup.from_params(params)


def _own(run_dir) -> RunLock | None:
  """Process 0 takes run.dir's lock (run_lock.py) and every process learns whether it did."""
  lock, refused = RunLock(run_dir) if distributed.is_primary() else None, None
  if lock is not None:
    try:
      lock.acquire()
    except RunDirInUse as e:
      lock, refused = None, e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    taken = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
    if not taken and refused is None:
      refused = RunDirInUse(f"run.dir {run_dir} is in use by another run (process 0 says which)")
  if refused is not None:
    raise refused
  return lock


@dataclass(frozen=True)
class Dispatched:
  """A step handed to the devices whose metrics are fetched one step later."""

  step: int  # steps done once it finishes
  metrics: dict  # on device
  decision: object  # the processes' agreed control.STOP | control.SAVE bits, on device
  extra: dict  # host values for its row (the held-out loss)
  log: bool  # whether it gets a metrics row


class Loop:
  """One process's part of a run from a restored or fresh state to the stop step: it steps,
  votes with the other processes, logs each step one step late, saves, and halts."""

  def __init__(
    self, cfg, training: Training, described: dict, out: Outputs, restarts: int, evaluators
  ):
    """`evaluators`: (held-out loss, downstream tasks), each params -> row fields, or None."""
    self.cfg, self.resolved, self.out = cfg, training.resolved, out
    self.train_step, self.mesh = training.train_step, training.mesh
    self.evaluate, self.downstream = evaluators
    self.reference = training.monitor.source
    self.restarts = restarts
    self.meta = {
      "described": described,
      "config_hash": ckpt_lib.trajectory_hash(described),
      "restarts": restarts,
      "versions": ckpt_lib.versions(),
    }
    self.agreement = control.Agreement(training.mesh)
    self.throughput = Throughput()
    self.last_row: dict = {}
    self.flags: dict = {}  # the last step's event flags (events.judge)
    self.last_save, self.last_save_step = time.monotonic(), 0
    self.checkpoint_step: int | None = None  # the newest this process saved
    self.console = out.console
    # the devices' peak FLOP/s for MFU: known for TPUs and data-center GPUs, not for CPUs
    peak = peak_flops(training.mesh.devices.flat[0].device_kind)
    self.peak = None if peak is None else peak * training.mesh.size
    self.bar = None

  def announce(self, start: int):
    r = self.resolved
    self.out.writer.row(
      {
        "event": "start",
        "step": start,
        "mesh": dict(self.mesh.shape),
        "restarts": self.restarts,
        "n_params": r.n_params,
        "n_active": r.n_active,
        "tpp_effective": r.tpp_effective,
        "steps": r.steps,
        "stop_step": r.stop_step,
        "tau": r.tau,
        "tau_groups": r.tau_groups,
        "collapse_reference": self.reference,
      }
    )
    moe = (
      f" (active {r.n_active:,}, effective TPP {r.tpp_effective:.3g})"
      if r.n_active != r.n_params
      else ""
    )
    self.console.say(
      f"celerity_jax: N={r.n_params:,}{moe} D={r.tokens:.4g} B={r.batch_seqs}x"
      f"{self.cfg.model.seq_len} T={r.steps} warmup={r.warmup_steps} "
      f"lambda={r.weight_decay:.4g} tau={r.tau:.4g} per-group tau="
      + ", ".join(f"{g}:{t:.4g}" for g, t in r.tau_groups.items() if t is not None)
    )

  def rows(self, step: int) -> int:
    """Sequences consumed after `step` steps (resolve.py: continued across a change of B)."""
    return step * self.resolved.batch_seqs + self.resolved.row_offset

  def frac(self, step: int) -> float:
    """t of the schedule after `step` steps: tokens seen / D."""
    return (step + self.resolved.step_offset) / self.resolved.steps

  def save(self, step: int, state):
    self.out.writer.flush()  # rows up to `step` are stored before its checkpoint commits
    rows = self.rows(step)
    self.out.ckpt.save(
      step,
      state,
      {
        **self.meta,
        "step": step,
        "tokens": rows * self.cfg.model.seq_len,
        "data": {"seed": self.cfg.train.seed, "next_step": step, "rows": rows},
      },
      force=True,
    )
    self.last_save, self.last_save_step = time.monotonic(), step
    self.checkpoint_step = step

  def local_flags(self, signal) -> int:
    """This process's votes: a signal reached it; its clock says a timed save is due."""
    every = self.cfg.checkpoint.every_minutes
    timed = every and time.monotonic() - self.last_save >= 60 * every
    return (control.STOP if signal is not None else 0) | (control.SAVE if timed else 0)

  def halt(self, step: int, values: dict, halt: events.Halt, keep):
    """Writes diagnostics.json and the halt event, saves `keep` = (step, state) on a collapse
    halt (for a look or a resume), and raises RunHalted with the exit status."""
    run_dir = self.out.run_dir
    record = {
      "step": step,
      "cause": halt.cause,
      **values,
      "config_hash": self.meta["config_hash"],
      "last_row": self.last_row,
    }
    if distributed.is_primary():
      storage.write_atomic(run_dir / "diagnostics.json", json.dumps(record, indent=2) + "\n")
    self.out.writer.row({"event": "halt", "step": step, "cause": halt.cause, **values})
    if halt.code == events.HALT_COLLAPSE and keep is not None:
      self.save(*keep)
      self.out.ckpt.wait()
    diagnostics = run_dir / "diagnostics.json"
    raise events.RunHalted(halt.code, f"{halt.message}; diagnostics in {diagnostics}")

  def settle(self, pending: Dispatched, keep=None) -> int:
    """Fetches a dispatched step's metrics, acts on them, logs its row when due; returns the
    processes' agreed decision voted at that step (control.STOP | control.SAVE bits). `keep` =
    (step, state), the newest state, is what a collapse halt saves."""
    values, decision = self.fetch(pending)
    self.act(pending.step, values, keep)
    if pending.log:
      self.record(pending.step, values)
    return decision

  def fetch(self, pending: Dispatched) -> tuple[dict, int]:
    """(the step's metrics as host values, with its extra ones; the agreed decision)."""
    fetched, decision = jax.device_get((pending.metrics, pending.decision))
    decision = int(decision)
    if decision & control.SAVE and pending.step <= self.last_save_step:
      decision &= ~control.SAVE  # voted before the save that has since happened
    values = monitor.host_fields(
      {k: (float(v) if np.ndim(v) == 0 else np.round(v, 5).tolist()) for k, v in fetched.items()}
    )
    return values | pending.extra, decision

  def act(self, step: int, values: dict, keep):
    """Carries out events.judge's verdict on the step: event rows, warnings, a halt."""
    verdict = events.judge(
      step,
      values,
      self.flags,
      frac=self.frac(step),
      train_cfg=self.cfg.train,
      collapse_cfg=self.cfg.collapse,
    )
    self.flags = verdict.flags
    for row in verdict.events:
      self.out.writer.row(row)
      self.console.event(row)
    for line in verdict.warnings:
      self.console.say(line)
    if verdict.halt is not None:
      self.halt(step, values, verdict.halt, keep)

  def record(self, step: int, values: dict):
    """The step's metrics row and progress bar fields (and the checks due with a row: a failed
    background save, the run directory's lock)."""
    self.out.ckpt.check()  # a background save that failed (a full disk) stops the run here
    if self.out.lock is not None:
      self.out.lock.check()
    tokens = self.rows(step) * self.cfg.model.seq_len
    rate = self.throughput.update(tokens)
    self.last_row = {
      "step": step,
      "tokens": tokens,
      "frac": self.frac(step),
      **values,
      "tokens_per_s": rate,
      "microbatches": self.resolved.microbatches,
      "dtype": self.cfg.model.dtype,
      "restarts": self.restarts,
    }
    if rate is not None and self.peak is not None:
      self.last_row["mfu"] = rate * self.resolved.flops_per_token / self.peak
    self.out.writer.row(self.last_row)
    self.bar.set_postfix(self.console.fields(self.last_row), refresh=False)

  def summary(self, tokenizer: bool) -> str:
    return self.console.summary(self.last_row, self.resolved.steps, self.checkpoint_step, tokenizer)

  def train(self, state, train_data) -> dict:
    """Steps from `state` to the stop step (or a stop agreed by every process); returns the last
    metrics row."""
    cfg, r, c = self.cfg, self.resolved, self.cfg.checkpoint
    start = int(state.step)
    self.last_save_step = start
    self.announce(start)
    self.bar = progress_bar(r.stop_step, start, cfg.run.progress and distributed.is_primary())
    batches = prefetch(train_data.batch, start, r.stop_step, cfg.data.threads)
    pending = None
    with signals.guarded() as guard:
      try:
        for step, host_batch in zip(range(start, r.stop_step), batches, strict=True):
          if step == start:
            shape = " x ".join(f"{axis} {size}" for axis, size in self.mesh.shape.items())
            kind = self.mesh.devices.flat[0].platform
            self.console.compiling(f"mesh {shape} over {self.mesh.size} {kind} devices")
          state, metrics = self.train_step(
            state, sharding.place_batch(host_batch, self.mesh, r.batch_seqs)
          )
          if step == start:
            self.console.compiled()
          guard.training()  # compiled and stepped: a signal now saves first
          decision = self.agreement.vote(self.local_flags(guard.signal))
          done = step + 1
          agreed = self.settle(pending, (done, state)) if pending is not None else 0
          evaluate_now = self.evaluate is not None and (
            done % cfg.train.eval_every == 0 or done == r.stop_step
          )
          extra = self.evaluate(state.params) if evaluate_now else {}
          every = cfg.downstream.every
          if self.downstream is not None and (done % every == 0 or done == r.stop_step):
            extra |= self.downstream(state.params)
          log = done % cfg.run.log_every == 0 or done == r.stop_step or done == 1 or bool(extra)
          pending = Dispatched(done, metrics, decision, extra, log)
          self.bar.update(1)
          stop = agreed & control.STOP  # every process stops at the same step
          if (
            stop
            or agreed & control.SAVE
            or (c.every_steps and done % c.every_steps == 0)
            or (done == r.stop_step and (c.every_steps or c.every_minutes))
          ):
            # the saved step's row is written before its checkpoint: a resume never misses it
            stop |= self.settle(pending, (done, state)) & control.STOP
            pending = None
            self.save(done, state)
          if stop:
            self.out.ckpt.wait()
            self.out.writer.row({"event": "preempted", "step": done, "signal": guard.signal})
            print(
              f"celerity_jax: stopped at step {done} "
              + (
                f"by signal {guard.signal}"
                if guard.signal
                else "(a signal reached another process)"
              )
              + "; checkpoint saved; run the same command to resume",
              file=sys.stderr,
            )
            return self.last_row
        if pending is not None:
          self.settle(pending)
        self.out.ckpt.wait()
        self.out.ckpt.check()
        guard.ended()  # saved: a signal from here on has nothing to stop
      finally:
        self.bar.close()
    return self.last_row
