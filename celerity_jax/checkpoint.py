"""Orbax checkpoints of the train state plus metadata, resume checks, and export of params.

A checkpoint holds the train state (params, optimizer state, step, non-finite counters) and JSON
metadata: the resolved config with the data's fingerprint (corpus, tokenizer, token stores) and
their trajectory hash, the sequences and tokens seen, the data position (batches are a pure function
of (seed, global row), so the sequences consumed *are* the data-iterator state), library versions
and the restart count. Saves are async: the loop blocks only while device arrays are copied to
host. A resume compares the checkpoint's trajectory with the new one (`config_changes`): the
settings that change the trajectory and the data's fingerprint.

A damaged checkpoint (a truncated or missing array file, an unreadable manifest or metadata) is
never fatal while an older one is usable: `first_usable` warns, moves the damaged step aside to
`<step>.damaged` (kept for a look, out of Orbax's listing so that step can be saved again) and tries
the one before. Only when none is usable is it an error (`CheckpointUnusable`, exit 6).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from typing import TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from celerity_jax import storage
from celerity_jax.config import Config, ConfigError, free_keys, to_dict
from celerity_jax.resolve import FREE_DERIVED, RESTATED_DERIVED
from celerity_jax.storage import NO_SPACE

# What may differ on resume: the config keys whose Rule says free (config.py), and the derived
# values that follow from free keys or from the checkpoint's position (resolve.FREE_DERIVED).
FREE_KEYS = (*free_keys(), *(f"derived.{name}" for name in FREE_DERIVED))
DAMAGED_SUFFIX = ".damaged"
DEFAULTS = to_dict(Config())
T = TypeVar("T")


class CheckpointUnusable(Exception):
  """Checkpoints exist but none can be read; the CLI prints it and exits with status 6."""


class _Damaged(Exception):
  """A step whose files cannot be read back (internal: triggers the fall back)."""


VERSIONED = ("celerity_jax", "jax", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


DATA = "data_fingerprint"  # the described key of what the run trains on (data/prepare.py)


def trajectory(described: dict) -> dict:
  """The flattened config, derived quantities and data fingerprint that determine the run's
  trajectory."""
  data = {DATA: described[DATA]} if described.get(DATA) else {}
  # a key added since the checkpoint was made holds its default there (it had no other value)
  config = {name: {**keys, **described["config"].get(name, {})} for name, keys in DEFAULTS.items()}
  derived = {k: v for k, v in described["derived"].items() if k not in RESTATED_DERIVED}
  flat = flatten({**config, "derived": derived, **data})
  return {k: v for k, v in flat.items() if k not in FREE_KEYS}


def trajectory_hash(described: dict) -> str:
  return hashlib.sha256(json.dumps(trajectory(described), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(saved: dict, current: dict) -> list[str]:
  """The trajectory keys that differ. The data is compared where both sides name it (checkpoints
  of earlier versions, and tools that describe a run without opening its data, do not)."""
  a, b = trajectory(saved), trajectory(current)
  keys = a.keys() | b.keys()
  if not (saved.get(DATA) and current.get(DATA)):
    keys = {k for k in keys if not k.startswith(DATA + ".")}
  # the mixture's weights may change on resume: data/sources.py logs that as an event
  keys.discard(f"{DATA}.mixture")
  return sorted(k for k in keys if a.get(k) != b.get(k))


def versions() -> dict:
  out = {}
  for name in VERSIONED:
    try:
      out[name] = importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
      out[name] = None
  return out


class Checkpointer:
  """CheckpointManager over run_dir/checkpoints (a local path or gs://): keeps the latest `keep`
  plus every `keep_every`. `read_only` never creates, moves or deletes anything."""

  def __init__(self, directory, ckpt_cfg=None, read_only: bool = False):
    self.directory = storage.location(directory)
    self.read_only = read_only
    if read_only:  # (Orbax's own read_only mode logs warnings on every open)
      options = ocp.CheckpointManagerOptions(create=False, save_root_metadata=False)
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        keep_period=ckpt_cfg.keep_every or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
      )
    quiet_abandoned_io()
    # explicit handlers: a fresh process can then read item metadata before any save or restore
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def incomplete(self) -> list[str]:
    """Step directories a killed save left behind, which Orbax never lists as checkpoints: a
    temporary directory on disk, a step without its commit marker on Cloud Storage. Steps moved
    aside as damaged are not listed again."""
    if not self.directory.exists():
      return []
    committed = {str(step) for step in self.manager.all_steps()}
    return sorted(
      p.name
      for p in self.directory.iterdir()
      if p.is_dir() and p.name not in committed and DAMAGED_SUFFIX not in p.name
    )

  def steps(self, warn: bool = True) -> list[int]:
    """Committed steps, newest first; warns about each incomplete save."""
    for name in self.incomplete() if warn else ():
      print(
        f"celerity_jax: warning: ignoring incomplete checkpoint {self.directory / name}",
        file=sys.stderr,
      )
    return sorted(self.manager.all_steps(), reverse=True)

  def latest(self) -> int | None:
    steps = self.steps()
    return steps[0] if steps else None

  def first_usable(
    self, load: Callable[[int], T], steps: list[int] | None = None
  ) -> tuple[int, T] | None:
    """(step, load(step)) for the newest step `load` can read, falling back past damaged ones
    with a warning each; None when there is no checkpoint. `load` raises ConfigError to refuse a
    readable checkpoint (a changed setting), which is not damage and ends the search."""
    steps = self.steps() if steps is None else steps
    damaged: list[tuple[int, str]] = []
    for step in steps:
      try:
        result, reason = load(step), None
      except ConfigError:
        raise
      except Exception as e:  # Orbax, tensorstore, JSON: any unreadable part
        result, reason = None, _one_line(e)
        quiet_abandoned_io()
      if _all_processes_agree(reason is None):
        self._set_aside([s for s, _ in damaged])
        return step, result
      reason = reason or "unreadable on another process"
      damaged.append((step, reason))
      print(
        f"celerity_jax: warning: checkpoint {self.directory / str(step)} is damaged "
        f"({reason}); trying an older one",
        file=sys.stderr,
      )
    if damaged:
      listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
      raise CheckpointUnusable(
        f"no usable checkpoint in {self.directory} ({listed}); move the "
        f"directory aside to start over, or restore it from a copy"
      )
    return None

  def _set_aside(self, steps: list[int]):
    """Renames damaged steps so Orbax no longer lists them (nothing is deleted)."""
    if self.read_only or not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        source, target = self.directory / str(step), self.directory / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while target.exists():  # the same step was damaged before: keep both
          n, target = n + 1, self.directory / f"{step}{DAMAGED_SUFFIX}.{n + 1}"
        storage.move(source, target)
        print(
          f"celerity_jax: warning: moved damaged checkpoint {source} to {target.name}",
          file=sys.stderr,
        )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("celerity_jax damaged checkpoints moved")
    self.manager.reload()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state=None):
    """The state at `step`, placed with the shardings of `abstract_state` (any mesh); without
    one, as saved (host arrays, for export)."""
    if abstract_state is None:
      return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
        "state"
      ]
    saved = self.manager.item_metadata(step)["state"]
    saved_shapes = {
      path: tuple(leaf.shape)
      for path, leaf in leaf_paths(saved or {})
      if getattr(leaf, "shape", None) is not None
    }
    if not saved_shapes:
      raise _Damaged("no array metadata")
    mismatched = [
      f"{path}: checkpoint {saved_shapes.get(path)} vs model {tuple(leaf.shape)}"
      for path, leaf in leaf_paths(abstract_state)
      if saved_shapes.get(path) != tuple(leaf.shape)
    ]
    if mismatched:
      raise ConfigError(
        f"checkpoint {self.directory / str(step)} does not fit this model: "
        + "; ".join(mismatched[:8])
        + (" ..." if len(mismatched) > 8 else "")
      )
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]

  def restore_params(self, step: int, abstract_params):
    """The params alone of `step`, placed with the shardings of `abstract_params`
    (ShapeDtypeStructs; any mesh, any process count): the optimizer state stays on disk."""
    restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params
    )
    args = ocp.args.PyTreeRestore(
      item={"params": abstract_params},
      restore_args={"params": restore_args},
      partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(self.directory / str(step) / "state", args=args)["params"]

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    meta = {**meta, "saved_at": datetime.datetime.now(datetime.UTC).isoformat()}
    return self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )

  def wait(self):
    self.manager.wait_until_finished()

  def check(self):
    """Raises the error of a background save that failed (a full disk), without waiting."""
    self.manager.check_for_errors()

  def close(self):
    self.manager.close()


def newest_meta(directory) -> dict | None:
  """The metadata of the newest checkpoint whose metadata reads, or None (no checkpoint): what a
  resumed run starts from (its position and batch, its data). Reads only; damage is reported by
  the restore."""
  directory = storage.location(directory)
  if not directory.exists():
    return None
  reader = Checkpointer(directory, read_only=True)
  try:
    for step in reader.steps(warn=False):
      try:
        meta = reader.meta(step)
        position(meta)  # the fields a resume needs are there
        return meta
      except Exception:  # unreadable: the restore falls back past it, with a warning
        quiet_abandoned_io()
    return None
  finally:
    reader.close()


def position(meta: dict):
  """The resolve.Position a checkpoint's metadata records (checkpoints of earlier versions did not
  record the sequences consumed: they never changed B, so it is step x B)."""
  from celerity_jax.resolve import Position

  step, batch = int(meta["step"]), int(meta["described"]["derived"]["batch_seqs"])
  rows = meta.get("data", {}).get("rows")
  return Position(step, step * batch if rows is None else int(rows), batch)


def _one_line(error: Exception, limit: int = 200) -> str:
  """On one line; Orbax's wrapper gives way to tensorstore's precise message inside it."""
  while "TensorStore details" in str(error) and (error.__cause__ or error.__context__):
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split()) or type(error).__name__
  return f"{type(error).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


def quiet_abandoned_io():
  """Orbax's background threads report a failed save or restore themselves, with tracebacks:
  each one logs it (absl), and the array reads or writes it abandons print, when they finish after
  Orbax closed its event loop, tracebacks about the closed loop, the unawaited read or the task's
  unretrieved exception. They say nothing that the run's warning or one-line error does not say,
  so from the first checkpoint a run opens, those kinds alone are dropped."""
  if getattr(sys.excepthook, "celerity_quiet", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, value, tb):
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      excepthook(kind, value, tb)

  def quiet_unraisablehook(unraisable):
    text = str(unraisable.exc_value)
    if not _abandoned(text) and text != "Event loop is closed":
      unraisablehook(unraisable)

  quiet_excepthook.celerity_quiet = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_not_abandoned)


def _abandoned(text: str) -> bool:
  """A message about an array read that failed, or a write that found no space."""
  return "Encountered error while reading array" in text or any(m in text for m in NO_SPACE)


def _not_abandoned(record) -> bool:
  """A logging filter: False for a record about a failed read or a write that found no space."""
  error = record.exc_info[1] if record.exc_info else None
  return not _abandoned(record.getMessage() + str(error))


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process: they must all restore the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def leaf_paths(tree) -> list[tuple[str, object]]:
  """(path, array) for every array of a params or state tree: `blocks/attn/wq`, `embed`, ..."""

  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
  )
  return [(name(path), leaf) for path, leaf in flat]
