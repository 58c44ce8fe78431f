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
  corpus is tokenized (unless checkpoint.allow_config_change). A resume keeps the run's own
  tokenizer (run.dir/tokenizer.*) unless data.tokenizer names one, and its mixture's history."""
  pinned, at_rows, run_tokenizer = None, 0, ""
  if resumed is not None:
    pinned = resumed["described"].get(ckpt_lib.DATA)
    at_rows = ckpt_lib.position(resumed).rows
    if cfg.checkpoint.allow_config_change:
      pinned = {"mixture": pinned.get("mixture")} if pinned else None
    else:
      run_tokenizer = _own_tokenizer(cfg.run.dir, (pinned or {}).get("tokenizer"))
  try:
    return make_sources(cfg, resolved, rows, cfg.run.progress, pinned, at_rows, run_tokenizer)
  except DataChanged as e:
    keys = [f"{ckpt_lib.DATA}.{k}" for k in e.keys]
    current = {"config": to_dict(cfg), ckpt_lib.DATA: e.found}
    raise refusal(cfg.run.dir, resumed["step"], keys, resumed["described"], current) from None


def _own_tokenizer(run_dir, fingerprint: str | None) -> str:
  """The run's tokenizer file when it is the one its checkpoint pinned, else ""."""
  from celerity_jax import storage
  from celerity_jax.data import tokenizer as tokenizer_lib

  for name in ("tokenizer.model", "tokenizer.json"):
    path = storage.location(run_dir) / name
    if fingerprint and path.exists() and tokenizer_lib.load(path).fingerprint == fingerprint:
      return str(path)
  return ""


def save_tokenizer(run_dir, tokenizer):
  """run.dir/tokenizer.model (or .json) is the run's current tokenizer; one that a resume on other
  data replaces stays beside it as tokenizer-FINGERPRINT.model (.json), for its checkpoints
  (trained.py)."""
  from celerity_jax.data import tokenizer as tokenizer_lib

  for name in ("tokenizer.model", "tokenizer.json"):
    path = run_dir / name
    if path.exists():
      old = tokenizer_lib.load(path)
      if old.fingerprint == tokenizer.fingerprint:
        return
      stem, suffix = name.split(".")
      old.save(run_dir / f"{stem}-{old.fingerprint}.{suffix}")
      path.unlink()
  tokenizer.save(run_dir / tokenizer.file_name)


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


def fresh_optimizer(state, setup):
  """The restored state with Adam's moments (and its count) started afresh, as
  checkpoint.restore_optimizer=false asks: params, step, data position and monitor are kept."""
  return state._replace(opt_state=setup.start(state.params).opt_state)


def announce(
  step: int, restarts: int, meta: dict, changes: list[str], described: dict, resolved,
  optimizer_reset: bool = False,
):  # fmt: skip
  """The line a resume prints: from where, and every setting or data that an allowed change
  changed, with what it does to the run's position."""
  line = f"celerity_jax: resumed from step {step} (restart {restarts})"
  if optimizer_reset:
    line += "; optimizer state not restored (checkpoint.restore_optimizer=false): Adam restarts"
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
      continue
    was, now = (ckpt_lib.flatten(d.get(ckpt_lib.DATA, {})).get(name) for d in (saved, current))
    parts = name.split(".")  # tokenizer, or sources.NAME.corpus (train_tokens, eval_tokens)
    what = DATA_NAMES.get(parts[-1], name)
    if parts[0] == "sources" and len(parts) == 3 and parts[1] not in ("data", "stdlib"):
      what += f" of source {parts[1]}"
    elif parts[0] == "sources" and len(parts) == 2:
      what = f"source {parts[1]} (added or removed)"
    hint = (
      "; the built-in corpus is this Python's standard library" if parts[1:2] == ["stdlib"] else ""
    )
    words.append(f"{what} ({key} {was} -> {now}{hint})")
  return ", ".join(words)


def refusal(run_dir, step: int, changes: list[str], saved: dict, current: dict) -> ConfigError:
  """The one message for a resume whose settings or data differ from its checkpoint's."""
  return ConfigError(
    f"run.dir {run_dir} holds a checkpoint (step {step}) made with different settings or "
    f"data: {explain_changes(changes, saved, current)}; use another run.dir, restore them, or "
    f"pass checkpoint.allow_config_change=true to continue from the checkpoint with these"
  )
