"""The code style is checked, not hoped for: ruff's linter and formatter, configured in
pyproject.toml, pass over the whole repository (run `ruff format .` to fix the formatting)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def ruff() -> str:
  found = shutil.which("ruff", path=str(Path(sys.executable).parent))
  assert found, "ruff (in the test extra) is not installed in this environment"
  return found


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes(command):
  result = subprocess.run(
    [ruff(), *command, "--no-cache", "."], cwd=REPO, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
