"""What a person watching a run sees on stderr (process 0): a line while the step compiles; on the
progress bar the loss, the final loss the collapse monitor predicts and its residual (once it has
aligned), the held-out loss once measured, tokens/s and MFU; and a closing summary: the final and
held-out loss, predicted against reached, the alerts, where the checkpoint and metrics are, and the
commands to sample, plot and predict. Everything here is also in metrics.jsonl."""

from __future__ import annotations

import shlex
import sys
import time

from tqdm import tqdm


class Console:
  def __init__(self, run_dir: str, enabled: bool, progress: bool):
    self.run_dir, self.enabled, self.progress = run_dir, enabled, progress
    self.shown: dict = {}  # the bar's fields; the held-out loss stays until measured again
    self.alerts: list[tuple[int, float]] = []  # (step, residual) of each collapse alert
    self.spikes = 0
    self.started = time.monotonic()
    self.compile_started: float | None = None

  def say(self, text: str):
    """A line on stderr, above the progress bar if one is drawn."""
    if self.enabled:
      tqdm.write(text, file=sys.stderr)

  def compiling(self, description: str):
    """Before the first step, which compiles the train step (minutes for a large model)."""
    self.compile_started = time.monotonic()
    if self.progress:
      self.say(f"celerity_jax: compiling the train step ({description}) ...")

  def compiled(self):
    if self.progress and self.compile_started is not None:
      self.say(f"celerity_jax: compiled in {time.monotonic() - self.compile_started:.1f} s")
    self.compile_started = None

  def event(self, row: dict):
    if row["event"] == "collapse_alert":
      self.alerts.append((row["step"], row.get("collapse_residual", float("nan"))))
    elif row["event"] == "loss_spike":
      self.spikes += 1

  def fields(self, row: dict) -> dict:
    """The progress bar's fields after a logged row."""
    shown = self.shown
    shown["loss"] = f"{row['loss']:.4f}"
    if "final_loss_estimate" in row:
      shown["L(T)~"] = f"{row['final_loss_estimate']:.4f}"
      shown["resid"] = f"{row['collapse_residual']:+.3f}"
    if "eval_loss" in row:
      shown["eval"] = f"{row['eval_loss']:.4f}"
    if row.get("tokens_per_s") is not None:
      shown["tok/s"] = f"{row['tokens_per_s']:,.0f}"
    if row.get("mfu") is not None:
      shown["MFU"] = f"{row['mfu']:.0%}"
    return dict(shown)

  def summary(self, row: dict, steps: int, checkpoint: int | None, tokenizer: bool) -> str:
    """The closing lines of a finished (or stopped-early) run; `row` is its last metrics row."""
    run = shlex.quote(self.run_dir)
    minutes, seconds = divmod(time.monotonic() - self.started, 60)
    lines = [
      f"celerity_jax: done at step {row['step']} of T={steps} ({row['tokens']:,} tokens, t "
      f"{row['frac']:.3f}) in {int(minutes)} min {seconds:.0f} s",
      f"  final loss {row['loss']:.4f} (smoothed {row['loss_smooth']:.4f})"
      + (f", held-out {row['eval_loss']:.4f}" if "eval_loss" in row else ""),
    ]
    if "final_loss_estimate" in row and row["frac"] >= 1:
      predicted, reached = row["final_loss_estimate"], row["loss_smooth"]
      lines.append(
        f"  the collapse monitor predicted L(T) {predicted:.4f}, reached {reached:.4f} "
        f"({reached / predicted - 1:+.1%})"
      )
    elif "final_loss_estimate" in row:  # stopped early (train.stop_*): the prediction stands
      lines.append(
        f"  the collapse monitor predicts L(T) {row['final_loss_estimate']:.4f} for the whole "
        f"run (stopped at t {row['frac']:.3f})"
      )
    if self.alerts:
      step, residual = self.alerts[0]
      lines.append(
        f"  collapse alerts: {len(self.alerts)}, the first at step {step} (residual "
        f"{residual:+.3f}): the run left its reference curve (metrics.jsonl, event "
        f"collapse_alert)"
      )
    else:
      lines.append(
        "  collapse alerts: none" + (f"; loss spikes: {self.spikes}" * bool(self.spikes))
      )
    lines.append(
      f"  checkpoint: {self.run_dir}/checkpoints/{checkpoint}"
      if checkpoint is not None
      else "  checkpoint: none (checkpoint.every_steps=0 and every_minutes=0)"
    )
    lines.append(f"  metrics: {self.run_dir}/metrics.jsonl, config: {self.run_dir}/config.json")
    prompt = "--prompt 'def '" if tokenizer else "--prompt-ids 5,6,7"
    lines += [
      "  next:",
      f"    python -m celerity_jax.commands.sample {run} {prompt} --max-tokens 64",
      f"    python -m celerity_jax.commands.plot_collapse {run} --out {run}/collapse.png",
      f"    python -m celerity_jax.commands.predict {run} --stop 0.3",
    ]
    return "\n".join(lines)
