"""The locks (tools/lock.sh): the runtime lock README command 1 installs holds what training needs
and nothing only tests need; the extras lock adds evaluation and wandb to it, the GPU lock jax's
CUDA plugin; each of their pins equals the test lock's."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_ONLY = {"pytest", "ruff", "torch", "transformers", "libtpu", "papermill", "ipykernel"}


def pins(name: str) -> dict[str, str]:
  lines = (REPO / name).read_text().splitlines()
  found = [line.split("==") for line in lines if line and not line.startswith("#")]
  return {normal(package): version for package, version in found}


def normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def test_the_runtime_lock_is_the_test_locks_runtime_part():
  runtime, test = pins("requirements.lock"), pins("requirements-test.lock")
  assert {p: test.get(p) for p in runtime} == runtime  # one version of each package
  assert not TEST_ONLY & set(runtime)
  assert TEST_ONLY <= set(test)
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  needed = {normal(re.split(r"[\[<>=!~ ]", d)[0]) for d in project["dependencies"]}
  assert needed <= set(runtime)
  extra = {normal(re.split(r"[\[<>=!~ ]", d)[0]) for d in project["optional-dependencies"]["test"]}
  assert extra <= set(test)


def test_the_extras_lock_is_the_runtime_lock_plus_evaluation_and_wandb():
  runtime, extras, test = (
    pins(f) for f in ("requirements.lock", "requirements-extras.lock", "requirements-test.lock")
  )
  assert {p: test.get(p) for p in extras} == extras
  assert {p: extras.get(p) for p in runtime} == runtime
  assert {"lm-eval", "wandb"} <= set(extras) and not TEST_ONLY & set(extras)


def test_the_gpu_lock_is_the_runtime_lock_plus_the_cuda_plugin_of_its_jax():
  runtime, gpu = pins("requirements.lock"), pins("requirements-gpu.lock")
  assert {p: gpu.get(p) for p in runtime} == runtime
  added = set(gpu) - set(runtime)
  assert {"jax-cuda13-plugin", "jax-cuda13-pjrt", "nvidia-cudnn-cu13"} <= added
  assert all(p.startswith(("jax-cuda13-", "nvidia-")) for p in added), added
  assert gpu["jax-cuda13-plugin"] == gpu["jax-cuda13-pjrt"] == runtime["jax"] == runtime["jaxlib"]
  readme = (REPO / "README.md").read_text()
  assert "pip install -q --no-deps -r requirements-gpu.lock" in readme


def test_readme_and_ci_install_the_locks_they_should():
  readme = (REPO / "README.md").read_text()
  ci = (REPO / ".ci" / "run").read_text()
  train = next(line for line in readme.splitlines() if "celerity_jax.main recipe=" in line)
  tests = next(line for line in readme.splitlines() if "pytest" in line and "pip install" in line)
  assert "-r requirements.lock" in train and "requirements-test.lock" not in train
  assert "-r requirements-test.lock" in tests and tests.strip() in ci


def test_the_package_list_installs_every_subpackage_and_the_recipes():
  """pyproject lists the packages (recipes/ is mapped into the package as celerity_jax.recipes), so
  a new subpackage missing from the list would be left out of every non-editable install."""
  setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
  found = {
    ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "celerity_jax").rglob("__init__.py")
  }
  assert set(setuptools["packages"]) == found | {"celerity_jax.recipes"}
  assert setuptools["package-dir"]["celerity_jax.recipes"] == "recipes"
  assert (REPO / "recipes" / "__init__.py").exists() and not (
    REPO / "celerity_jax" / "recipes"
  ).exists()
