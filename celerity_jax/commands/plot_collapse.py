"""Collapse plots: raw curves, normalized curves against t = step/T, residuals against a reference,
the spread Delta(t) across sizes and the seed noise sigma(t).

  python -m celerity_jax.commands.plot_collapse RUN_DIR [RUN_DIR ...]
      [--reference surrogate|none|RUN_DIR] [--out collapse.png]
      [--definition ours|celerity|qiu] [--curve train|eval]

Runs with the same parameter count are seeds of one size. The spread panel draws Delta(t) and
sigma(t) under a collapse definition (celerity_jax/collapse/definitions.py: `ours` takes Delta
over each size's lowest seed; `celerity` and `qiu`, Qiu et al.'s rule, over every run, `qiu` on
the reducible loss with L0 fitted on 3+ sizes) on the smoothed training (`train`) or held-out
(`eval`) curve, and the verdict is printed when there are two sizes and a size with two seeds
(one run has no spread panel). The reference
curve is drawn on the normalized panel; the residual panel shows, from t = 0.2 on, the monitor's
logged residual (what alerts) and L/L(T) minus the reference, with the run's alert threshold.
Unfinished runs are skipped (they have no L(T)).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.collapse import curves as curves_lib  # noqa: E402
from celerity_jax.collapse import definitions, predict
from celerity_jax.collapse.curves import Curve  # noqa: E402
from celerity_jax.config import ConfigError
from celerity_jax.scaling import fmt_count  # noqa: E402


def by_size(curves: list[Curve]) -> dict[int, list[Curve]]:
  groups = defaultdict(list)
  for c in sorted(curves, key=lambda c: (c.n_params, c.seed)):
    groups[c.n_params].append(c)
  return dict(groups)


def reference_curve(curve: Curve, reference) -> np.ndarray | None:
  """The reference's normalized curve at `curve`'s points: a Curve, "surrogate" or None."""
  if reference is None or reference == "none":
    return None
  return predict.reference_at(
    curve, curve.t_hat, reference=reference if isinstance(reference, Curve) else None
  )


RESIDUAL_FROM = 0.2  # the residual panel starts where alignment and alerts matter


def panels(families: dict[str, list[Curve]], reference) -> list[str]:
  """The panels every row shows: raw and normalized curves, the residual against the reference
  (when there is one) and the spread (when there are two sizes or two seeds to spread)."""
  names = ["raw", "normalized"]
  if reference not in (None, "none"):
    names.append("residual")
  if any(len(curves) > 1 for curves in families.values()):
    names.append("spread")
  return names


def spread_of(curves: list[Curve], d: definitions.Definition, curve: str):
  """(Delta or None, sigma or None, L0) of the runs grouped by size under definition `d`."""
  family = {str(n): members for n, members in by_size(curves).items()}
  l0 = 0.0
  if d.irreducible:
    try:
      l0 = definitions.irreducible(family, curve)["L0"]
    except ValueError as e:
      raise ConfigError(f"--definition {d.name}: {e} (these runs have {len(family)})") from None
  try:
    spread = definitions.delta(family, d, curve, l0) if len(family) > 1 else None
    floor = definitions.sigma(family, d, curve, l0)
  except ValueError as e:
    raise ConfigError(f"--curve {curve}: {e}") from None
  return spread, floor, l0


def figure(
  families: dict[str, list[Curve]],
  reference=None,
  title: str = "",
  definition: definitions.Definition = definitions.OURS,
  curve: str = "train",
):
  """One row of panels per family (name -> finished curves); returns the matplotlib figure."""
  names = panels(families, reference)
  fig, axes = plt.subplots(
    len(families), len(names), figsize=(4.8 * len(names), 4.2 * len(families)), squeeze=False
  )
  ref_name = (reference.name if isinstance(reference, Curve) else reference) or "none"
  for row, (name, curves) in zip(axes, families.items(), strict=True):
    ax = dict(zip(names, row, strict=True))
    groups = by_size(curves)
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(len(groups), 1)))
    thresholds = set()
    for color, (n, members) in zip(colors, groups.items(), strict=True):
      for c in members:
        style = dict(color=color, lw=1.2, ls="-" if c.seed == members[0].seed else "--")
        label = f"N={fmt_count(n)} seed {c.seed} tau {c.tau:.3g}"
        ax["raw"].plot(c.t_hat * c.steps, c.loss, alpha=0.35, color=color, lw=0.8)
        ax["raw"].plot(c.t_hat * c.steps, c.loss_smooth, label=label, **style)
        ax["normalized"].plot(c.t_hat, c.normalized(), label=label, **style)
        ref = reference_curve(c, reference)
        if ref is None:
          continue
        first = c is curves[0]
        ax["normalized"].plot(
          c.t_hat,
          ref,
          color="k",
          lw=0.9,
          ls=":",
          label=f"reference ({ref_name})" if first else None,
        )
        late = c.t_hat >= RESIDUAL_FROM
        ax["residual"].plot(
          c.t_hat[late],
          (c.normalized() - ref)[late],
          color=color,
          lw=0.8,
          ls=":",
          label="L/L(T) - reference" if first else None,
        )
        if c.residual is not None and np.isfinite(c.residual).any():
          ax["residual"].plot(
            c.t_hat[late],
            c.residual[late],
            color=color,
            lw=1.3,
            label="the monitor's residual (alerts)" if first else None,
          )
        thresholds.add(c.threshold)
    ax["raw"].set(xlabel="step", ylabel="training loss (raw, smoothed)", yscale="log")
    ax["raw"].set_title(f"{name}: raw curves")
    ax["normalized"].set(xlabel="t = step / T", ylabel="L(t) / L(T)", ylim=(0.95, 1.8))
    ax["normalized"].set_title(f"{name}: normalized")
    ax["normalized"].legend(fontsize=7)
    if "residual" in ax:
      for threshold in sorted(thresholds):
        for sign in (1, -1):
          ax["residual"].axhline(
            sign * threshold,
            color="C3",
            lw=0.8,
            ls="--",
            label=f"alert threshold ±{threshold:g}" if sign > 0 else None,
          )
      ax["residual"].axhline(0, color="k", lw=0.6)
      ax["residual"].set(xlabel="t", ylabel="residual", xlim=(RESIDUAL_FROM, 1))
      ax["residual"].set_title(f"{name}: residual vs reference ({ref_name})")
      ax["residual"].legend(fontsize=7)
    if "spread" in ax:
      spread, floor, _ = spread_of(curves, definition, curve)
      for values, label, color in ((spread, "Delta(t)", "C0"), (floor, "sigma(t), seeds", "C3")):
        if values is not None:
          ax["spread"].plot(definitions.GRID, values, label=label, color=color)
      ax["spread"].set(xlabel="t", ylabel=f"spread ({definition.name}, {curve})", yscale="log")
      ax["spread"].set_title(f"{name}: spread")
      ax["spread"].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot(
  families: dict[str, list[Curve]],
  out,
  reference=None,
  title: str = "",
  definition: definitions.Definition = definitions.OURS,
  curve: str = "train",
) -> Path:
  """figure(...) written to `out` (a PNG)."""
  fig = figure(families, reference, title, definition, curve)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+")
  parser.add_argument("--reference", default="surrogate")
  parser.add_argument("--out", default="collapse.png")
  parser.add_argument("--definition", choices=sorted(definitions.DEFINITIONS), default="ours")
  parser.add_argument("--curve", choices=("train", "eval"), default="train")
  args = parser.parse_args(argv)
  finished = [c for c in (curves_lib.load_run(r) for r in args.runs) if c.finished]
  if not finished:
    raise ConfigError(f"no finished runs among {', '.join(args.runs)}")
  reference = args.reference
  if reference not in ("surrogate", "none"):
    reference = curves_lib.load_run(reference, require_finished=True)
  name = finished[0].name if len(finished) == 1 else "runs"
  d = definitions.DEFINITIONS[args.definition]
  print(plot({name: finished}, args.out, reference, definition=d, curve=args.curve))
  spread, floor, l0 = spread_of(finished, d, args.curve)
  if spread is not None and floor is not None:
    family = {str(n): m for n, m in by_size(finished).items()}
    j = definitions.judge(family, d, args.curve, l0)
    print(
      f"collapse ({d.name}, {args.curve} curve): {'holds' if j['holds'] else 'fails'}; Delta < "
      f"sigma on {j['share_below']:.0%} of t in [0.2, 1] and {j['share_below_tail']:.0%} of "
      f"[0.5, 1]; delta* {j['delta_star']:.2f}"
    )


if __name__ == "__main__":
  sys.exit(run_cli(main))
