"""Final-loss prediction from a partial curve (docs/method.md section 7).

Align the run's smoothed loss L(t) to a predicted normalized curve l(t) over t in [start, stop]:
least squares in ratio space, min_x sum (x L_i - l_i)^2, has the closed form x = sum L l / sum L^2,
and the fitted divisor L_hat(T) = 1 / x is the predicted final loss. The in-step monitor uses the
same formula over its alignment window.

The window starts at t = 0.2, past warmup and the start-up transient, for stops from 0.3 on; an
earlier stop (the paper's sweeps stop at 10-30%) aligns over the last 0.1 of t before it, or its
second half below 0.2: [0.1, 0.2] for a stop at 0.2, [0.05, 0.1] at 0.1 (`window_start`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from celerity_jax.collapse import surrogate
from celerity_jax.collapse.curves import Curve
from celerity_jax.config import ConfigError

PREDICT_START = 0.2


def window_start(stop: float) -> float:
  """Where the alignment window of a prediction from the curve up to `stop` begins."""
  return min(PREDICT_START, max(stop - 0.1, stop / 2))


def aligned_final_loss(loss: np.ndarray, ref: np.ndarray) -> float:
  """L_hat(T) = sum L^2 / sum L l: the divisor that best maps `loss` onto `ref`."""
  loss, ref = np.asarray(loss, np.float64), np.asarray(ref, np.float64)
  if loss.size == 0:
    raise ValueError("no points to align: the run has not reached the alignment window")
  return float((loss * loss).sum() / (loss * ref).sum())


def reference_at(
  curve: Curve,
  t_hat: np.ndarray,
  constants: surrogate.Constants | None = None,
  reference: Curve | None = None,
) -> np.ndarray:
  """The predicted normalized curve for `curve` at t_hat: another run's, or the surrogate's."""
  if reference is not None:
    return np.interp(t_hat, reference.t_hat, reference.normalized())
  return surrogate.predict(curve, constants or surrogate.load_constants(), t_hat)


def predict_final_loss(
  curve: Curve,
  stop: float | None = None,
  constants: surrogate.Constants | None = None,
  reference: Curve | None = None,
  start: float | None = None,
) -> float:
  """Predicted L(T) from the curve's points with start <= t <= stop (default: all it has; start
  default: window_start(stop))."""
  stop = float(curve.t_hat[-1]) if stop is None else stop
  start = window_start(stop) if start is None else start
  keep = (curve.t_hat >= start - 1e-9) & (curve.t_hat <= stop + 1e-9)
  t = curve.t_hat[keep]
  if t.size == 0:
    logged = f"{curve.t_hat.size} up to t = {curve.t_hat[-1]:.3g}" if curve.t_hat.size else "none"
    raise ConfigError(
      f"run {curve.name}: no logged points in t = [{start:.3g}, {stop:.3g}] to align (it logged "
      f"{logged}); predict from a later point, or log more often (run.log_every)"
    )
  return aligned_final_loss(curve.loss_smooth[keep], reference_at(curve, t, constants, reference))


def truncate(curve: Curve, stop: float) -> Curve:
  """The curve as it was at t = stop: for testing predictions on finished runs."""
  keep, held = curve.t_hat <= stop + 1e-9, curve.eval_t_hat <= stop + 1e-9
  return dataclasses.replace(
    curve,
    t_hat=curve.t_hat[keep],
    loss=curve.loss[keep],
    loss_smooth=curve.loss_smooth[keep],
    residual=None if curve.residual is None else curve.residual[keep],
    eval_t_hat=curve.eval_t_hat[held],
    eval_loss=curve.eval_loss[held],
  )
