"""Predict a run's final loss from its curve so far (docs/method.md section 7).

  python -m celerity_jax.tools.predict RUN_DIR [--stop 0.3] [--reference surrogate|RUN_DIR] \
      [--surrogate F]

Aligns the run's smoothed loss over t in [0.2, stop] to the surrogate at the run's tau, TPP and
schedule (or to a finished reference run's normalized curve); the fitted divisor is L_hat(T).
If the run is finished, the true final loss and the error are printed too.
"""

from __future__ import annotations

import json
import sys

from celerity_jax.collapse import predict, surrogate
from celerity_jax.collapse.curves import load_run
from celerity_jax.main import ArgumentParser, run_cli


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run")
  parser.add_argument("--stop", type=float, default=None, help="use points up to this t only")
  parser.add_argument("--reference", default="surrogate")
  parser.add_argument("--surrogate", default="", help="constants JSON (default: packaged)")
  args = parser.parse_args(argv)
  curve = load_run(args.run)
  partial = curve if args.stop is None else predict.truncate(curve, args.stop)
  reference = (
    None if args.reference == "surrogate" else load_run(args.reference, require_finished=True)
  )
  estimate = predict.predict_final_loss(
    partial, constants=surrogate.load_constants(args.surrogate), reference=reference
  )
  out = {"run": args.run, "used_up_to_t": float(partial.t_hat[-1]), "predicted_final": estimate}
  if curve.finished:
    out |= {"true_final": curve.final_loss, "rel_error": estimate / curve.final_loss - 1}
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  sys.exit(run_cli(main))
