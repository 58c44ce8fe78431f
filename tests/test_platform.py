"""A celerity_jax command (the training entry point, an installed command, a tool) re-executes
itself once with glibc's huge-page malloc tunable (1.07x faster CPU steps at ~20M) and gets one CPU
device per core; library imports, notebooks and pytest never do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celerity_jax import platform

GLIBC = ("glibc", "2.36")
THP = "always [madvise] never"


@pytest.mark.parametrize(
  "argv,want",
  [
    (["python", "-m", "celerity_jax.main", "recipe=celerity_tiny"], "celerity_jax.main"),
    (
      ["python", "-X", "dev", "-mcelerity_jax.commands.sample", "run"],
      "celerity_jax.commands.sample",
    ),
    (["python", "-u", "-m", "tools.bench_step"], "tools.bench_step"),
    (["python", "-m", "pytest", "tests"], "pytest"),
    (["python", "script.py", "-m", "celerity_jax.main"], ""),
    (["python", "-c", "import celerity_jax"], ""),
    (["python"], ""),
  ],
)
def test_command_module_reads_the_interpreter_command_line(argv, want):
  assert platform.command_module(argv) == want


def test_the_training_entry_point_prepares_the_process_before_jax_loads():
  """main.py calls prepare_command under __main__ after its imports: they must not load jax, or
  the CPU device count would be read before it is set."""
  probe = "import sys, celerity_jax.main; sys.stdout.write(str('jax' in sys.modules))"
  assert (
    subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout == "False"
  )


@pytest.mark.parametrize(
  "environ,system,libc,thp,want",
  [
    ({}, "Linux", GLIBC, THP, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "Linux", GLIBC, THP, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "Linux", GLIBC, THP, False),  # user's choice
    ({platform.OPT_OUT: "1"}, "Linux", GLIBC, THP, False),
    ({}, "Linux", ("glibc", "2.31"), THP, False),  # no hugetlb tunable before 2.35
    ({}, "Linux", ("", ""), THP, False),  # musl
    ({}, "Darwin", ("", ""), THP, False),
    ({}, "Linux", GLIBC, "always madvise [never]", False),
  ],
)
def test_wants_hugepages(environ, system, libc, thp, want):
  assert platform.wants_hugepages(environ, system, libc, thp) is want


def test_a_command_runs_with_the_tunable_and_keeps_its_arguments_and_pid():
  import platform as host

  if not platform.wants_hugepages({}, host.system(), host.libc_ver(), _thp()):
    pytest.skip("this machine has no glibc huge-page tunable")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", platform.OPT_OUT)}
  env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"  # a user's own tunables are kept
  cmd = [sys.executable, "-m", "celerity_jax.commands.platform", "a b", "--flag"]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate(timeout=120)
  facts = json.loads(out)
  assert proc.returncode == 0
  assert facts["glibc_tunables"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert facts["pid"] == proc.pid  # exec, not a child process: signals reach the run
  assert facts["argv"] == ["a b", "--flag"]
  env[platform.OPT_OUT] = "1"
  facts = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True).stdout)
  assert facts["glibc_tunables"] == "glibc.malloc.arena_max=4"


@pytest.mark.parametrize(
  "environ,argv,cores,want",
  [
    ({}, [], 2, 2),  # one device per core
    ({}, ["recipe=celerity_tiny"], 16, 16),
    ({}, [], 1, None),  # one core: jax's default is that already
    ({"JAX_NUM_CPU_DEVICES": "1"}, [], 8, None),  # the user's count stands
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, [], 2, None),
    ({"JAX_NUM_PROCESSES": "2"}, [], 8, None),  # one process of several shares the cores
    ({}, ["dist.num_processes=2"], 8, None),
  ],
)
def test_cpu_devices_wanted(environ, argv, cores, want):
  assert platform.cpu_devices_wanted(environ, argv, cores) == want


def test_a_command_gets_one_cpu_device_per_core_and_a_library_import_does_not():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  probe = "import sys, jax; sys.stdout.write(str(jax.device_count()))"
  cores = len(os.sched_getaffinity(0))
  facts = subprocess.run(
    [sys.executable, "-m", "celerity_jax.commands.platform"],
    env=env,
    capture_output=True,
    text=True,
  )
  assert json.loads(facts.stdout)["cpu_devices"] == (str(cores) if cores > 1 else "")
  library = subprocess.run(
    [sys.executable, "-c", "import celerity_jax; " + probe], env=env, capture_output=True, text=True
  )
  assert library.stdout == "1"  # notebooks and scripts keep jax's own default


def _thp() -> str:
  try:
    return open("/sys/kernel/mm/transparent_hugepage/enabled").read()
  except OSError:
    return "[never]"


def test_libtpu_writes_no_logs_on_a_machine_without_tpus():
  """With libtpu installed (the test extra), every jax process used to leave log files in
  /tmp/tpu_logs, named with its pid; one that imports celerity_jax first leaves none."""
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
  probe = subprocess.run(
    [sys.executable, "-c", "import os, celerity_jax, jax; jax.devices(); print(os.getpid())"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  pid = probe.stdout.strip()
  logs = Path("/tmp/tpu_logs")
  assert (sorted(logs.glob(f"*.{pid}")) if logs.exists() else []) == []
