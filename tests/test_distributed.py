"""Where a multi-process run's settings come from, and the errors for partial or wrong ones."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import CACHE
from test_checkpoint import cli, losses

from celerity_jax import distributed
from celerity_jax.config import ConfigError, DistConfig
from celerity_jax.main import main

ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}


def test_one_process_unless_told_or_on_a_tpu_vm():
  assert distributed.settings(DistConfig(), {}, tpu_vm=False) is None
  assert distributed.settings(DistConfig(), {}, tpu_vm=True) == {}  # jax reads TPU metadata


def test_environment_and_config_keys_config_first():
  expected = {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
  assert distributed.settings(DistConfig(), ENV, tpu_vm=True) == expected
  cfg = DistConfig(coordinator="127.0.0.1:1234", process_id=0)
  assert distributed.settings(cfg, ENV) == {
    "coordinator_address": "127.0.0.1:1234",
    "num_processes": 4,
    "process_id": 0,
  }


@pytest.mark.parametrize(
  "cfg,env,message",
  [
    (
      DistConfig(coordinator="127.0.0.1:1234"),
      {},
      "needs dist.num_processes or JAX_NUM_PROCESSES, dist.process_id or JAX_PROCESS_ID as well",
    ),
    (
      DistConfig(),
      {**ENV, "JAX_COORDINATOR_ADDRESS": "node0"},
      "JAX_COORDINATOR_ADDRESS='node0': expected host:port",
    ),
    (DistConfig(process_id=4), ENV, "dist.process_id=4 must be in [0, JAX_NUM_PROCESSES=4)"),
    (DistConfig(), {**ENV, "JAX_PROCESS_ID": "one"}, "JAX_PROCESS_ID='one' must be integers"),
  ],
)
def test_partial_or_wrong_settings_name_the_key(cfg, env, message):
  with pytest.raises(
    ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
  ):
    distributed.settings(cfg, env, tpu_vm=False)


def test_a_tpu_vm_is_recognized_by_its_tpu_pci_devices(tmp_path):
  def device(name, vendor, device_id):
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / "vendor").write_text(vendor + "\n")
    (tmp_path / name / "device").write_text(device_id + "\n")

  device("0000:00:04.0", "0x1af4", "0x1041")  # virtio
  device("0000:00:05.0", "0x1ae0", "0x0042")  # a Compute Engine VM's gVNIC: not a TPU
  assert not distributed.on_cloud_tpu_vm(tmp_path)
  device("0000:00:06.0", "0x1ae0", "0x0063")  # a TPU v5e chip
  assert distributed.on_cloud_tpu_vm(tmp_path)
  device("0000:00:06.0", "0x8086", "0x0063")
  assert not distributed.on_cloud_tpu_vm(tmp_path)
  assert not distributed.on_cloud_tpu_vm(tmp_path / "missing")


def test_cli_exits_2_with_one_line_before_contacting_anyone(capsys):
  code = main(
    [
      "recipe=celerity_tiny",
      "dist.coordinator=127.0.0.1:9",
      "dist.num_processes=2",
      "dist.process_id=2",
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1
  assert "dist.process_id=2 must be in [0, dist.num_processes=2)" in err
  assert main(["recipe=celerity_tiny", "dist.heartbeat_timeout_s=0"]) == 2


SLURM = {  # what `srun --ntasks=4 --ntasks-per-node=2` sets in its third task (the rest differ)
  "SLURM_JOB_ID": "812",
  "SLURM_STEP_NODELIST": "gpu[07-08]",
  "SLURM_STEP_NUM_NODES": "2",
  "SLURM_NTASKS": "4",
  "SLURM_PROCID": "2",
  "SLURM_LOCALID": "0",
}
OMPI = {
  "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
  "OMPI_COMM_WORLD_SIZE": "8",
  "OMPI_COMM_WORLD_RANK": "5",
  "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
}


def test_a_launcher_fills_what_is_unset_through_jax_cluster_detection():
  by_slurm = {"num_processes": 4, "process_id": 2, "cluster_detection_method": "slurm"}
  assert distributed.settings(DistConfig(), SLURM, tpu_vm=False) == by_slurm
  assert distributed.settings(DistConfig(), OMPI, tpu_vm=False) == {
    "num_processes": 8,
    "process_id": 5,
    "cluster_detection_method": "ompi",
  }
  # one process per node sees every GPU of its node, not only its local rank's
  per_node = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
  assert distributed.settings(DistConfig(), per_node)["local_device_ids"] == []
  one_each = {**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
  assert distributed.settings(DistConfig(), one_each)["local_device_ids"] == []
  # a launcher that bound one GPU to each task (--gpus-per-task=1): that GPU, whatever the rank
  bound = {**SLURM, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "5"}
  assert distributed.settings(DistConfig(), bound)["local_device_ids"] == []
  shared = {**SLURM, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  assert "local_device_ids" not in distributed.settings(DistConfig(), shared)  # jax's: GPU 3
  with pytest.raises(ConfigError, match="SLURM_LOCALID=3 but CUDA_VISIBLE_DEVICES lists 2 GPUs"):
    distributed.settings(DistConfig(), {**shared, "CUDA_VISIBLE_DEVICES": "0,1"})
  assert "local_device_ids" not in distributed.settings(
    DistConfig(), {**per_node, "JAX_LOCAL_DEVICE_IDS": "0,1"}
  )  # jax reads it
  # a one-task step, or an allocation's shell outside srun, is one process
  assert distributed.settings(DistConfig(), {**SLURM, "SLURM_NTASKS": "1"}, tpu_vm=False) is None
  no_size = {k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_SIZE"}
  assert distributed.settings(DistConfig(), no_size, tpu_vm=False) is None
  no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.settings(DistConfig(), no_step, tpu_vm=False) is None


def test_config_keys_then_jax_variables_take_precedence_over_the_launcher():
  cfg = DistConfig(coordinator="10.1.0.9:7000", process_id=3)
  assert distributed.settings(cfg, SLURM) == {
    "coordinator_address": "10.1.0.9:7000",
    "num_processes": 4,
    "process_id": 3,
    "cluster_detection_method": "slurm",
  }
  # every setting given: the launcher is not consulted at all
  assert distributed.settings(DistConfig(), {**SLURM, **ENV}) == {
    "coordinator_address": "10.0.0.2:8476",
    "num_processes": 4,
    "process_id": 3,
  }
  with pytest.raises(ConfigError, match=r"dist.process_id=4 must be in \[0, SLURM_NTASKS=4\)"):
    distributed.settings(DistConfig(process_id=4), SLURM)
  with pytest.raises(ConfigError, match="SLURM_PROCID='x'"):
    distributed.settings(DistConfig(), {**SLURM, "SLURM_PROCID": "x"})


def slurm_free_port() -> int:
  """A free port that jax's SLURM detection derives from a job id: 61440 + job id mod 4096."""
  for port in range(61440 + os.getpid() % 4000, 65536):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in 61440-65535")


