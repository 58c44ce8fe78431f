"""Multi-process training as a pod runs it, on CPU: real OS processes, each with 4 fake devices,
jax.distributed with a coordinator on 127.0.0.1 and gloo collectives, against one process with 8
devices on the same 2x2x2 mesh.

Tolerance: every run is bit-reproducible with itself (an interrupted 2-process run resumes
bit-identically), but 2-process and 1-process losses agree to float32 rounding only (rtol 1e-6):
the cross-process all-reduces run gloo's ring algorithm, which sums the 8 devices' partial losses
and gradients in another order than XLA's in-process CPU collectives.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CACHE, small_config
from test_checkpoint import cli, losses

from celerity_jax.checkpoint import Checkpointer
from celerity_jax.main import main

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "checkpoint.every_steps=10"]
HEARTBEAT_S = 5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Workers:
  """`n` processes of the same command, as the TPU launch script starts them on a pod's hosts."""

  def __init__(self, run_dir, *extra, n=2, argv=None):
    argv = argv or [
      "-m",
      "celerity_jax.main",
      *cli(run_dir, *MESH, *extra),
      f"dist.heartbeat_timeout_s={HEARTBEAT_S}",
    ]
    port, self.logs, self.procs = free_port(), [], []
    for i in range(n):
      env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(CACHE),
        "PYTHONUNBUFFERED": "1",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(n),
        "JAX_PROCESS_ID": str(i),
      }
      log = run_dir.parent / f"{run_dir.name}.worker{i}.log"
      self.logs.append(log)
      with log.open("w") as out:
        self.procs.append(
          subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=out)
        )

  def wait(self, timeout=240) -> list[int]:
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.procs]
    finally:
      for p in self.procs:
        p.kill()

  def log(self, i) -> str:
    return self.logs[i].read_text()

  def wait_for_step(self, run_dir, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if (run_dir / "metrics.jsonl").exists() and any(r[0] >= step for r in losses(run_dir)):
        return
      assert all(p.poll() is None for p in self.procs), [self.log(i)[-3000:] for i in range(2)]
      time.sleep(0.05)
    raise TimeoutError(step)


def run_workers(run_dir, *extra):
  workers = Workers(run_dir, *extra)
  codes = workers.wait()
  assert codes == [0, 0], [workers.log(i)[-3000:] for i in range(2)]
  return workers


def checkpoint_steps(run_dir) -> list[int]:
  ckpt = Checkpointer(run_dir / "checkpoints", small_config().checkpoint)
  steps = list(ckpt.manager.all_steps())
  ckpt.close()
  return sorted(steps)


def assert_close(rows, reference):
  assert [r[0] for r in rows] == [r[0] for r in reference]
  np.testing.assert_allclose([r[1:3] for r in rows], [r[1:3] for r in reference], rtol=1e-6)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
  """The same run uninterrupted: 1 process x 8 devices and 2 processes x 4 devices; the second
  also saves every 0.2 s of wall time, a decision the processes must take at the same steps."""
  root = tmp_path_factory.mktemp("full")
  assert main(cli(root / "one", *MESH)) == 0
  run_workers(root / "two", "checkpoint.every_minutes=0.0033", "checkpoint.keep=1000")
  return root / "one", root / "two"


def test_two_processes_train_as_one_with_one_writer(full_runs):
  one, two = full_runs
  assert_close(losses(two), losses(one))
  assert losses(two)[-1][0] == json.loads((one / "config.json").read_text())["derived"]["steps"]
  rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
  assert [r["event"] for r in rows if "event" in r] == ["start", "collapse_alert"]  # once each
  assert rows[0]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  timed = [s for s in checkpoint_steps(two) if s % 10]
  assert len(timed) >= 3, checkpoint_steps(two)  # time-based saves, agreed by both processes


ROWS = """
import json, sys
from celerity_jax import distributed, sharding
from celerity_jax.config import DistConfig, MeshConfig
distributed.initialize(DistConfig())
for sizes in json.loads(sys.argv[1]):
  print(sharding.process_rows(sharding.make_mesh(MeshConfig(**sizes)), 16).tolist())
"""


def test_each_process_reads_the_rows_its_devices_hold(tmp_path):
  meshes = [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "tensor": 8}, {"data": 8}]
  workers = Workers(tmp_path / "rows", argv=["-c", ROWS, json.dumps(meshes)])
  assert workers.wait() == [0, 0], [workers.log(i)[-3000:] for i in range(2)]
  printed = [
    [json.loads(x) for x in workers.log(i).splitlines() if x.startswith("[")] for i in range(2)
  ]
  assert printed[0] == [list(range(8)), list(range(16)), list(range(8))]
  assert printed[1] == [list(range(8, 16)), list(range(16)), list(range(8, 16))]


