"""Compile a recipe's train step for a TPU slice on any machine, and say whether it fits.

  python -m celerity_jax.commands.aot recipe=NAME [key=value ...] --topology v5p:4x4x4 \
      [--slices N] [--json]
  python -m celerity_jax.commands.aot recipe=NAME [key=value ...] --topology v5p-64 --fit \
      [--max-batch-change 0.05]

Needs `libtpu` (the test extra installs the version the pinned jax pairs with); no TPU is used.
The step is the one the training loop runs: `prepare_training` builds it with the same mesh,
shardings, donation and microbatching, over compile-only devices of the named topology, and it is
lowered from abstract state (nothing is allocated). Reported per device: argument, output,
temporary and peak bytes against the chip's HBM; XLA's FLOPs and bytes per step; the collectives
by kind with their bytes (loops counted by trip count); and a roofline lower bound on step time
from the chip's peak FLOP/s, HBM and ICI bandwidth (tpu_chips.py), with the MFU it implies.
A step that does not fit is a result (exit 1), never a traceback; a bad setting exits 2.
`--topology` takes a topology (v5p:2x4x4) or a Cloud TPU accelerator type (v5p-64). `--fit` searches
the layouts (aot_fit.py) and exits 1 when none fits.
"""

from __future__ import annotations

import json
import sys

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.commands import aot_compile, aot_fit, tpu_chips


def main(argv: list[str] | None = None) -> int:
  """Exit 0 when the step fits, 1 when it does not, 2 on a bad setting (one line)."""
  return run_cli(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
  from celerity_jax.cli import parse
  from celerity_jax.config import ConfigError

  parser = ArgumentParser(
    prog="python -m celerity_jax.commands.aot", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:4x4x4, v6e:4x4")
  parser.add_argument("--slices", type=int, default=1)
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument(
    "--fit",
    action="store_true",
    help="search meshes, remat and microbatches for the fastest layout that fits",
  )
  parser.add_argument(
    "--max-batch-change",
    type=float,
    default=0.05,
    help="--fit: largest change of B from the law's (default 0.05; the slice "
    "may force more, which is then reported)",
  )
  parser.add_argument("--max-compiles", type=int, default=12, help="--fit: compile budget")
  parser.add_argument("--keep", type=int, default=3, help="--fit: fitting layouts to compile")
  args, overrides = parser.parse_known_args(argv)
  try:
    cfg, _ = parse(overrides)
    if args.slices < 1:
      raise ConfigError(f"--slices {args.slices}: must be at least 1")
    if args.slices != cfg.mesh.slices:
      cfg = parse(overrides + [f"mesh.slices={args.slices}"])[0]
    topology = tpu_chips.resolve_topology(args.topology)
    if args.fit:
      if args.max_batch_change < 0 or args.max_compiles < 1 or args.keep < 1:
        raise ConfigError("--max-batch-change must be >= 0, --max-compiles and --keep >= 1")
      say = None if args.json else lambda line: print(f"aot: {line}", file=sys.stderr, flush=True)
      result = aot_fit.search(
        cfg,
        topology,
        args.slices,
        args.max_batch_change,
        args.keep,
        args.max_compiles,
        progress=say,
        fixed=aot_fit.fixed_keys(overrides),
      )
      print(json.dumps(result, indent=2) if args.json else aot_fit.table(result))
      return 0 if result["best"] else 1
    rep = aot_compile.report(cfg, topology, args.slices)
  except ConfigError:
    raise
  except ValueError as e:  # a topology libtpu does not know
    raise ConfigError(f"aot: {e}") from None
  print(json.dumps(rep, indent=2) if args.json else aot_compile.table(rep))
  return 0 if rep["memory"]["fits"] else 1


if __name__ == "__main__":
  sys.exit(main())
