"""Loss curves of finished or partial runs, their smoothing and normalization, and collapse spreads.

A run's collapse curve is its training loss smoothed by a debiased EMA whose time constant is a
fixed fraction of T (`collapse.smooth_frac`), so every size lags by the same t = step/T;
normalized, it is divided by its value at t = 1 (docs/method.md, "Collapse"; paper section 3).
The monitor computes the same EMA in-step and logs it as `loss_smooth`, so what a run logs is
exactly what a later run compares against.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import numpy as np

from celerity_jax import storage
from celerity_jax.config import ConfigError


def ema_decay(smooth_frac: float, spacing: float) -> float:
  """Per-point EMA decay on a grid with `spacing` in t units (1/T for a per-step grid)."""
  return math.exp(-spacing / smooth_frac) if smooth_frac > 0 else 0.0


def ema_step(m, w, x, decay):
  """One step of the debiased EMA that every smoothing here uses (the in-step monitor, these
  offline curves, the surrogate's fit): m = d m + (1 - d) x, w = d w + (1 - d); the smoothed
  value is m / w. Written once so that what a run logs is what a later run compares against."""
  return decay * m + (1 - decay) * x, decay * w + (1 - decay)


def ema(values: np.ndarray, decay: float) -> np.ndarray:
  """The debiased EMA (ema_step) along the last axis, in float64."""
  values = np.asarray(values, np.float64)
  out = np.empty_like(values)
  m, w = np.zeros(values.shape[:-1]), 0.0
  for i in range(values.shape[-1]):
    m, w = ema_step(m, w, values[..., i], decay)
    out[..., i] = m / w
  return out


@dataclass(frozen=True)
class Curve:
  """One run's logged curve plus the controls that shape it (docs/method.md section 5)."""

  name: str
  steps: int  # T
  warmup: int
  schedule: str
  tau: float
  tpp: float  # effective TPP (a mixture of experts': TPP * top_k / experts)
  n_params: int
  seed: int
  smooth_frac: float
  t_hat: np.ndarray  # logged steps / T
  loss: np.ndarray  # raw training loss at those steps
  loss_smooth: np.ndarray  # the monitor's EMA at those steps
  residual: np.ndarray | None = None  # the monitor's collapse_residual (NaN before alignment)
  threshold: float = 0.05  # collapse.threshold: the |residual| that counts as off the reference
  # the held-out loss (train.eval_every) and the t of its evaluations; empty without one
  eval_t_hat: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
  eval_loss: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

  @property
  def finished(self) -> bool:
    return len(self.t_hat) > 0 and self.t_hat[-1] >= 1.0 - 1e-9

  @property
  def final_loss(self) -> float:
    """L(T) as the collapse defines it: the smoothed loss at the last step."""
    if not self.finished:
      raise ValueError(f"run {self.name} is not finished (last logged t = {self.t_hat[-1]:.3f})")
    return float(self.loss_smooth[-1])

  def normalized(self) -> np.ndarray:
    return self.loss_smooth / self.final_loss


def load_run(run_dir, require_finished: bool = False) -> Curve:
  """The curve of a run directory (config.json + metrics.jsonl); errors name the file and the
  problem. Lines of metrics.jsonl that do not read (the torn last line a killed run leaves, a
  garbled one) are skipped with a warning, as a resume does; t is each row's logged `frac`, which
  continues across a resume that changed the batch."""
  run_dir = storage.location(run_dir)
  config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
  for path in (config_path, metrics_path):
    if not path.is_file():
      raise ConfigError(f"{path}: not found; a run directory holds config.json and metrics.jsonl")
  try:
    described = json.loads(config_path.read_text())
    cfg, derived = described["config"], described["derived"]
    T = int(derived["steps"])
    fields = dict(
      steps=T,
      warmup=derived["warmup_steps"],
      schedule=cfg["optim"]["schedule"],
      tau=float(derived["tau"]),
      tpp=float(derived.get("tpp_effective", derived["tpp"])),
      n_params=derived["n_params"],
      seed=cfg["train"]["seed"],
      smooth_frac=float(cfg["collapse"]["smooth_frac"]),
      threshold=float(cfg["collapse"].get("threshold", 0.05)),
    )
  except (ValueError, KeyError, TypeError) as e:
    reason = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:120]
    raise ConfigError(
      f"{config_path}: not a run's config.json ({reason}); it is written whole by the run, so "
      f"this one was damaged or is from elsewhere"
    ) from None
  rows, skipped = {}, 0
  for line in metrics_path.read_bytes().decode("utf-8", "replace").splitlines():
    if not line.strip():
      continue
    row = _step_row(line)
    if row is None:
      skipped += 1
    elif row is not False:
      rows[row["step"]] = row  # a resumed run may repeat steps: the last write wins
  if skipped:
    print(
      f"celerity_jax: warning: {metrics_path}: skipped {skipped} unreadable line(s) (a write cut "
      f"short by a crash?)",
      file=sys.stderr,
    )
  if not rows:
    raise ConfigError(f"{metrics_path}: no rows with loss_smooth (written by the collapse monitor)")
  steps = sorted(rows)
  held = [s for s in steps if np.isfinite(_number(rows[s].get("eval_loss")))]
  curve = Curve(
    name=run_dir.name,
    **fields,
    t_hat=np.array([rows[s].get("frac", s / T) for s in steps], np.float64),
    loss=np.array([rows[s]["loss"] for s in steps], np.float64),
    loss_smooth=np.array([rows[s]["loss_smooth"] for s in steps], np.float64),
    residual=np.array([_number(rows[s].get("collapse_residual")) for s in steps], np.float64),
    eval_t_hat=np.array([rows[s].get("frac", s / T) for s in held], np.float64),
    eval_loss=np.array([rows[s]["eval_loss"] for s in held], np.float64),
  )
  if require_finished and not curve.finished:
    raise ConfigError(
      f"{run_dir}: run not finished (last logged step {steps[-1]} of T={T}); a "
      f"reference curve needs the final loss"
    )
  return curve


def _number(value) -> float:
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _step_row(line: str):
  """A step's row with finite numbers where the curve needs them; False for a row that is not a
  step's (an event, a row without the monitor's fields); None for a line that does not read."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  if not isinstance(row, dict):
    return None
  if "event" in row or "loss_smooth" not in row:
    return False
  out = dict(row)
  for key in ("step", "loss", "loss_smooth", "frac"):
    value = row.get(key)
    if key == "frac" and value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
      return None
    try:
      out[key] = float(value)  # a skipped step's loss is logged as the string "nan"
    except ValueError:
      return None
  if not out["step"].is_integer():
    return None
  out["step"] = int(out["step"])
  return out


def on_grid(curves: list[Curve], grid: np.ndarray) -> np.ndarray:
  """Normalized curves interpolated onto a common t grid: [len(curves), len(grid)]."""
  return np.stack([np.interp(grid, c.t_hat, c.normalized()) for c in curves])
