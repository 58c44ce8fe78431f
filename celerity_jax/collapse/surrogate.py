"""The paper's parametric loss-curve surrogate (docs/method.md section 7) and its fit.

    g(t) = ((1 + e1) / (t + e1))^m + b (eta(t) + e2)^q,   l(t) = g(t) / g(1),
    b = b_c tau^b_e,  q = q_c TPP^q_e,  e1 = 0.001, e2 = 0.1, m = 0.05 fixed,

eta(t) the LR schedule scaled to peak 1. Predictions pass through the same EMA the monitor applies
to
the loss (time constant smooth_frac * T), so they compare like with like. The four constants are fit
by alternating 2-D grid searches (b_c, b_e with q fixed; q_c, q_e with b fixed), then zoomed 2-D
grids over every pair of constants (b and q trade off along a ridge),
minimizing the mean over curves of the mean |l_hat - l| over t in [0.2, 1].
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from celerity_jax.collapse.curves import Curve, ema_decay, ema_step
from celerity_jax.config import ConfigError

EPS1, EPS2, M_EXP = 1e-3, 0.1, 0.05
MAX_GRID = 4096  # model points per curve: every step up to this, else a uniform grid
FIT_START = 0.2
PACKAGED = Path(__file__).with_name("surrogate_constants.json")


class Constants(NamedTuple):
  b_c: float
  b_e: float
  q_c: float
  q_e: float


START = Constants(0.3, 0.0, 1.0, 0.0)  # where the alternating search begins


def load_constants(path: str = "") -> Constants:
  path = Path(path) if path else PACKAGED
  try:
    data = json.loads(path.read_text())
    return Constants(*(float(data["constants"][k]) for k in Constants._fields))
  except FileNotFoundError:
    raise ConfigError(f"collapse.surrogate={str(path)!r}: file not found") from None
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(
      f"collapse.surrogate={str(path)!r}: expected JSON with constants "
      f"{', '.join(Constants._fields)} ({e})"
    ) from None


def save_constants(path, constants: Constants, info: dict):
  data = {"constants": constants._asdict(), **info}
  Path(path).write_text(json.dumps(data, indent=2) + "\n")


def g(t_hat, lr, b, q):
  """The unnormalized surrogate; broadcasts over any leading axes."""
  return ((1 + EPS1) / (t_hat + EPS1)) ** M_EXP + b * (lr + EPS2) ** q


def _ema_last_axis(x, decay):
  """The debiased EMA (curves.ema_step) along the last axis, traced; `decay` broadcasts against
  x[..., 0]."""

  def body(carry, xi):
    m, w = ema_step(*carry, xi, decay)
    return (m, w), m / w

  init = (jnp.zeros_like(x[..., 0]), jnp.zeros_like(x[..., 0] * decay))
  _, out = jax.lax.scan(body, init, jnp.moveaxis(x, -1, 0))
  return jnp.moveaxis(out, 0, -1)


def model_grid(steps: int, warmup: int, schedule: str) -> tuple[np.ndarray, np.ndarray]:
  """(t, eta) where the model is evaluated: every step for T <= MAX_GRID, else a uniform grid."""
  from celerity_jax.optim import schedule as make_schedule

  t = np.arange(1, steps + 1) / steps if steps <= MAX_GRID else np.linspace(0, 1, MAX_GRID + 1)[1:]
  lr = np.asarray(make_schedule(schedule, warmup, steps)(np.round(t * steps) - 1.0), np.float64)
  return t, lr


def normalized_curve(
  steps, warmup, schedule, tau, tpp, constants: Constants, smooth_frac: float
) -> tuple[np.ndarray, np.ndarray]:
  """(t, l_hat) on the model grid for one run's controls, smoothed as the monitor smooths."""
  t, lr = model_grid(steps, warmup, schedule)
  b = constants.b_c * tau**constants.b_e
  q = constants.q_c * tpp**constants.q_e
  decay = ema_decay(smooth_frac, 1.0 / len(t))
  smooth = np.asarray(_ema_last_axis(jnp.asarray(g(t, lr, b, q), jnp.float32), decay))
  return t, smooth / smooth[-1]


def predict(curve: Curve, constants: Constants, t_hat=None) -> np.ndarray:
  """l_hat for `curve`'s controls at t_hat (default: its logged points)."""
  t, ell = normalized_curve(
    curve.steps, curve.warmup, curve.schedule, curve.tau, curve.tpp, constants, curve.smooth_frac
  )
  return np.interp(curve.t_hat if t_hat is None else t_hat, t, ell)


def mae(curve: Curve, constants: Constants, start: float = FIT_START) -> float:
  """Mean |l_hat - l| over the curve's logged points with t >= start."""
  keep = curve.t_hat >= start
  return float(np.abs(predict(curve, constants)[keep] - curve.normalized()[keep]).mean())


class _Batch(NamedTuple):
  """Curves padded to common shapes for vectorized evaluation of many constants at once."""

  t: jax.Array
  lr: jax.Array
  decay: jax.Array
  tau: jax.Array
  tpp: jax.Array
  last: jax.Array
  lo: jax.Array
  hi: jax.Array
  frac: jax.Array
  target: jax.Array
  mask: jax.Array


