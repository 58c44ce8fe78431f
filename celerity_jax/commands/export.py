"""Export a checkpoint's params: as one .npz file, or as a Hugging Face `transformers` model.

  python -m celerity_jax.commands.export RUN_DIR [--step N] [--out params.npz] [--overwrite]
  python -m celerity_jax.commands.export RUN_DIR [--step N] --format hf --out DIR [--overwrite]

npz: keys are parameter paths (`blocks/attn/wq`, `embed`, ...), as trained (multipliers not
folded); scanned blocks keep their leading layer axis. Read it without celerity_jax:
`numpy.load("params.npz")`; `params.config.json` beside it is the checkpoint's own resolved
config. RUN_DIR and --out may be local paths or gs:// URLs.

hf: a directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads (add
`trust_remote_code=True` for the architectures no stock class holds, the Celerity default among
them), with `model.safetensors`, `config.json` and the run's tokenizer for `AutoTokenizer`; the
CompleteP multipliers are folded into the weights (celerity_jax/hf/convert.py). --out is local.

Without --step the newest usable checkpoint is exported (damaged ones are skipped with a warning).
Nothing is replaced without --overwrite: an existing .npz (or its .config.json), a non-empty
--out directory. A run directory is never written into by --format hf (its config.json is the
run's own), and --overwrite replaces only a directory that holds an earlier Hugging Face export.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np

from celerity_jax import storage
from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError


def check_npz_out(out, overwrite: bool):
  out = storage.location(out)
  for path in (out, out.with_name(out.stem + ".config.json")):
    if path.is_dir():
      raise ConfigError(f"export --out {out}: {path} is a directory")
    if path.exists() and not overwrite:
      raise ConfigError(
        f"export --out {out}: {path} exists; pass --overwrite to replace it, or another --out"
      )


def _is_run_dir(path) -> bool:
  if (path / "checkpoints").exists() or (path / "metrics.jsonl").exists():
    return True
  try:
    return "derived" in json.loads((path / "config.json").read_text())
  except (OSError, ValueError):
    return False


def check_hf_out(out, overwrite: bool):
  """--out for --format hf: missing or empty; with --overwrite, an earlier export; never a run."""
  out = storage.location(out)
  if not out.exists():
    return
  if not out.is_dir():
    raise ConfigError(f"export --out {out}: exists and is not a directory")
  names = sorted(p.name for p in out.iterdir())
  if not names:
    return
  if _is_run_dir(out):
    raise ConfigError(
      f"export --out {out}: is a run directory (its config.json is the run's own); export to "
      f"another directory"
    )
  listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
  if not overwrite:
    raise ConfigError(
      f"export --out {out}: the directory is not empty ({listed}); pass --overwrite to replace "
      f"an earlier export, or another --out"
    )
  if "model.safetensors" not in names:
    raise ConfigError(
      f"export --out {out}: holds files that are not a Hugging Face export ({listed}); "
      f"--overwrite replaces only an earlier export"
    )


def export_npz(trained, out) -> dict:
  from celerity_jax.checkpoint import leaf_paths

  out = storage.location(out)
  arrays = {path: np.asarray(leaf) for path, leaf in leaf_paths(trained.params)}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  config = json.dumps(trained.described, indent=2) + "\n"  # the checkpoint's own settings
  try:
    storage.make_dir(out.parent)
    storage.write_atomic(out, buffer.getvalue())
    storage.write_atomic(out.with_name(out.stem + ".config.json"), config)
  except OSError as e:
    raise ConfigError(f"export --out {out}: cannot write ({e.strerror or e})") from None
  return {
    "step": trained.step,
    "out": str(out),
    "format": "npz",
    "n_arrays": len(arrays),
    "n_params": int(sum(a.size for a in arrays.values())),
  }


def export(run_dir, step: int | None, out, fmt: str = "npz", overwrite: bool = False) -> dict:
  """Writes the params of `step` (default: the newest usable checkpoint) in format `fmt`; refuses,
  before reading the checkpoint, to replace anything unless `overwrite`."""
  from celerity_jax import trained as trained_lib

  if fmt == "hf":
    if out is None:
      raise ConfigError("export --format hf: give --out DIR, the directory to write")
    if str(out).startswith("gs://"):
      raise ConfigError(f"export --format hf --out {out}: writes a local directory (copy it after)")
    check_hf_out(out, overwrite)
  else:
    out = out or storage.location(run_dir) / "params.npz"
    check_npz_out(out, overwrite)
  run = trained_lib.load(run_dir, step, "export")
  if fmt == "hf":
    from celerity_jax.hf import convert

    return convert.write(run, out)
  return export_npz(run, out)


def main(argv):
  parser = ArgumentParser(
    prog="python -m celerity_jax.commands.export", description=__doc__.splitlines()[0]
  )
  parser.add_argument("run_dir")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--format", choices=("npz", "hf"), default="npz")
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")
  args = parser.parse_args(argv)
  print(json.dumps(export(args.run_dir, args.step, args.out, args.format, args.overwrite)))


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
