"""Predict a run's final loss from its curve so far (docs/method.md section 7).

  python -m celerity_jax.commands.predict RUN_DIR [--stop 0.3] [--reference surrogate|RUN_DIR] \
      [--surrogate F]

Aligns the run's smoothed loss over t in [0.2, stop] (for a stop before 0.3, over the 0.1 before
it: collapse/predict.py) to the surrogate at the run's tau, TPP and schedule (or to a finished
reference run's normalized curve); the fitted divisor is L_hat(T). If the run is finished, the
true final loss and the error are printed too.
"""

from __future__ import annotations

import json
import sys

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.collapse import predict, surrogate
from celerity_jax.collapse.curves import load_run


def fraction(text: str) -> float:
  """A t in (0, 1] (argparse type: a bad value is a usage error naming the flag)."""
  value = float(text)
  if not 0 < value <= 1:  # NaN fails this too
    raise ValueError(text)
  return value


fraction.__name__ = "t in (0, 1]"  # what argparse's message calls the expected value


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run")
  parser.add_argument("--stop", type=fraction, default=None, help="use points up to this t only")
  parser.add_argument("--reference", default="surrogate")
  parser.add_argument("--surrogate", default="", help="constants JSON (default: packaged)")
  args = parser.parse_args(argv)
  curve = load_run(args.run)
  stop = float(curve.t_hat[-1]) if args.stop is None else args.stop
  reference = (
    None if args.reference == "surrogate" else load_run(args.reference, require_finished=True)
  )
  estimate = predict.predict_final_loss(
    curve, stop, constants=surrogate.load_constants(args.surrogate), reference=reference
  )
  used = curve.t_hat[curve.t_hat <= stop + 1e-9]
  out = {
    "run": args.run,
    "used_up_to_t": float(used[-1]),
    "window_t": [predict.window_start(stop), stop],
    "predicted_final": estimate,
  }
  if curve.finished:
    out |= {"true_final": curve.final_loss, "rel_error": estimate / curve.final_loss - 1}
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  sys.exit(run_cli(main))
