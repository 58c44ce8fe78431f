"""Runs for the collapse tools: train a recipe with overrides in this process, or reuse a run that
already got as far (so an interrupted experiment or sweep picks up where it stopped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from celerity_jax.collapse.curves import Curve, load_run
from celerity_jax.config import ConfigError

QUIET = ["run.progress=false", "run.tensorboard=false"]


def config(recipe: str, overrides: list[str], run_dir: Path, stop_frac: float = 1.0):
  from celerity_jax import recipes

  return recipes.configure(
    recipe, [*overrides, *QUIET, f"run.dir={run_dir}", f"train.stop_frac={stop_frac}"]
  )


def reached(cfg, run_dir: Path, stop_frac: float) -> bool:
  """Whether run_dir already holds this run up to stop_frac; a run made with other training
  settings is an error (the monitor's settings may differ: curves are re-analysed offline)."""
  try:
    curve = load_run(run_dir)
  except (ConfigError, KeyError, ValueError):
    return False
  import jax

  from celerity_jax.checkpoint import config_changes
  from celerity_jax.resolve import describe, resolve

  saved = json.loads((run_dir / "config.json").read_text())
  changes = [
    k
    for k in config_changes(saved, describe(cfg, resolve(cfg, len(jax.devices()))))
    if not k.startswith("collapse.")
  ]
  if changes:
    raise ConfigError(
      f"{run_dir} holds a run with other settings ({', '.join(changes)}); "
      f"remove it or use another output directory"
    )
  return curve.t_hat[-1] >= stop_frac - 1.0 / curve.steps


def train(recipe: str, overrides: list[str], run_dir, stop_frac: float = 1.0) -> Curve:
  """The run's curve up to stop_frac, training (or resuming) only if it is not there yet."""
  from celerity_jax.train import loop

  run_dir = Path(run_dir)
  cfg = config(recipe, overrides, run_dir, stop_frac)
  if not reached(cfg, run_dir, stop_frac):
    print(
      f"  training {recipe} {' '.join(overrides)} -> {run_dir} (to t = {stop_frac:g})",
      file=sys.stderr,
    )
    loop.run(cfg)
  return load_run(run_dir)
