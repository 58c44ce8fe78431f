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
# no chips, and the lock would only stop two compile-only processes (celerity_jax.tools.aot) running
# at once.
QUIET_LIBTPU = {
  "TPU_SKIP_MDS_QUERY": "1",
  "TPU_ACCELERATOR_TYPE": "v5litepod-1",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


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
