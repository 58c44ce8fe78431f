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


def imports_between_modules() -> dict[str, set[str]]:
  """module -> the package's modules it imports, at the top or inside a function (a lazy import
  that breaks a circle at run time is still a circle to a reader). recipes/ counts as
  celerity_jax.recipes, as installed; tools/ and main may import anything, nothing imports them."""
  import ast

  files = {}
  for path in [*(REPO / "celerity_jax").rglob("*.py"), *(REPO / "recipes").rglob("*.py")]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    parts = ["celerity_jax", *parts] if parts[0] == "recipes" else parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in files.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("celerity_jax"):
        for alias in node.names:
          whole = f"{node.module}.{alias.name}"
          found.add(whole if whole in files else node.module)
      elif isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.startswith("celerity_jax")}
    graph[name] = {m for m in found if m in files and m != name}
  return graph


def test_no_import_circles_and_nothing_imports_the_entry_point():
  graph = imports_between_modules()
  assert not [m for m, deps in graph.items() if "celerity_jax.main" in deps]
  state: dict[str, int] = {}  # 1 on the current path, 2 done

  def visit(module: str, path: list[str]):
    state[module] = 1
    for dep in sorted(graph[module]):
      assert state.get(dep) != 1, "import circle: " + " -> ".join([*path, dep])
      if dep not in state:
        visit(dep, [*path, dep])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_every_documented_command_names_a_module_that_exists():
  import re

  pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "tpu" / "README.md"]
  named = {m for page in pages for m in re.findall(r"python -m ([a-z_.]+)", page.read_text())}
  missing = [
    m
    for m in sorted(named - {"pytest", "venv"})
    if not any((REPO / (m.replace(".", "/") + end)).exists() for end in (".py", "/__init__.py"))
  ]
  assert not missing, missing
