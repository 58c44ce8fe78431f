"""Where a multi-process run's settings come from, and the errors for partial or wrong ones."""

import pytest

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
