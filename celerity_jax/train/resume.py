"""What a run starts from: the newest checkpoint's position and data, the data itself (refused when
it differs from what the checkpoint pinned), and the restored state.

A resume compares the checkpoint's trajectory (settings and data fingerprint) with the new one and
refuses any difference before anything is written, unless checkpoint.allow_config_change; an
allowed change is stated, with what it does to the run's position (resolve.py: a changed batch
continues in sequences).
"""

from __future__ import annotations

from celerity_jax import checkpoint as ckpt_lib
from celerity_jax.config import ConfigError, to_dict
from celerity_jax.data import DataChanged
from celerity_jax.data.sources import make_sources
from celerity_jax.train.state import abstract_state
from celerity_jax.train.step import Training

DATA_NAMES = {
  "corpus": "the corpus's content",
  "tokenizer": "the tokenizer",
  "train_tokens": "the training token store",
  "eval_tokens": "the held-out token store",
}


def open_data(cfg, resolved, rows, resumed: dict | None):
  """The run's data; a resume whose corpus differs from its checkpoint's is refused before the new
  corpus is tokenized (unless checkpoint.allow_config_change)."""
  pinned = None
  if resumed is not None and not cfg.checkpoint.allow_config_change:
    pinned = resumed["described"].get(ckpt_lib.DATA)
  try:
    return make_sources(cfg, resolved, rows, cfg.run.progress, pinned)
  except DataChanged as e:
    keys = [f"{ckpt_lib.DATA}.{k}" for k in e.keys]
    current = {"config": to_dict(cfg), ckpt_lib.DATA: e.found}
    raise refusal(cfg.run.dir, resumed["step"], keys, resumed["described"], current) from None


def save_tokenizer(run_dir, tokenizer):
  """run.dir/tokenizer.model is the run's current tokenizer; one that a resume on other data
  replaces stays beside it as tokenizer-FINGERPRINT.model, for its checkpoints (trained.py)."""
  from celerity_jax.data import tokenizer as tokenizer_lib

  path = run_dir / "tokenizer.model"
  if path.exists():
    old = tokenizer_lib.load(path)
    if old.fingerprint == tokenizer.fingerprint:
      return
    old.save(run_dir / f"tokenizer-{old.fingerprint}.model")
  tokenizer.save(path)


def restore(cfg, described, ckpt, training: Training):
  """(step, state, meta, changes) from the newest usable checkpoint, or None for a fresh run.
  Refuses (ConfigError) a checkpoint made with other trajectory settings or data before anything
  is written."""

  def load(step):
    meta = ckpt.meta(step)
    changes = ckpt_lib.config_changes(meta["described"], described)
    if changes and not cfg.checkpoint.allow_config_change:
      raise refusal(cfg.run.dir, step, changes, meta["described"], described)
    return ckpt.restore(step, abstract_state(training.setup)), meta, changes

  found = ckpt.first_usable(load)
  if found is None:
    return None
  step, (state, meta, changes) = found
  r, at = training.resolved, ckpt_lib.position(meta)
  if at.rows != step * r.batch_seqs + r.row_offset:  # resolved from a newer, damaged checkpoint
    raise ConfigError(
      f"run.dir {cfg.run.dir}: the newest checkpoint was damaged and the one before it (step "
      f"{step}) was made with another batch; run the same command again to resume from it"
    )
  return step, state, meta, changes


def moved(step: int, meta: dict, resolved) -> str:
  """What an allowed change does to the run's position: the schedule's t before and after, the
  tokens seen, and the step where it now ends."""
  saved = meta["described"]["derived"]
  if (saved["steps"], saved["batch_seqs"]) == (resolved.steps, resolved.batch_seqs):
    return ""
  was = (step + saved.get("step_offset", 0.0)) / saved["steps"]
  now = (step + resolved.step_offset) / resolved.steps
  rows = ckpt_lib.position(meta).rows
  moved = f"t {was:.3f} -> {now:.3f}" if abs(now - was) > 5e-4 else f"t {now:.3f} kept"
  return (
    f"; {rows * resolved.batch_tokens // resolved.batch_seqs:,} tokens seen, {moved}, "
    f"T {saved['steps']} -> {resolved.steps} steps of {resolved.batch_seqs} sequences, "
    f"ending at step {resolved.stop_step}"
  )


def announce(step: int, restarts: int, meta: dict, changes: list[str], described: dict, resolved):
  """The line a resume prints: from where, and every setting or data that an allowed change
  changed, with what it does to the run's position."""
  line = f"celerity_jax: resumed from step {step} (restart {restarts})"
  if changes:
    changed = explain_changes(changes, meta["described"], described)
    line += f"; changed settings: {changed}{moved(step, meta, resolved)}"
  return line


def explain_changes(changes: list[str], saved: dict, current: dict) -> str:
  """The changed keys for a message: settings by name, the data in words with both fingerprints."""
  words = []
  for key in changes:
    name = key.removeprefix(ckpt_lib.DATA + ".")
    if name == key:
      words.append(key)
    else:
      was, now = (d.get(ckpt_lib.DATA, {}).get(name) for d in (saved, current))
      data_cfg = current.get("config", saved["config"])["data"]
      stdlib = name == "corpus" and not data_cfg["paths"] and data_cfg["corpus"] == "stdlib"
      hint = "; the built-in corpus is this Python's standard library" if stdlib else ""
      words.append(f"{DATA_NAMES.get(name, name)} ({key} {was} -> {now}{hint})")
  return ", ".join(words)


def refusal(run_dir, step: int, changes: list[str], saved: dict, current: dict) -> ConfigError:
  """The one message for a resume whose settings or data differ from its checkpoint's."""
  return ConfigError(
    f"run.dir {run_dir} holds a checkpoint (step {step}) made with different settings or "
    f"data: {explain_changes(changes, saved, current)}; use another run.dir, restore them, or "
    f"pass checkpoint.allow_config_change=true to continue from the checkpoint with these"
  )
