"""Final-loss prediction from a partial curve (docs/method.md section 7).

Align the run's smoothed loss L(t) to a predicted normalized curve l(t) over t in [start, stop]:
least squares in ratio space, min_x sum (x L_i - l_i)^2, has the closed form x = sum L l / sum L^2,
and the fitted divisor L_hat(T) = 1 / x is the predicted final loss. The in-step monitor uses the
same formula over its alignment window.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from celerity_jax.collapse import surrogate
from celerity_jax.collapse.curves import Curve

PREDICT_START = 0.2


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
  start: float = PREDICT_START,
) -> float:
  """Predicted L(T) from the curve's points with start <= t <= stop (default: all it has)."""
  stop = curve.t_hat[-1] if stop is None else stop
  keep = (curve.t_hat >= start) & (curve.t_hat <= stop + 1e-9)
  t = curve.t_hat[keep]
  if t.size == 0:
    raise ValueError(f"run {curve.name}: no logged points in t = [{start}, {stop}] to align")
  return aligned_final_loss(curve.loss_smooth[keep], reference_at(curve, t, constants, reference))


def truncate(curve: Curve, stop: float) -> Curve:
  """The curve as it was at t = stop: for testing predictions on finished runs."""
  keep = curve.t_hat <= stop + 1e-9
  return dataclasses.replace(
    curve, t_hat=curve.t_hat[keep], loss=curve.loss[keep], loss_smooth=curve.loss_smooth[keep]
  )
