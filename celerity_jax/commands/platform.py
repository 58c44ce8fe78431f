"""What this process runs with, as one JSON line: what celerity_jax.platform sets before jax loads
(glibc tunables, CPU devices), the PID and arguments (kept by the re-execution), TPU VM or not.

  python -m celerity_jax.commands.platform
"""

import json
import os
import sys

from celerity_jax.platform import CPU_DEVICES, on_cloud_tpu_vm

if __name__ == "__main__":
  print(
    json.dumps(
      {
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "tpu_vm": on_cloud_tpu_vm(),
        "cpu_devices": os.environ.get(CPU_DEVICES, ""),
      }
    )
  )
