"""Whether a family's loss curves collapse, judged by a named definition (docs/collapse_long.md).

A family is a dict {size: [curves of that size, one per seed, seed 0 first]}. A definition says
how a curve is normalized, which curves the spread Delta(x) is taken over, what the noise floor
sigma(x) is, and the rule that compares them:

  qiu        Qiu et al. (arXiv 2507.02119): l = (L - L0) / (L(1) - L0), L0 from L = L0 + a C^-b
             fitted on the sizes' final losses (seed means, C = 6 N D); Delta = std / mean of l
             over every run (sizes and seeds); sigma = std / mean over seeds of the reducible
             loss divided by its seed-mean final value (the un-normalized curve), RMS over the
             sizes with seeds; supercollapse when Delta < sigma at every x > 1 - delta, delta 0.5
  celerity   the same rule on Celerity's normalization l = L / L(1) (arXiv 2509.25087, section 3:
             the paper plots collapse and states no Delta/sigma rule)
  ours       l = L / L(1); Delta = std over sizes of seed 0's curves; sigma = RMS over sizes of
             the seed std of l; collapse when Delta < sigma on >= 90% of x in [0.2, 1]

Each can be applied to the held-out curve (`eval`, Qiu et al.'s) or to the training loss smoothed
as the monitor smooths it (`train`, Celerity's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from celerity_jax.collapse.curves import Curve

GRID = np.linspace(0.2, 1.0, 161)  # x = t / T (compute fraction at a fixed size)
TAIL = 0.5  # [0.5, 1]: the tail every summary reports, Qiu et al.'s largest delta


@dataclass(frozen=True)
class Definition:
  name: str
  irreducible: bool  # normalize L - L0 (L0 fitted on the sizes' final losses) instead of L
  delta_over: str  # "runs": every curve of every size; "sizes": each size's first curve
  relative: bool  # Delta and sigma as std / mean (Qiu et al.) or as std
  sigma_of: str  # "raw": the un-normalized curve over its seed-mean final; "normalized": l
  rule: str  # "tail": Delta < sigma at every x >= 1 - delta; "share": on >= share of the grid
  delta: float = TAIL
  share: float = 0.9


QIU = Definition("qiu", True, "runs", True, "raw", "tail")
CELERITY = Definition("celerity", False, "runs", True, "raw", "tail")
OURS = Definition("ours", False, "sizes", False, "normalized", "share")
DEFINITIONS = {d.name: d for d in (QIU, CELERITY, OURS)}
PUBLISHED_CURVE = {"qiu": "eval", "celerity": "train", "ours": "train"}


def series(c: Curve, curve: str) -> tuple[np.ndarray, np.ndarray]:
  """(t, L) of the run's held-out (`eval`) or smoothed training (`train`) curve."""
  if curve == "train":
    return c.t_hat, c.loss_smooth
  if curve != "eval":
    raise ValueError(f"curve must be 'train' or 'eval', not {curve!r}")
  if len(c.eval_t_hat) < 2 or c.eval_t_hat[-1] < 1.0 - 1e-9:
    raise ValueError(f"run {c.name} has no held-out curve to t = 1 (set train.eval_every)")
  return c.eval_t_hat, c.eval_loss


def on_grid(c: Curve, curve: str, grid: np.ndarray = GRID) -> np.ndarray:
  t, loss = series(c, curve)
  return np.interp(grid, t, loss)


def compute(c: Curve) -> float:
  """Training FLOPs as Qiu et al. count them: 6 N D with D = TPP x N."""
  return 6.0 * c.n_params * c.tpp * c.n_params


def fit_irreducible(compute_: np.ndarray, final: np.ndarray) -> dict:
  """L = L0 + a C^-b on (compute, final loss) points, least squares in log L (as Qiu et al. fit
  in log space): for each L0 on a fine grid below min L, a and b follow by linear regression of
  log(L - L0) on log C; the L0 with the smallest error wins."""
  c, final = np.log(np.asarray(compute_, np.float64)), np.asarray(final, np.float64)
  if len(final) < 3:
    raise ValueError(f"fitting L0 needs at least 3 sizes, got {len(final)}")
  best = None
  for l0 in np.linspace(0.0, 0.999 * final.min(), 4000):
    slope, intercept = np.polyfit(c, np.log(final - l0), 1)
    err = float(np.sum((np.log(l0 + np.exp(intercept + slope * c)) - np.log(final)) ** 2))
    if best is None or err < best["sse"]:
      best = {"L0": float(l0), "a": float(np.exp(intercept)), "b": float(-slope), "sse": err}
  return best


