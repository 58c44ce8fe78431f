"""Orbax checkpoints of the train state plus metadata, resume checks, and export of params.

A checkpoint holds the train state (params, optimizer state, step, non-finite counters) and JSON
metadata: the resolved config and its trajectory hash, tokens seen, the data position (batches are
a pure function of (seed, step), so the step *is* the data-iterator state), library versions and the
restart count. Saves are async: the loop blocks only while device arrays are copied to host.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import sys
from importlib import metadata as importlib_metadata

import jax
import orbax.checkpoint as ocp

from celerity_jax import storage
from celerity_jax.config import ConfigError

# Settings that do not change the training trajectory: they may differ on resume.
FREE_KEYS = ("run.", "checkpoint.", "mesh.", "dist.", "train.stop_frac", "train.stop_step",
             "train.eval_every", "data.threads", "data.cache_dir", "data.eval_batches",
             "model.remat", "derived.stop_step", "derived.data_parallel",
             "derived.microbatches", "derived.batch_seqs_law",   # follow from settings kept
             "collapse.threshold", "collapse.patience", "collapse.policy", "collapse.spike_factor")
VERSIONED = ("celerity_jax", "jax", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def trajectory(described: dict) -> dict:
  """The flattened config + derived quantities that determine the run's trajectory."""
  flat = flatten({**described["config"], "derived": described["derived"]})
  return {k: v for k, v in flat.items() if not k.startswith(FREE_KEYS)}


def trajectory_hash(described: dict) -> str:
  return hashlib.sha256(json.dumps(trajectory(described), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(saved: dict, current: dict) -> list[str]:
  a, b = trajectory(saved), trajectory(current)
  return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


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
  plus every `keep_every`."""

  def __init__(self, directory, ckpt_cfg):
    self.directory = storage.location(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, keep_period=ckpt_cfg.keep_every or None,
        enable_async_checkpointing=ckpt_cfg.async_save, create=True)
    # explicit handlers: a fresh process can then read item metadata before any save or restore
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def incomplete(self) -> list[str]:
    """Step directories a killed save left behind, which Orbax never lists as checkpoints: a
    temporary directory on disk, a step without its commit marker on Cloud Storage."""
    if not self.directory.exists():
      return []
    committed = {str(step) for step in self.manager.all_steps()}
    return sorted(p.name for p in self.directory.iterdir()
                  if p.is_dir() and p.name not in committed)

  def latest(self) -> int | None:
    for name in self.incomplete():
      print(f"celerity_jax: warning: ignoring incomplete checkpoint {self.directory / name}",
            file=sys.stderr)
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state):
    """The state at `step`, placed with the shardings of `abstract_state` (any mesh)."""
    saved = self.manager.item_metadata(step)["state"]
    saved_shapes = {path: tuple(leaf.shape) for path, leaf in _leaves(saved)}
    mismatched = [f"{path}: checkpoint {saved_shapes.get(path)} vs model {tuple(leaf.shape)}"
                  for path, leaf in _leaves(abstract_state)
                  if saved_shapes.get(path) != tuple(leaf.shape)]
    if mismatched:
      raise ConfigError(f"checkpoint {self.directory / str(step)} does not fit this model: "
                        + "; ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    meta = {**meta, "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _leaves(tree):
  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))
  return [(name(path), leaf) for path, leaf in flat]