def srun(tmp_path, name, extra=(), job_port=None):
  """Two processes started as `srun --ntasks=2` on one node would start them: SLURM's variables
  and nothing else (no JAX_* variable, no dist.* key unless `extra` gives one). The job id is
  chosen so that jax's detection derives `job_port`, by default a free one."""
  port = job_port or slurm_free_port()
  run_dir, procs = tmp_path / name, []
  for rank in range(2):
    slurm = {
      "SLURM_JOB_ID": str(port - 61440 + 4096 * 7),
      "SLURM_STEP_NODELIST": "localhost",
      "SLURM_STEP_NUM_NODES": "1",
      "SLURM_NTASKS": "2",
      "SLURM_PROCID": str(rank),
      "SLURM_LOCALID": str(rank),
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORD", "JAX_NUM_P"))}
    full_env = {
      **clean,
      **slurm,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "JAX_COMPILATION_CACHE_DIR": str(CACHE),
      "PYTHONUNBUFFERED": "1",
    }
    argv = cli(run_dir, "train.stop_step=3", "dist.init_timeout_s=60", *extra)
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "celerity_jax.main", *argv],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
  return run_dir, outs


def test_two_processes_under_slurm_variables_join_by_jax_detection_and_dist_keys_win(tmp_path):
  run_dir, outs = srun(tmp_path, "detected")
  assert "celerity_jax: 2 processes (started by slurm), 2 devices (1 per process)" in outs[0]
  assert [r[0] for r in losses(run_dir)][-1] == 3
  # the job id's port is taken by another program; dist.coordinator names a free one, and wins
  with socket.socket() as taken, socket.socket() as free:
    taken.bind(("127.0.0.1", slurm_free_port()))
    taken.listen()
    free.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    run_dir, outs = srun(
      tmp_path, "keys", [f"dist.coordinator={coordinator}"], job_port=taken.getsockname()[1]
    )
  assert "celerity_jax: 2 processes (started by slurm), 2 devices" in outs[0]
  assert [r[0] for r in losses(run_dir)][-1] == 3
