"""Decisions every process of a run takes at the same step: stop (SIGTERM or SIGINT reached any
process) and save now (`checkpoint.every_minutes` elapsed on any process's clock).

Each step, every process puts its local flags on its own devices and a tiny jitted reduction
dispatches their OR over the whole mesh. The loop fetches the result with the step's metrics, one
step late, so no process waits for it, and every process reads the same value and acts on it at
the same step. (Halts on non-finite losses or a collapse alert need no vote: they follow from the
step's metrics, which are replicated, so every process already sees the same values.)

A run of one process takes no vote: its flags are the decision. Besides being needless there, the
reduction would cost time on a CPU mesh of several devices, where dispatching a computation waits
for the one before it to finish: the vote dispatched after step k held the host until step k had
finished, and the devices idled while the host then prepared step k+1 (8% of the default run's
loop, docs/results.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from celerity_jax import sharding

STOP = 1
SAVE = 2


class Agreement:
  def __init__(self, mesh: Mesh):
    self._sharding = NamedSharding(mesh, P(sharding.MESH_AXES))  # one element per device
    self._shape = (mesh.devices.size,)
    self._local = len(mesh.local_devices)
    self._alone = jax.process_count() == 1
    self._votes: dict[int, jax.Array] = {}
    self._reduce = jax.jit(
      lambda v: jnp.max(v & STOP) | jnp.max(v & SAVE), out_shardings=NamedSharding(mesh, P())
    )

  def vote(self, flags: int) -> jax.Array:
    """Dispatches the OR of every process's `flags` (STOP | SAVE bits); returns it unfetched (a
    process alone returns its own flags)."""
    if self._alone:
      return np.int32(flags)
    if flags not in self._votes:  # inputs are never donated, so each one can be reused
      local = np.full((self._local,), flags, np.int32)
      self._votes[flags] = jax.make_array_from_process_local_data(
        self._sharding, local, self._shape
      )
    return self._reduce(self._votes[flags])
