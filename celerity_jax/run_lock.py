"""One run owns a run directory: run.dir/lock.json names its owner, taken and kept by conditional
writes, on a disk or on Cloud Storage alike.

The owner (process 0 of a run) writes lock.json only if it is absent, or still the stale lock it
read (tensorstore's `if_equal`: a generation match on Cloud Storage, an atomic compare on disk),
so of two runs started together one wins; a thread rewrites it every HEARTBEAT_S seconds under the
same condition, and a run that finds it was taken over stops without saving. A lock is stale, and
is taken over with a warning, when its owner is known to be gone: on this machine (same boot), its
process no longer exists; elsewhere, its heartbeat is STALE_S seconds old. A fresh heartbeat from
another machine is watched for up to STALE_S: if it moves on, the run is alive and this start is
refused; if not, the lock is stale once it is old enough (a pod relaunched after its VMs were
lost waits at most that long).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import tensorstore as ts

from celerity_jax import platform, storage
from celerity_jax.config import ConfigError

NAME = "lock.json"
HEARTBEAT_S = 20.0
STALE_S = 120.0


class RunDirInUse(ConfigError):
  """Another live run owns run.dir (exit 2)."""


def _boot_id() -> str:
  try:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return ""


def _start_time(pid: int) -> str:
  """The process's start time in clock ticks since boot (Linux), which tells a pid reused by
  another process from the one that wrote the lock; "" where it cannot be read."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive_here(owner: dict) -> bool:
  pid = int(owner.get("pid", -1))
  return pid > 0 and platform.process_alive(pid) and _start_time(pid) == owner.get("start", "")


class RunLock:
  """acquire() before a run writes to its directory, release() when it ends; `lost` turns true if
  another run took the directory over (this one's heartbeat was missing for STALE_S)."""

  def __init__(self, run_dir):
    self.run_dir = storage.location(run_dir)
    self.kv = ts.KvStore.open(storage.kvstore_url(self.run_dir)).result()
    self.owner = {
      "host": socket.gethostname(),
      "boot": _boot_id(),
      "pid": os.getpid(),
      "start": _start_time(os.getpid()),
      "token": uuid.uuid4().hex,
      "command": " ".join(sys.argv)[:500],
    }
    self.generation: bytes | None = None
    self.lost = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def describe(self, owner: dict) -> str:
    age = time.time() - float(owner.get("heartbeat", 0))
    return f"host {owner.get('host')} pid {owner.get('pid')}, last heartbeat {age:.0f} s ago"

  def acquire(self):
    """Takes the lock, waiting out another machine's lock whose heartbeat has stopped (at most
    STALE_S); raises RunDirInUse when a live run holds it."""
    watched, since = None, time.monotonic()
    while True:
      read = self.kv.read(NAME).result()
      owner = _parse(read.value) if read.state == "value" else None
      if owner is not None and self._here(owner):
        if _alive_here(owner):
          raise self._in_use(owner)
      elif owner is not None and time.time() - float(owner.get("heartbeat", 0)) <= STALE_S:
        if watched is not None and _beat_of(owner) != _beat_of(watched):
          raise self._in_use(owner)  # its heartbeat moved on: that run is alive
        if watched is None:
          watched, since = owner, time.monotonic()
        if time.monotonic() - since <= STALE_S:  # (our own clock: theirs may be off)
          time.sleep(HEARTBEAT_S / 2)
          continue
      if read.state == "value":
        print(
          f"celerity_jax: warning: run.dir {self.run_dir}: taking over the lock of a run that "
          f"is gone ({self.describe(owner) if owner else 'unreadable lock file'})",
          file=sys.stderr,
        )
      if not self._write(read.stamp.generation):
        raise RunDirInUse(
          f"run.dir {self.run_dir}: another run took it at the same moment; stop it first, or "
          f"use another run.dir"
        )
      break
    self._thread = threading.Thread(target=self._beat, name="celerity-run-lock", daemon=True)
    self._thread.start()

  def _here(self, owner: dict) -> bool:
    """Written by a process of this machine since its last boot (its pid can be checked)."""
    return owner.get("host") == self.owner["host"] and owner.get("boot") == self.owner["boot"]

  def _in_use(self, owner: dict) -> RunDirInUse:
    return RunDirInUse(
      f"run.dir {self.run_dir} is in use by another run ({self.describe(owner)}; its lock is "
      f"{self.run_dir / NAME}); stop that run first, or use another run.dir"
    )

  def _write(self, if_equal: bytes) -> bool:
    record = {**self.owner, "heartbeat": time.time()}
    stamp = self.kv.write(NAME, json.dumps(record, indent=1).encode(), if_equal=if_equal).result()
    if not stamp.generation:
      return False
    self.generation = stamp.generation
    return True

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if not self._write(self.generation):
          self.lost = True
          return
      except Exception:  # a failed write (a full disk, a network hiccup): try again next beat
        pass

  def release(self):
    """Stops the heartbeat and deletes lock.json, if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.generation is not None and not self.lost:
      try:
        self.kv.write(NAME, None, if_equal=self.generation).result()
      except Exception:  # the next run takes it over as stale
        pass
    self.generation = None

  def check(self):
    """Raises once another run has taken the directory over: this one must not write to it."""
    if self.lost:
      owner = _parse(self.kv.read(NAME).result().value) or {}
      raise RunDirInUse(
        f"run.dir {self.run_dir} was taken over by another run ({self.describe(owner)}) while "
        f"this one's heartbeat was late; stopping without saving"
      )


def _beat_of(owner: dict) -> tuple:
  return owner.get("token"), owner.get("heartbeat")


def _parse(value: bytes) -> dict | None:
  try:
    owner = json.loads(value)
  except ValueError:
    return None
  return owner if isinstance(owner, dict) else None
