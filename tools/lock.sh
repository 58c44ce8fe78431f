#!/usr/bin/env bash
# Regenerates both locks from pyproject.toml, the one procedure for them:
#   requirements-test.lock  ".[test]": README command 2 and CI (tests, lint, TPU compiles, HF checks)
#   requirements.lock       ".": README command 1, pod workers (training and the installed commands)
#   requirements-extras.lock ".[eval,wandb]": the runtime plus downstream evaluation and wandb
#   requirements-gpu.lock   ".[gpu]": the runtime plus jax's CUDA 13 plugin and NVIDIA's libraries
#                           (Linux x86-64; resolved without installing, from pip's dry-run report)
# The other locks are resolved under the test lock's pins, so every package has one version.
# Usage (from a checkout, with the package registry reachable):
#   bash tools/lock.sh            keep today's pins where pyproject still allows them
#   bash tools/lock.sh --upgrade  re-resolve the test lock from scratch
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
keep=(-c requirements-test.lock)
if [[ "${1:-}" == "--upgrade" ]]; then keep=(); fi

freeze() {  # $1: venv, $2: what it holds
  echo "# Exact versions of $2 (pip freeze of a clean Python 3.11 venv)."
  echo "# Regenerate both locks with: bash tools/lock.sh"
  # a local version label (torch's "+cpu") names a build, not a release the registry serves by name
  "$1/bin/pip" freeze --exclude-editable | grep -v '^celerity[-_]jax' | sed -E 's/\+[a-z0-9.]+$//'
}

python3 -m venv "$work/test"
"$work/test/bin/pip" install -q ".[test]" "${keep[@]}"
freeze "$work/test" '".[test]": README command 2 and CI' > "$work/test.lock"
python3 -m venv "$work/run"
"$work/run/bin/pip" install -q . -c "$work/test.lock"
freeze "$work/run" '".": README command 1 and pod workers' > requirements.lock
python3 -m venv "$work/extras"
"$work/extras/bin/pip" install -q ".[eval,wandb]" -c "$work/test.lock"
freeze "$work/extras" '".[eval,wandb]": training, downstream evaluation and wandb' \
  > requirements-extras.lock
"$work/run/bin/pip" install -q --dry-run --ignore-installed --report "$work/gpu.json" ".[gpu]" \
  -c "$work/test.lock"
{
  echo "# Exact versions of \".[gpu]\": training on NVIDIA GPUs (pip's resolution for Linux x86-64)."
  echo "# Regenerate both locks with: bash tools/lock.sh"
  "$work/run/bin/python" - "$work/gpu.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["install"]
pins = {r["metadata"]["name"]: r["metadata"]["version"] for r in rows}
for name in sorted(n for n in pins if n.replace("_", "-").lower() != "celerity-jax"):
  print(f"{name}=={pins[name]}")
PY
} > requirements-gpu.lock
mv "$work/test.lock" requirements-test.lock
for lock in requirements-test.lock requirements.lock requirements-extras.lock requirements-gpu.lock; do
  echo "wrote $lock ($(grep -vc '^#' "$lock") packages)"
done
