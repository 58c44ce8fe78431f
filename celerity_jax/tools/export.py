"""Export a checkpoint's params to one .npz file, with the config it was trained with beside it.

  python -m celerity_jax.tools.export RUN_DIR [--step N] [--out params.npz]

RUN_DIR and --out may be local paths or gs:// URLs. Keys are parameter paths (`blocks/attn/wq`,
`embed`, ...); scanned blocks keep their leading layer axis. Read it without celerity_jax:
`numpy.load("params.npz")`. Without --step the newest usable checkpoint is exported (damaged ones
are skipped with a warning); `params.config.json` is that checkpoint's own resolved config.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np

from celerity_jax import storage
from celerity_jax.config import ConfigError
from celerity_jax.main import ArgumentParser, run_cli


def export(run_dir, step: int | None, out) -> dict:
  """Writes the params of `step` (default: the newest usable checkpoint, falling back past
  damaged ones with a warning) and the config they were trained with."""
  from celerity_jax.checkpoint import Checkpointer, leaf_paths

  run_dir, out = storage.location(run_dir), storage.location(out)
  if not (run_dir / "checkpoints").exists():
    raise ConfigError(f"export: {run_dir} has no checkpoints directory (is it a run.dir?)")
  ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
  try:
    steps = ckpt.steps()
    if step is not None and step not in steps:
      raise ConfigError(
        f"export --step {step}: no complete checkpoint at that step in "
        f"{run_dir}/checkpoints; complete steps: "
        f"{', '.join(map(str, sorted(steps))) or 'none'}"
      )
    found = ckpt.first_usable(
      lambda s: (ckpt.restore(s), ckpt.meta(s)), [step] if step is not None else steps
    )
    if found is None:
      raise ConfigError(f"export: no complete checkpoint in {run_dir}/checkpoints")
  finally:
    ckpt.close()
  step, (state, meta) = found
  params = state["params"] if isinstance(state, dict) else state.params
  arrays = {path: np.asarray(leaf) for path, leaf in leaf_paths(params)}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  config = json.dumps(meta["described"], indent=2) + "\n"  # the checkpoint's own settings
  try:
    storage.make_dir(out.parent)
    storage.write_atomic(out, buffer.getvalue())
    storage.write_atomic(out.with_name(out.stem + ".config.json"), config)
  except OSError as e:
    raise ConfigError(f"export --out {out}: cannot write ({e.strerror or e})") from None
  return {
    "step": int(step),
    "out": str(out),
    "n_arrays": len(arrays),
    "n_params": int(sum(a.size for a in arrays.values())),
  }


def main(argv):
  parser = ArgumentParser(
    prog="python -m celerity_jax.tools.export", description=__doc__.splitlines()[0]
  )
  parser.add_argument("run_dir")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = args.out or storage.location(args.run_dir) / "params.npz"
  print(json.dumps(export(args.run_dir, args.step, out)))


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