def irreducible(family: dict[str, list[Curve]], curve: str) -> dict:
  """The fit of L0 on the family's final losses (each size's seed mean) on `curve`."""
  sizes = list(family.values())
  finals = np.array([np.mean([on_grid(c, curve, np.array([1.0]))[0] for c in g]) for g in sizes])
  return fit_irreducible(np.array([compute(g[0]) for g in sizes]), finals)


def _spread(values: np.ndarray, relative: bool, ddof: int) -> np.ndarray:
  std = values.std(axis=0, ddof=ddof)
  return std / values.mean(axis=0) if relative else std


def _level(d: Definition, curve: str, family: dict[str, list[Curve]], l0: float | None) -> float:
  if not d.irreducible:
    return 0.0
  return irreducible(family, curve)["L0"] if l0 is None else float(l0)


def delta(
  family: dict[str, list[Curve]], d: Definition, curve: str, l0: float = 0.0, grid=GRID
) -> np.ndarray:
  """Delta(x): the spread of the normalized curves over the runs the definition takes (every run,
  or each size's first), with L0 = `l0` subtracted when the definition does."""
  l0 = l0 if d.irreducible else 0.0
  runs = [c for g in family.values() for c in (g[:1] if d.delta_over == "sizes" else g)]
  raw = np.stack([on_grid(c, curve, grid) for c in runs]) - l0
  return _spread(raw / raw[:, -1:], d.relative, 0)  # the grid ends at x = 1


def sigma(
  family: dict[str, list[Curve]], d: Definition, curve: str, l0: float = 0.0, grid=GRID
) -> np.ndarray | None:
  """sigma(x): the seed spread (RMS over the sizes with two or more seeds); None without one."""
  l0 = l0 if d.irreducible else 0.0
  variances = []
  for g in family.values():
    if len(g) < 2:
      continue
    r = np.stack([on_grid(c, curve, grid) for c in g]) - l0
    scaled = r / r[:, -1].mean() if d.sigma_of == "raw" else r / r[:, -1:]
    variances.append(_spread(scaled, d.relative, 1) ** 2)
  return np.sqrt(np.mean(variances, axis=0)) if variances else None


def judge(
  family: dict[str, list[Curve]],
  definition: Definition,
  curve: str,
  l0: float | None = None,
  noise: dict[str, list[Curve]] | None = None,
  grid: np.ndarray = GRID,
) -> dict:
  """Delta(x), sigma(x) and the verdict. `l0`: the irreducible loss (default: fitted on this
  family when the definition subtracts one, else 0); `noise`: the family whose seeds give sigma
  (default this one: a mismatched family is judged against the matched family's noise floor)."""
  d = definition
  l0 = _level(d, curve, family, l0)
  spread = delta(family, d, curve, l0, grid)
  floor = sigma(family if noise is None else noise, d, curve, l0, grid)
  if floor is None:
    raise ValueError("sigma needs at least one size with two or more seeds")
  below = (spread < floor) | ((spread == 0) & (floor == 0))  # at x = 1 both are 0 for some
  tail = grid >= 1 - d.delta - 1e-9
  late = grid >= TAIL - 1e-9
  failed = np.flatnonzero(~below)
  delta_star = 1.0 - grid[0] if failed.size == 0 else 1.0 - grid[min(failed[-1] + 1, len(grid) - 1)]
  holds = bool(below[tail].all()) if d.rule == "tail" else bool(below.mean() >= d.share)
  ratio = late & (floor > 0)
  return {
    "definition": d.name,
    "curve": curve,
    "L0": l0,
    "holds": holds,
    "delta_star": float(delta_star),
    "share_below": float(below.mean()),
    "share_below_tail": float(below[late].mean()),
    "max_delta_tail": float(spread[late].max()),
    "max_sigma_tail": float(floor[late].max()),
    "max_ratio_tail": float((spread[ratio] / floor[ratio]).max()),
    "grid": grid.tolist(),
    "delta": spread.tolist(),
    "sigma": floor.tolist(),
  }
