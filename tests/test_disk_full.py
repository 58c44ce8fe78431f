"""A full disk under run.dir, as a user meets it: at start-up, at a checkpoint, and with
checkpoints off while TensorBoard and the metrics keep writing. Each ends in one line naming the
file and the space left, exit status 7, within seconds (never a hang, never "out of memory"); once
there is space again the same command resumes from the last checkpoint and finishes.

The disk is a small tmpfs mounted in a private mount namespace (`unshare`), as an unprivileged
user may; where the machine allows neither that nor a mount as root, the test is skipped."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CACHE, SMALL

ARGS = [
  "recipe=celerity_tiny",
  *SMALL,
  "scaling.tpp=2",  # 161 steps
  "run.log_every=1",
  "run.dir=/tmp/celerity-full/run",
]


def namespace() -> list[str] | None:
  """A command prefix that runs a shell with its own mounts, or None."""
  for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
    if shutil.which(prefix[0]) is None:
      continue
    probe = subprocess.run(
      [
        *prefix,
        "sh",
        "-c",
        "mkdir -p /tmp/celerity-full && mount -t tmpfs tmpfs /tmp/celerity-full",
      ],
      capture_output=True,
    )
    if probe.returncode == 0:
      return prefix
  return None


def run_full(tmp_path, script: str) -> list[dict]:
  """Runs `script` (bash, with $RUN = the training command) on a 2 MB disk at
  /tmp/celerity-full; the script records each command's status and stderr with `record NAME`."""
  prefix = namespace()
  if prefix is None:
    pytest.skip("no way to mount a small filesystem here (unshare and mount refused)")
  out = tmp_path / "out"
  out.mkdir()
  train = " ".join([sys.executable, "-m", "celerity_jax.main", *ARGS])
  body = f"""
set -u
mkdir -p /tmp/celerity-full && mount -t tmpfs -o size=2m tmpfs /tmp/celerity-full
RUN="timeout 120 {train}"
record() {{ local name=$1; shift; "$@" 2> {out}/$name.err; echo $? > {out}/$name.rc; }}
{script}
"""
  subprocess.run(
    [*prefix, "bash", "-c", body],
    env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"},
    timeout=600,
    check=True,
  )
  results = {}
  for rc in sorted(out.glob("*.rc")):
    err = (out / f"{rc.stem}.err").read_text()
    lines = [x for x in err.splitlines() if not x.startswith("celerity_jax: N=")]
    results[rc.stem] = {"rc": int(rc.read_text()), "err": err, "lines": lines}
  return results


def assert_one_line(result, named: str):
  assert result["rc"] == 7, result["err"][-3000:]
  assert len(result["lines"]) == 1, result["err"][-3000:]
  line = result["lines"][0]
  assert line.startswith("disk full: no space left on the device of /tmp/celerity-full/run"), line
  assert named in line and " free of " in line, line
  assert "Traceback" not in result["err"] and "out of memory" not in result["err"]


def test_a_full_disk_ends_a_run_in_one_line_and_a_rerun_resumes(tmp_path):
  results = run_full(
    tmp_path,
    """
record save $RUN checkpoint.every_steps=20 run.tensorboard=false
ls /tmp/celerity-full/run/checkpoints > {out}/kept.txt
mount -o remount,size=64m /tmp/celerity-full
record resume $RUN checkpoint.every_steps=20 run.tensorboard=false
cp /tmp/celerity-full/run/metrics.jsonl {out}/metrics.jsonl
rm -rf /tmp/celerity-full/run
dd if=/dev/zero of=/tmp/celerity-full/fill bs=1k count=65500 2>/dev/null
record logging $RUN checkpoint.every_steps=0 checkpoint.every_minutes=0 run.tensorboard=true
rm -rf /tmp/celerity-full/run /tmp/celerity-full/fill
dd if=/dev/zero of=/tmp/celerity-full/fill bs=1k count=65536 2>/dev/null
record start $RUN
""".replace("{out}", str(tmp_path / "out")),
  )
  assert_one_line(results["save"], "/checkpoints/")  # at a checkpoint
  kept = (tmp_path / "out" / "kept.txt").read_text().split()
  saved = sorted(int(k) for k in kept if k.isdigit())
  assert saved and all(s % 20 == 0 for s in saved)
  resumed = results["resume"]
  assert resumed["rc"] == 0, resumed["err"][-3000:]
  assert f"resumed from step {saved[-1]}" in resumed["err"]
  rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if "event" not in r]
  assert steps == list(range(1, 162))
  assert_one_line(results["logging"], "/run/")  # checkpoints off: metrics or TensorBoard
  assert_one_line(results["start"], "/run/")  # at start-up (its lock or its config.json)
