"""Collapse plots: raw curves, normalized curves against t = step/T, residuals against a reference,
the spread Delta(t) across sizes and the seed noise sigma(t).

  python -m celerity_jax.tools.plot_collapse RUN_DIR [RUN_DIR ...]
      [--reference surrogate|none|RUN_DIR] [--out collapse.png]

Runs with the same parameter count are seeds of one size: Delta(t) uses the lowest seed of each
size, sigma(t) every size with two or more seeds. Unfinished runs are skipped (they have no L(T)).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from celerity_jax.collapse import curves as curves_lib  # noqa: E402
from celerity_jax.collapse import predict
from celerity_jax.collapse.curves import Curve  # noqa: E402
from celerity_jax.config import ConfigError
from celerity_jax.main import ArgumentParser, run_cli
from celerity_jax.scaling import fmt_count  # noqa: E402

GRID = np.linspace(0.2, 1.0, 81)


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


def plot(families: dict[str, list[Curve]], out, reference=None, title: str = "") -> Path:
  """One row of panels per family (name -> finished curves)."""
  rows = len(families)
  fig, axes = plt.subplots(rows, 4, figsize=(19, 4.2 * rows), squeeze=False)
  for row, (name, curves) in zip(axes, families.items(), strict=True):
    groups = by_size(curves)
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(len(groups), 1)))
    for color, (n, members) in zip(colors, groups.items(), strict=True):
      for c in members:
        style = dict(color=color, lw=1.2, ls="-" if c.seed == members[0].seed else "--")
        label = f"N={fmt_count(n)} seed {c.seed} tau {c.tau:.3g}"
        row[0].plot(c.t_hat * c.steps, c.loss, alpha=0.35, color=color, lw=0.8)
        row[0].plot(c.t_hat * c.steps, c.loss_smooth, label=label, **style)
        row[1].plot(c.t_hat, c.normalized(), label=label, **style)
        ref = reference_curve(c, reference)
        if ref is not None:
          row[2].plot(c.t_hat, c.normalized() - ref, **style)
    row[0].set(
      xlabel="step",
      ylabel="training loss (raw, smoothed)",
      yscale="log",
      title=f"{name}: raw curves",
    )
    row[1].set(
      xlabel="t = step / T", ylabel="L(t) / L(T)", ylim=(0.95, 1.8), title=f"{name}: normalized"
    )
    row[1].legend(fontsize=7)
    ref_name = (reference.name if isinstance(reference, Curve) else reference) or "none"
    row[2].axhline(0, color="k", lw=0.6)
    row[2].set(
      xlabel="t",
      ylabel="residual",
      xlim=(0, 1),
      title=f"{name}: residual vs reference ({ref_name})",
    )
    firsts = [m[0] for m in groups.values()]
    if len(firsts) > 1:
      row[3].plot(GRID, curves_lib.spread(firsts, GRID), label="Delta(t) across sizes", color="C0")
    seeded = [m for m in groups.values() if len(m) > 1]
    if seeded:
      row[3].plot(
        GRID, curves_lib.seed_noise(seeded, GRID), label="sigma(t) across seeds", color="C3"
      )
    row[3].set(xlabel="t", ylabel="std of L(t)/L(T)", yscale="log", title=f"{name}: spread")
    row[3].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
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
  args = parser.parse_args(argv)
  finished = [c for c in (curves_lib.load_run(r) for r in args.runs) if c.finished]
  if not finished:
    raise ConfigError(f"no finished runs among {', '.join(args.runs)}")
  reference = args.reference
  if reference not in ("surrogate", "none"):
    reference = curves_lib.load_run(reference, require_finished=True)
  print(plot({"runs": finished}, args.out, reference))


if __name__ == "__main__":
  sys.exit(run_cli(main))
