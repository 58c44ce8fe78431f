"""Weights & Biases as a mirror of metrics.jsonl (`run.wandb=PROJECT`): process 0 sends every row
it writes there, metrics and events alike, at the row's step, with the run's resolved config.

A resumed run continues the same wandb run: its id is kept in run.dir/wandb.json. wandb's history
only moves forward, while a resume repeats the steps after its checkpoint; wandb ignores a step it
has passed, and the repeated rows equal the ones it has (a resume is bit-identical), so its
history matches metrics.jsonl. A restart's own event row, whose step wandb has passed, goes in at
the first step it accepts. WANDB_MODE (offline, disabled), WANDB_API_KEY and WANDB_DIR are
wandb's own settings; wandb is an optional dependency (`pip install wandb`).
"""

from __future__ import annotations

import importlib.util
import json
import uuid

from celerity_jax import storage
from celerity_jax.config import ConfigError

STATE = "wandb.json"


def check_installed(project: str):
  """Refuses run.wandb before anything runs when wandb is not installed."""
  if project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(
      f"run.wandb={project}: the wandb package is not installed (pip install wandb, or the "
      f"project's wandb extra: pip install -e '.[wandb]')"
    )


def flat(row: dict, prefix: str = "") -> dict:
  """The row's scalars, nested keys joined by '/' (wandb's own grouping); lists are left out."""
  out = {}
  for key, value in row.items():
    if isinstance(value, dict):
      out |= flat(value, f"{prefix}{key}/")
    elif isinstance(value, (int, float, str, bool)):
      out[f"{prefix}{key}"] = value
  return out


class WandbMirror:
  def __init__(self, project: str, run_dir, described: dict):
    import wandb

    entity, _, name = project.rpartition("/")
    state_path = run_dir / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    run_id = state.get("id") or uuid.uuid4().hex[:12]
    if not state_path.exists():
      storage.write_atomic(state_path, json.dumps({"id": run_id, "project": project}) + "\n")
    local = None if storage.is_remote(run_dir) else str(run_dir)
    self.run = wandb.init(
      project=name,
      entity=entity or None,
      id=run_id,
      name=run_dir.name,
      resume="allow",
      dir=local,
      config={"config": described["config"], "derived": described["derived"]},
    )
    self.floor = int(self.run.step or 0)  # the first step wandb accepts

  def row(self, row: dict):
    step = int(row.get("step", 0))
    if step < self.floor:
      if row.get("event") != "restart":
        return  # a repeated step: wandb holds its row already
      step = self.floor
    values = flat({k: v for k, v in row.items() if k != "step"})
    if "event" in values:  # events by name, apart from the step metrics
      values = {f"event/{values['event']}/{k}": v for k, v in values.items() if k != "event"}
      values = values or {f"event/{row['event']}": 1}
    self.run.log(values, step=step)
    self.floor = step

  def close(self):
    self.run.finish()