def test_processes_as_slices_train_as_the_same_mesh(full_runs, tmp_path):
  _, two = full_runs
  run_workers(tmp_path / "slices", "mesh.slices=2", "mesh.data=1")
  rows = [json.loads(x) for x in (tmp_path / "slices" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert losses(tmp_path / "slices") == losses(two)


def test_checkpoints_move_between_two_processes_and_one(full_runs, tmp_path):
  one, two = full_runs
  # written by 2 processes, resumed by 1
  run_workers(tmp_path / "a", "train.stop_step=20")
  assert checkpoint_steps(tmp_path / "a") == [10, 20]
  assert main(cli(tmp_path / "a", *MESH)) == 0
  assert losses(tmp_path / "a")[:20] == losses(two)[:20]
  assert_close(losses(tmp_path / "a")[20:], losses(one)[20:])
  # written by 1 process, resumed by 2
  assert main(cli(tmp_path / "b", *MESH, "train.stop_step=20")) == 0
  run_workers(tmp_path / "b")
  assert losses(tmp_path / "b")[:20] == losses(one)[:20]
  assert_close(losses(tmp_path / "b")[20:], losses(two)[20:])


def test_sigterm_to_one_worker_stops_both_at_one_step_and_resumes_bit_identically(
  full_runs, tmp_path
):
  _, two = full_runs
  run_dir = tmp_path / "run"
  workers = Workers(run_dir)
  workers.wait_for_step(run_dir, 8)
  workers.procs[1].send_signal(signal.SIGTERM)  # not the one that writes the files
  assert workers.wait() == [0, 0], [workers.log(i)[-3000:] for i in range(2)]
  stopped = [
    json.loads(x)
    for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    if '"preempted"' in x
  ][0]["step"]
  assert f"stopped at step {stopped} by signal {signal.SIGTERM.value}" in workers.log(1)
  assert f"stopped at step {stopped} (a signal reached another process)" in workers.log(0)
  assert checkpoint_steps(run_dir)[-1] == stopped
  run_workers(run_dir)
  assert losses(run_dir) == losses(two)


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_worker_ends_the_other_within_the_heartbeat_timeout(tmp_path, victim):
  run_dir = tmp_path / "run"
  workers = Workers(run_dir)
  workers.wait_for_step(run_dir, 5)
  workers.procs[victim].kill()
  killed_at = time.time()
  survivor = workers.procs[1 - victim]
  code = survivor.wait(timeout=HEARTBEAT_S + 60)
  assert code != 0 and time.time() - killed_at < HEARTBEAT_S + 60
  assert "another task died" in workers.log(1 - victim)


def test_two_processes_start_from_another_runs_weights_as_one_does(full_runs, tmp_path):
  """init.from on a pod: every process reads the weights and places its shards; the run equals
  one process's, and starts where the source run ended, far below a run from random weights."""
  from celerity_jax.commands.export import export

  one, _ = full_runs
  start = [f"init.from={one}", "train.stop_step=4"]
  run_workers(tmp_path / "two", *start)
  assert main(cli(tmp_path / "one", *MESH, *start)) == 0
  assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
  assert losses(tmp_path / "one")[0][1] < losses(one)[0][1] - 1.0
  # from its Hugging Face export (read whole by each process): the same run, bit for bit
  export(one, None, tmp_path / "hf", "hf")
  run_workers(tmp_path / "two_hf", f"init.from={tmp_path / 'hf'}", "train.stop_step=4")
  assert losses(tmp_path / "two_hf") == losses(tmp_path / "two")


EVALUATE = """
import json, sys
from celerity_jax import distributed
from celerity_jax.config import DistConfig
distributed.initialize(DistConfig())
from celerity_jax.downstream import tasks
from celerity_jax.downstream.lm import CelerityLM
lm = CelerityLM.from_run(sys.argv[1], batch_size=8)
results = tasks.evaluate(lm, tasks.load("celerity_mc", sys.argv[2]), log_samples=True)
scores = [[float(r[0][0]) for r in s["resps"]] for s in results["samples"]["celerity_mc"]]
print("SCORES " + json.dumps(scores))
"""


def test_two_processes_score_downstream_tasks_as_one_does(trained_text_run, tmp_path):
  """The evaluation backend on a pod: the checkpoint restored into shards over both processes'
  devices, every request scored in step, the same scores on each process as on one."""
  pytest.importorskip("lm_eval")
  from test_downstream import local_task

  from celerity_jax.downstream import tasks
  from celerity_jax.downstream.lm import CelerityLM

  include = str(local_task(tmp_path))
  workers = Workers(tmp_path / "eval", argv=["-c", EVALUATE, str(trained_text_run), include])
  assert workers.wait() == [0, 0], [workers.log(i)[-3000:] for i in range(2)]
  printed = [
    json.loads(next(x for x in workers.log(i).splitlines() if x.startswith("SCORES "))[7:])
    for i in range(2)
  ]
  results = tasks.evaluate(
    CelerityLM.from_run(trained_text_run, batch_size=8),
    tasks.load("celerity_mc", include),
    log_samples=True,
  )
  alone = [[float(r[0][0]) for r in s["resps"]] for s in results["samples"]["celerity_mc"]]
  assert printed[0] == printed[1]
  np.testing.assert_allclose(printed[0], alone, rtol=1e-5)
