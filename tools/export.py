"""Export a checkpoint's params to one .npz file, with the run's config.json beside it.

  python -m tools.export RUN_DIR [--step N] [--out params.npz]

Keys are parameter paths (`blocks/attn/wq`, `embed`, ...); scanned blocks keep their leading layer
axis. Read it without celerity_jax: `numpy.load("params.npz")`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def flat_params(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from flat_params(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", np.asarray(value)


def export(run_dir: Path, step: int | None, out: Path) -> dict:
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints",
                                  item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise SystemExit(f"export: no complete checkpoint in {run_dir}/checkpoints")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  arrays = dict(flat_params(params))
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, **arrays)
  shutil.copyfile(Path(run_dir) / "config.json", out.with_name(out.stem + ".config.json"))
  manager.close()
  return {"step": int(step), "out": str(out), "n_arrays": len(arrays),
          "n_params": int(sum(a.size for a in arrays.values()))}


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", type=Path)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  out = args.out or args.run_dir / "params.npz"
  print(json.dumps(export(args.run_dir, args.step, out)))


if __name__ == "__main__":
  main(sys.argv[1:])
