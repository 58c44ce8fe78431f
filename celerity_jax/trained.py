"""A trained model read back from its run directory, for sampling and export: the config it was
trained with, one checkpoint's params and the tokenizer of its text.

Any complete checkpoint will do (`step`), else the newest usable one (damaged ones are skipped with
a warning, as resume does). Only the run directory is needed: config.json is not, since every
checkpoint carries its own resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from celerity_jax import storage
from celerity_jax.config import Config, ConfigError, from_dict
from celerity_jax.config_checks import validate
from celerity_jax.parametrization import Multipliers, multipliers


@dataclass(frozen=True)
class Trained:
  run_dir: object
  step: int
  cfg: Config
  described: dict  # the checkpoint's resolved config (resolve.describe)
  params: dict  # pure-dict tree of host float32 arrays, as the Decoder names them
  tokenizer: object | None  # data/tokenizer.Tokenizer; None for a run on synthetic tokens

  @property
  def multipliers(self) -> Multipliers:
    return multipliers(self.cfg.param, self.cfg.model)

  def model(self):
    """The Decoder holding these params (as jax arrays on the default device)."""
    import jax.numpy as jnp
    from flax import nnx

    from celerity_jax.models.decoder import Decoder

    def new():
      return Decoder(self.cfg.model, self.multipliers, nnx.Rngs(params=0))

    graphdef = nnx.graphdef(nnx.eval_shape(new))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, self.params))


def load(run_dir, step: int | None = None, what: str = "run") -> Trained:
  """Reads `step` (default: the newest usable checkpoint) of `run_dir`; ConfigError naming the
  directory or step when there is nothing to read. `what` names the command in errors."""
  from celerity_jax.checkpoint import Checkpointer

  run_dir = storage.location(run_dir)
  if not (run_dir / "checkpoints").exists():
    raise ConfigError(f"{what}: {run_dir} has no checkpoints directory (is it a run.dir?)")
  ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
  try:
    steps = ckpt.steps()
    if step is not None and step not in steps:
      raise ConfigError(
        f"{what} --step {step}: no complete checkpoint at that step in "
        f"{run_dir}/checkpoints; complete steps: "
        f"{', '.join(map(str, sorted(steps))) or 'none'}"
      )
    found = ckpt.first_usable(
      lambda s: (ckpt.restore(s), ckpt.meta(s)), [step] if step is not None else steps
    )
    if found is None:
      raise ConfigError(f"{what}: no complete checkpoint in {run_dir}/checkpoints")
  finally:
    ckpt.close()
  step, (state, meta) = found
  params = state["params"] if isinstance(state, dict) else state.params
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  described = meta["described"]
  cfg = validate(from_dict(described["config"], f"{run_dir}/checkpoints/{step}"))
  tokenizer = _tokenizer(run_dir, step, described.get("data_fingerprint"), what)
  return Trained(run_dir, int(step), cfg, described, params, tokenizer)


def settings(run_dir, step: int | None, what: str) -> tuple[int, Config, dict]:
  """(step, config, resolved config) of `step` (default: the newest complete checkpoint) of
  `run_dir`, from the checkpoint's metadata file alone: no jax, since it runs while the config is
  built, before jax.distributed starts (init_weights.py). ConfigError naming what is missing."""
  import json

  directory = storage.location(run_dir) / "checkpoints"
  if not directory.exists():
    raise ConfigError(f"{what}: {run_dir} has no checkpoints directory (is it a run.dir?)")
  remote = storage.is_remote(run_dir)  # (a local save is renamed into place once complete)
  steps = sorted(
    (
      int(p.name)
      for p in directory.iterdir()
      if p.name.isdigit() and (not remote or (p / "commit_success.txt").exists())
    ),
    reverse=True,
  )
  for candidate in [step] if step is not None else steps:
    try:
      described = json.loads((directory / str(candidate) / "meta" / "metadata").read_text())
      described = described["described"]
    except (OSError, ValueError, KeyError):
      continue  # not there, or unreadable: the next older one
    cfg = validate(from_dict(described["config"], f"{directory}/{candidate}"))
    return candidate, cfg, described
  raise ConfigError(
    f"{what}: no complete checkpoint{'' if step is None else f' at step {step}'} in "
    f"{directory}; complete steps: {', '.join(map(str, sorted(steps))) or 'none'}"
  )


def _tokenizer(run_dir, step: int, pinned: dict | None, what: str):
  from celerity_jax.data import tokenizer as tokenizer_lib

  path = tokenizer_file(run_dir, step, pinned, what)
  return None if path is None else tokenizer_lib.load(path)


def tokenizer_file(run_dir, step: int, pinned: dict | None, what: str):
  """The file of the tokenizer the checkpoint trained with: run.dir/tokenizer.model (or
  tokenizer.json), or the one a resume on other data set beside it (tokenizer-FINGERPRINT.model
  or .json); None for synthetic tokens. Checkpoints of earlier versions pin nothing:
  tokenizer.model, if there is one."""
  from celerity_jax.data import tokenizer as tokenizer_lib

  path = run_dir / "tokenizer.model"
  if pinned is None:
    return path if path.exists() else None
  wanted = pinned.get("tokenizer")
  if wanted is None:
    return None
  for candidate in (
    path,
    run_dir / "tokenizer.json",
    run_dir / f"tokenizer-{wanted}.model",
    run_dir / f"tokenizer-{wanted}.json",
  ):
    if candidate.exists():
      if tokenizer_lib.load(candidate).fingerprint == wanted:
        return candidate
  raise ConfigError(
    f"{what}: checkpoint step {step} of {run_dir} trained with tokenizer {wanted}, and neither "
    f"tokenizer.model nor tokenizer-{wanted}.model there is it"
  )
