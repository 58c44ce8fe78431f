"""Fit the loss-curve surrogate's four constants to finished runs and write them as JSON.

  python -m tools.fit_surrogate RUN_DIR [RUN_DIR ...] [--out surrogate.json] \
      [--holdout RUN_DIR ...]

The fit is the alternating grid search of docs/method.md section 7
(celerity_jax.collapse.surrogate.fit);
--holdout runs are not fitted but their MAE is reported. The package's shipped constants were fit
to the nano family's collapse-experiment runs (docs/collapse.md); fit a family of your own here.
"""

from __future__ import annotations

import json
import sys

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.collapse import surrogate
from celerity_jax.collapse.curves import load_run


def main(argv=None):
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+")
  parser.add_argument("--holdout", nargs="*", default=[])
  parser.add_argument("--out", default="surrogate.json")
  args = parser.parse_args(argv)
  fitted = [load_run(r, require_finished=True) for r in args.runs]
  held = [load_run(r, require_finished=True) for r in args.holdout]
  if len({(c.tau, c.tpp) for c in fitted}) < 2:
    print(
      "warning: every run has the same (tau, TPP); b and q are then not separately identifiable",
      file=sys.stderr,
    )
  constants, objective = surrogate.fit(fitted)
  report = {
    "fit_mae": objective,
    "runs": args.runs,
    "mae": {c.name: surrogate.mae(c, constants) for c in fitted},
    "holdout_mae": {c.name: surrogate.mae(c, constants) for c in held},
    "command": "python -m tools.fit_surrogate " + " ".join(sys.argv[1:] if argv is None else argv),
  }
  surrogate.save_constants(args.out, constants, report)
  print(json.dumps({"constants": constants._asdict(), **report}, indent=2))


if __name__ == "__main__":
  sys.exit(run_cli(main))