def _batch(curves: list[Curve]) -> _Batch:
  grids = [model_grid(c.steps, c.warmup, c.schedule) for c in curves]
  width = max(len(t) for t, _ in grids)
  keep = [c.t_hat >= FIT_START for c in curves]
  rows = max(int(k.sum()) for k in keep)
  t = np.ones((len(curves), width))
  lr = np.zeros_like(t)
  lo = np.zeros((len(curves), rows), np.int32)
  hi = np.zeros_like(lo)
  frac = np.zeros((len(curves), rows))
  target = np.ones_like(frac)
  mask = np.zeros_like(frac)
  for i, (c, (ti, li), k) in enumerate(zip(curves, grids, keep, strict=True)):
    # padding sits after the last real point; `last` picks the real normalizer
    t[i, : len(ti)], lr[i, : len(ti)] = ti, li
    x = c.t_hat[k]
    j = np.clip(np.searchsorted(ti, x), 1, len(ti) - 1)
    lo[i, : len(x)], hi[i, : len(x)] = j - 1, j
    frac[i, : len(x)] = np.clip((x - ti[j - 1]) / (ti[j] - ti[j - 1]), 0, 1)
    target[i, : len(x)], mask[i, : len(x)] = c.normalized()[k], 1.0
  decay = np.array(
    [ema_decay(c.smooth_frac, 1.0 / len(ti)) for c, (ti, _) in zip(curves, grids, strict=True)]
  )
  last = np.array([len(ti) - 1 for ti, _ in grids], np.int32)
  arrays = (
    t,
    lr,
    decay,
    [c.tau for c in curves],
    [c.tpp for c in curves],
    last,
    lo,
    hi,
    frac,
    target,
    mask,
  )
  return _Batch(
    *(jnp.asarray(a, jnp.int32 if np.asarray(a).dtype == np.int32 else jnp.float32) for a in arrays)
  )


@jax.jit
def _objective(batch: _Batch, params):
  """Mean over curves of the MAE over t >= 0.2, for each row of params [G, 4] -> [G]."""
  b = params[:, 0, None] * batch.tau ** params[:, 1, None]  # [G, C]
  q = params[:, 2, None] * batch.tpp ** params[:, 3, None]
  smooth = _ema_last_axis(g(batch.t, batch.lr, b[..., None], q[..., None]), batch.decay)

  def take(idx):
    return jnp.take_along_axis(smooth, jnp.broadcast_to(idx, smooth.shape[:2] + idx.shape[-1:]), -1)

  final = take(batch.last[:, None])
  pred = (take(batch.lo) * (1 - batch.frac) + take(batch.hi) * batch.frac) / final
  err = (jnp.abs(pred - batch.target) * batch.mask).sum(-1) / batch.mask.sum(-1)
  return jnp.nan_to_num(err.mean(-1), nan=jnp.inf)


def _evaluate(batch: _Batch, params: np.ndarray, chunk: int = 256) -> np.ndarray:
  out = [
    np.asarray(_objective(batch, jnp.asarray(params[i : i + chunk], jnp.float32)))
    for i in range(0, len(params), chunk)
  ]
  return np.concatenate(out)


def _grid_step(batch, best: np.ndarray, pair: tuple[int, int], axes) -> tuple[np.ndarray, float]:
  cand = np.repeat(best[None], len(axes[0]) * len(axes[1]), axis=0)
  cand[:, pair] = np.array(list(itertools.product(axes[0], axes[1])))
  values = _evaluate(batch, cand)
  i = int(np.argmin(values))
  return cand[i], float(values[i])


def fit(
  curves: list[Curve], rounds: int = 4, refine: int = 8, points: int = 41, start: Constants = START
) -> tuple[Constants, float]:
  """Alternating grid search (then `refine` zoomed rounds); returns (constants, objective)."""
  if not curves:
    raise ValueError("fit needs at least one finished curve")
  batch = _batch(curves)
  best = np.array(start, np.float64)
  # coefficients on log grids, exponents on linear grids
  log_c = lambda lo, hi: np.geomspace(lo, hi, points)  # noqa: E731
  lin = lambda lo, hi: np.linspace(lo, hi, points)  # noqa: E731
  b_axes, q_axes = (log_c(1e-3, 1e2), lin(-2.0, 2.0)), (log_c(0.05, 20.0), lin(-1.5, 1.5))
  value = np.inf
  for _ in range(rounds):
    best, value = _grid_step(batch, best, (0, 1), b_axes)
    best, value = _grid_step(batch, best, (2, 3), q_axes)
  span = np.array([np.log(1e5), 4.0, np.log(400.0), 3.0]) / 8  # +-1/8 of the first grids
  for _ in range(refine):  # every pair, so ridges between b and q can be followed
    for pair in itertools.combinations(range(4), 2):
      axes = tuple(
        np.exp(np.linspace(np.log(best[k]) - span[k], np.log(best[k]) + span[k], 21))
        if k in (0, 2)
        else np.linspace(best[k] - span[k], best[k] + span[k], 21)
        for k in pair
      )
      best, value = _grid_step(batch, best, pair, axes)
    span = span / 2
  return Constants(*map(float, best)), value
