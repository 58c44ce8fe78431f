"""Starting a run that spans several processes (jax.distributed), before jax touches a device.

Where the settings come from, first match wins, key by key:
1. `dist.coordinator`, `dist.num_processes`, `dist.process_id` (config keys), each falling back to
   JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
2. a launcher that started this process as one of several: a SLURM step (`srun`, SLURM_NTASKS > 1)
   or Open MPI's `mpirun` (OMPI_COMM_WORLD_SIZE > 1). jax's own cluster detection reads it: the
   process count and rank from the launcher's variables, the coordinator from the first node of
   the step (port: JAX_COORDINATOR_PORT, else one derived from the job id); with several
   processes per node each drives one GPU, its local rank's (local_devices: every GPU it sees
   when it is one per node or the launcher bound one GPU to it);
3. on a Cloud TPU VM with none of those set, jax reads the workers from the TPU metadata;
4. otherwise the run is one process and nothing is initialized.

A process that dies is noticed by the coordination service's heartbeat: every other process is
terminated by jax within `dist.heartbeat_timeout_s` (exit by SIGABRT, with jax's line "the JAX
distributed service detected fatal errors ... another task died"), so a pod never hangs on a dead
worker's collective.
"""

from __future__ import annotations

import os
import sys

import jax

from celerity_jax.config import ConfigError
from celerity_jax.platform import on_cloud_tpu_vm

# what each launcher sets in every process it starts: (the variables jax's detection needs, the
# process count's variable, the rank's variable)
LAUNCHERS = {
  "slurm": (
    ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "SLURM_NTASKS",
    "SLURM_PROCID",
  ),
  "ompi": (("OMPI_MCA_orte_hnp_uri",), "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
}


def launcher(environ) -> str | None:
  """'slurm' or 'ompi' when that launcher started this process as one of several, else None."""
  for name, (needed, count, _) in LAUNCHERS.items():
    processes = environ.get(count, "1").strip()
    if all(v in environ for v in needed) and processes.isdigit() and int(processes) > 1:
      return name
  return None


def one_process_per_node(name: str, environ) -> bool:
  if name == "slurm":
    return environ.get("SLURM_STEP_NUM_NODES") == environ["SLURM_NTASKS"]
  return environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"


def local_devices(name: str, environ) -> list[int] | None:
  """local_device_ids for a launcher's processes. None keeps jax's rule: the process of local rank
  r drives GPU r of those it sees, right when each process sees all of its node's GPUs. [] (every
  GPU it sees) where that rule would pick one GPU of several or a GPU it cannot see: one process
  per node, or a launcher that bound one GPU to each process (`--gpus-per-task=1`, CUDA_VISIBLE_
  DEVICES of one GPU; jax issues 16788, 23452, 28194)."""
  if "JAX_LOCAL_DEVICE_IDS" in environ:
    return None  # jax reads it
  if one_process_per_node(name, environ):
    return []
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) == 1:
    return []
  rank_var = "SLURM_LOCALID" if name == "slurm" else "OMPI_COMM_WORLD_LOCAL_RANK"
  rank = environ.get(rank_var, "0")
  if visible and rank.isdigit() and int(rank) >= len(visible):
    raise ConfigError(
      f"{rank_var}={rank} but CUDA_VISIBLE_DEVICES lists {len(visible)} GPUs: start one process "
      f"per GPU, or set JAX_LOCAL_DEVICE_IDS for each process"
    )
  return None


def settings(dist_cfg, environ=None, tpu_vm: bool | None = None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, {} for the TPU metadata, or None for a
  single process. Raises ConfigError naming the key (and environment variable) that is missing
  or wrong."""
  environ = os.environ if environ is None else environ

  def pick(key: str, value, unset, env: str):
    if value != unset:
      return value, f"dist.{key}"
    return environ.get(env), env

  address, address_from = pick("coordinator", dist_cfg.coordinator, "", "JAX_COORDINATOR_ADDRESS")
  count, count_from = pick("num_processes", dist_cfg.num_processes, 0, "JAX_NUM_PROCESSES")
  rank, rank_from = pick("process_id", dist_cfg.process_id, -1, "JAX_PROCESS_ID")
  found = launcher(environ) if None in (address, count, rank) else None
  if found:  # the launcher fills what is unset; jax's detection finds the coordinator
    _, count_var, rank_var = LAUNCHERS[found]
    if count is None:
      count, count_from = environ[count_var], count_var
    if rank is None:
      rank, rank_from = environ.get(rank_var), rank_var
  elif address is None and count is None and rank is None:
    on_tpu = on_cloud_tpu_vm() if tpu_vm is None else tpu_vm
    return {} if on_tpu else None
  missing = [
    name
    for name, value, needed in (
      ("dist.coordinator or JAX_COORDINATOR_ADDRESS", address, not found),
      ("dist.num_processes or JAX_NUM_PROCESSES", count, True),
      ("dist.process_id or JAX_PROCESS_ID", rank, True),
    )
    if value is None and needed
  ]
  if missing:
    raise ConfigError(f"a multi-process run needs {', '.join(missing)} as well")
  if address is not None:
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"{address_from}={address!r}: expected host:port of process 0")
  try:
    count, rank = int(count), int(rank)
  except ValueError:
    raise ConfigError(f"{count_from}={count!r} and {rank_from}={rank!r} must be integers") from None
  if count < 1 or not 0 <= rank < count:
    raise ConfigError(f"{rank_from}={rank} must be in [0, {count_from}={count})")
  kwargs = {"num_processes": count, "process_id": rank}
  if address is not None:
    kwargs["coordinator_address"] = str(address)
  if found:
    kwargs["cluster_detection_method"] = found
    if (devices := local_devices(found, environ)) is not None:
      kwargs["local_device_ids"] = devices
  return kwargs


def initialize(dist_cfg) -> None:
  """Joins the other processes of a multi-process run; does nothing for a single process."""
  kwargs = settings(dist_cfg)
  if kwargs is None:
    return
  # CPU processes exchange collectives over gloo (TCP); other platforms ignore the setting
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # SIGTERM is handled by the training loop and agreed on by all processes (train/control.py)
  jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(
    **kwargs,
    initialization_timeout=dist_cfg.init_timeout_s,
    heartbeat_timeout_seconds=dist_cfg.heartbeat_timeout_s,
  )
  if jax.process_index() == 0:
    via = (
      f" (started by {kwargs['cluster_detection_method']})"
      if "cluster_detection_method" in kwargs
      else ""
    )
    print(
      f"celerity_jax: {jax.process_count()} processes{via}, {jax.device_count()} devices "
      f"({jax.local_device_count()} per process)",
      file=sys.stderr,
    )


def is_primary() -> bool:
  """Process 0 writes the run's files (config, metrics, TensorBoard, diagnostics) and the progress
  bar; every process takes part in checkpoint saves and restores."""
  return jax.process_index() == 0
