"""Preemption: SIGTERM or SIGINT asks the loop to finish its step, checkpoint and exit; a second
signal aborts at once. TPU maintenance events and spot/preemptible VMs deliver SIGTERM with a grace
period (about 30 s on GCE); the loop's save-and-wait needs one step plus the host copy of the state.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


class PreemptionGuard:

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:
      print(f"celerity_jax: second signal {signum}: aborting without saving", file=sys.stderr)
      os._exit(128 + signum)
    self.signal = signum
    print(f"celerity_jax: signal {signum}: finishing this step and saving a checkpoint "
          f"(send it again to abort at once)", file=sys.stderr)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
