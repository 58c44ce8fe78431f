"""Coordinate check: do activations and their updates stay O(1) as width and depth grow?

  python -m tools.coord_check [--steps 4] [--widths 1,2,4,8] [--depths 1,2,4]
      [--out coord.png]

Trains a base model (d_model 32, 2 layers, 16-dim heads, d_ff 8 d_model) scaled in width by each
multiplier (d_base 32, so m_N = multiplier) and in depth (l_base 2), under CompleteP and under
standard parameterization, with the same base HPs (eta_base, sigma, alpha), a constant LR and no
weight decay, on the synthetic stream. It records, per layer, the residual stream's RMS at
initialization and after --steps steps, and the RMS of its change (the update's effect). Under
CompleteP the curves stay flat across width and depth; under SP they drift. Writes a PNG and
prints JSON with the per-width spread (max / min of the last layer's change RMS).
"""

from __future__ import annotations

import json
import sys

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError


def measure(kind: str, width: int, depth: int, steps: int, lr_base: float = 1.62e-2) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from celerity_jax import recipes
  from celerity_jax.config import apply_overrides
  from celerity_jax.config_checks import validate
  from celerity_jax.data.synthetic import SyntheticTokens
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  d = 32 * width
  cfg = validate(
    apply_overrides(
      recipes.load("celerity_nano_1"),
      [
        f"param.kind={kind}",
        "param.d_base=32",
        "param.l_base=2",
        f"model.d_model={d}",
        f"model.n_heads={d // 16}",
        "model.d_head=16",
        f"model.d_ff={8 * d}",
        f"model.n_layers={2 * depth}",
        "model.vocab_size=256",
        "model.seq_len=64",
        "train.batch_size=16",
        "optim.schedule=constant",
        "scaling.warmup_frac=0",
        "optim.weight_decay=0",
        f"optim.lr_base={lr_base}",
        "data.corpus=synthetic",
      ],
    )
  )
  training = prepare_training(cfg, resolve(cfg, 1), jax.devices()[:1])
  setup, step = training.setup, training.train_step
  state = setup.init()
  data = SyntheticTokens(256, 64, 16, seed=0)
  probe = jnp.asarray(data.batch(10_000)["inputs"])
  stream = jax.jit(lambda p: nnx.merge(setup.graphdef, p)(probe, residuals=True)[1]["residuals"])
  h0 = stream(state.params)
  for i in range(steps):
    batch = {k: jnp.asarray(v) for k, v in data.batch(i).items()}
    state, _ = step(state, batch)
  h = stream(state.params)

  def rms(x):  # per layer, over batch, positions and width
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=(1, 2, 3))).tolist()

  return {
    "kind": kind,
    "width": width,
    "depth": depth,
    "rms_init": rms(h0),
    "rms": rms(h),
    "delta": rms(h - h0),
  }


def spread(results: list[dict], kind: str, axis: str) -> float:
  """max / min over the sweep of the last layer's change RMS (1 = perfectly flat)."""
  values = [r["delta"][-1] for r in results if r["kind"] == kind and r["sweep"] == axis]
  return max(values) / min(values)


def plot(results: list[dict], path: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
  for row, kind in enumerate(("completep", "sp")):
    for col, axis in enumerate(("width", "depth")):
      ax = axes[row, col]
      runs = sorted(
        (r for r in results if r["kind"] == kind and r["sweep"] == axis), key=lambda r: r[axis]
      )
      xs = [r[axis] for r in runs]
      ax.plot(xs, [r["delta"][-1] for r in runs], "o-", label="last layer: change after training")
      ax.plot(xs, [r["delta"][0] for r in runs], "s--", label="first layer: change")
      ax.plot(xs, [r["rms"][-1] for r in runs], "^:", label="last layer: RMS")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(
        f"{'CompleteP' if kind == 'completep' else 'standard param.'}: {axis} x"
        f" (spread {spread(results, kind, axis):.2f})"
      )
      ax.set_xlabel(f"{axis} multiplier")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run(widths, depths, steps) -> list[dict]:
  results = []
  for kind in ("completep", "sp"):
    for w in widths:
      results.append({**measure(kind, w, 1, steps), "sweep": "width"})
    for k in depths:
      results.append({**measure(kind, 1, k, steps), "sweep": "depth"})
  return results


def _counts(flag: str, text: str) -> list[int]:
  try:
    counts = [int(x) for x in text.split(",")]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise ConfigError(f"{flag} {text!r}: expected comma-separated positive ints, e.g. 1,2,4")
  return counts


def main(argv: list[str]):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--widths", default="1,2,4,8")
  parser.add_argument("--depths", default="1,2,4")
  parser.add_argument("--out", default="coord_check.png")
  args = parser.parse_args(argv)
  results = run(_counts("--widths", args.widths), _counts("--depths", args.depths), args.steps)
  plot(results, args.out)
  print(
    json.dumps(
      {
        f"{kind}_{axis}_spread": round(spread(results, kind, axis), 3)
        for kind in ("completep", "sp")
        for axis in ("width", "depth")
      }
      | {"png": args.out}
    )
  )


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
