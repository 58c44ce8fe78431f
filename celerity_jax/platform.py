"""Facts about the machine that must be known before jax loads (this module never imports jax)."""

from __future__ import annotations

import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor, and so do
# other Google devices (a Compute Engine VM's gVNIC network card is 0x1ae0:0x0042), so the device
# id decides: TPU v3, v4, v5p, v5e, v6e, 7x and an unnamed one, as jax's hardware_utils lists them
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")

# libtpu, when installed (the test extra installs it for compiling to TPU topologies), asks for a
# TPU VM's metadata whenever jax starts, and prints warnings where there is none; these tell it
# there is nothing to find. They are set only off TPU VMs and only where unset. libtpu also takes
# a machine-wide lock file so that two processes never drive the same chips; off a TPU VM there are
# no chips, and the lock would only stop two compile-only processes (celerity_jax.commands.aot)
# running at once.
QUIET_LIBTPU = {
  "TPU_SKIP_MDS_QUERY": "1",
  "TPU_ACCELERATOR_TYPE": "v5litepod-1",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  "TPU_LOG_DIR": "disabled",  # else every jax process writes log files to /tmp/tpu_logs
}


def process_alive(pid: int) -> bool:
  """Whether process `pid` of this machine exists (another user's counts) and is not a zombie (a
  killed process nobody has reaped yet: containers whose init does not reap keep them)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return True
  return state != "Z"


def on_cloud_tpu_vm(sysfs: Path = Path("/sys/bus/pci/devices")) -> bool:
  """A TPU chip is attached: a Google PCI device with a TPU device id."""
  try:
    return any(
      (d / "vendor").read_text().strip() == GOOGLE_PCI_VENDOR
      and (d / "device").read_text().strip() in TPU_PCI_DEVICES
      for d in sysfs.iterdir()
    )
  except OSError:
    return False


def quiet_libtpu_off_tpu(environ=None, tpu_vm: bool | None = None):
  environ = os.environ if environ is None else environ
  if tpu_vm is None:
    tpu_vm = on_cloud_tpu_vm()
  if not tpu_vm:
    for key, value in QUIET_LIBTPU.items():
      environ.setdefault(key, value)


# XLA's CPU runtime allocates its large buffers with malloc, which glibc serves with fresh mmap'd
# pages and unmaps on free: every step pays a page fault per 4 KiB of every activation it writes
# (measured: an 87 MB elementwise op took 48 ms, 5.5 ms in a reused buffer). With transparent huge
# pages for malloc (glibc >= 2.35), faults are per 2 MiB. Since microbatches fit the cache
# (execution.cache_split) the default step's buffers are small and it gains nothing (1.00x); a ~20M
# step gains 1.07x (docs/results.md, "CPU speed measures"). glibc reads its tunables only at process
# start, so a command's entry point re-executes it once with them set (prepare_command).
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "CELERITY_JAX_NO_HUGEPAGES"


def wants_hugepages(environ, system: str, libc: tuple[str, str], thp_mode: str) -> bool:
  """Whether to re-execute with glibc's huge-page tunable: Linux with glibc >= 2.35, transparent
  huge pages not off, the tunable not already set, and no opt-out."""
  if system != "Linux" or libc[0] != "glibc" or environ.get(OPT_OUT):
    return False
  try:
    version = tuple(int(p) for p in libc[1].split(".")[:2])
  except ValueError:
    return False
  return (
    version >= (2, 35)
    and "[never]" not in thp_mode
    and "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", "")
  )


def reexec_with_hugepages(environ=None):  # (python -m celerity_jax.commands.platform shows it)
  """Re-executes this process (same command line, same PID) with HUGEPAGE_TUNABLE appended to
  GLIBC_TUNABLES when wants_hugepages says so; returns where it does not."""
  import platform as host
  import sys

  environ = os.environ if environ is None else environ
  try:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    thp = "[never]"
  if not wants_hugepages(environ, host.system(), host.libc_ver(), thp):
    return
  tunables = environ.get("GLIBC_TUNABLES", "")
  environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
  environ[OPT_OUT] = "1"  # set for the new image, so it never re-executes again
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)


# XLA's CPU backend is one device by default, and it splits each op over every core with a wait
# at its end; at this project's CPU shapes most ops are small and those waits dominate. With one
# CPU device per core the step runs data-parallel, each core on its own rows: the default step is
# 1.6x faster on 2 cores (docs/results.md). B then rounds to a multiple of the cores, as on any
# mesh.
CPU_DEVICES = "JAX_NUM_CPU_DEVICES"
MULTI_PROCESS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def cpu_devices_wanted(environ, argv, cores: int) -> int | None:
  """One CPU device per core for a command, or None to leave jax's choice: the user set a count
  (JAX_NUM_CPU_DEVICES or XLA's --xla_force_host_platform_device_count), or this is one process
  of several (each would claim every core)."""
  if CPU_DEVICES in environ or "xla_force_host_platform_device_count" in environ.get(
    "XLA_FLAGS", ""
  ):
    return None
  if any(k in environ for k in MULTI_PROCESS) or any(a.startswith("dist.") for a in argv):
    return None
  return cores if cores > 1 else None


def one_cpu_device_per_core(environ=None):
  """Sets JAX_NUM_CPU_DEVICES for this process (and its re-executed image) when
  cpu_devices_wanted says so; jax reads it when it loads."""
  import sys

  environ = os.environ if environ is None else environ
  wanted = cpu_devices_wanted(environ, sys.argv[1:], len(os.sched_getaffinity(0)))
  if wanted:
    environ[CPU_DEVICES] = str(wanted)


def command_module(argv=None) -> str:
  """The module this process runs as `python -m MODULE ...`, or "" (a script, `-c`, a notebook's
  kernel is `-m ipykernel_launcher`). Read from the interpreter's own command line: while `-m`
  imports the module's packages, the module that will be __main__ is not yet known any other way."""
  import sys

  argv = sys.orig_argv if argv is None else argv
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("-m"):
      return arg[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
    if arg in ("-X", "-W"):  # options that take a value
      i += 1
    elif not arg.startswith("-") or arg.startswith("-c"):
      return ""  # a script or `-c` came first
    i += 1
  return ""


def prepare_command():
  """What a command's entry point does first, before jax loads: one CPU device per core, then the
  re-execution with huge pages. Only entry points call it (main, the commands package, tools/);
  importing celerity_jax in a notebook or a script changes nothing."""
  quiet_libtpu_off_tpu()
  one_cpu_device_per_core()
  reexec_with_hugepages()
