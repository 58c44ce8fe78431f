"""Wheels for a machine that cannot reach a package registry (an air-gapped GPU node, a lent
machine) whose image already holds jax and its CUDA plugin: the runtime lock's packages that the
image lacks, at the lock's versions, for the image's Python.

  python -m tools.gpu_wheels --have image-packages.txt --out wheels [--python 3.12]

`--have` is the image's `pip list` or `pip freeze` (or names separated by commas or spaces): every
package named there is left out, whatever its version, so the image's own jax, jaxlib and CUDA
libraries stay. There, install them ahead of the image's packages and run from a checkout:

  pip install --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site
  pip install --no-index --no-deps --no-build-isolation -e . && python -m tools.gpu_check --out DIR
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64", "any")


def normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(text: str) -> set[str]:
  """Names in a `pip list` / `pip freeze` listing or a comma- or space-separated list."""
  names = set()
  for token in re.split(r"[\s,]+", text):
    name = re.split(r"[=<>@ ]", token)[0].rstrip(".")  # (a sentence's final period)
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and not re.fullmatch(r"[\d.]+", name):
      names.add(normal(name))
  return names - {"package", "version"}  # pip list's header


def missing(lock: Path, have: set[str]) -> list[str]:
  pins = [line.strip() for line in lock.read_text().splitlines() if "==" in line]
  return [pin for pin in pins if not pin.startswith("#") and normal(pin.split("==")[0]) not in have]


def main(argv: list[str]) -> int:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--have", required=True, help="the image's pip list or pip freeze")
  parser.add_argument("--out", required=True)
  parser.add_argument("--python", default="3.12", help="the image's Python version")
  parser.add_argument("--lock", default=str(REPO / "requirements.lock"))
  args = parser.parse_args(argv)
  try:
    have = image_packages(Path(args.have).read_text())
  except OSError as e:
    raise ConfigError(f"--have {args.have}: {e.strerror}") from None
  if "jax" not in have:
    raise ConfigError(f"--have {args.have} lists no jax: this tool carries what an image lacks")
  wanted = missing(Path(args.lock), have)
  platforms = [f"--platform={p}" for p in PLATFORMS]
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
  command += [f"--python-version={args.python}", "--implementation=cp", *platforms]
  subprocess.run([*command, "-d", args.out, *wanted], check=True)
  size = sum(f.stat().st_size for f in Path(args.out).glob("*.whl"))
  print(f"{len(wanted)} packages the image lacks, {size / 2**20:.1f} MiB in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
