"""SIGTERM and SIGINT, from the first second of a run to its last.

The CLI installs the guard before it imports anything heavy. Until the loop's first step has run
(imports, store build, restore, compile), a signal means there is nothing new to save: every file
written so far is written atomically, and the state is either fresh or already in a checkpoint. The
process then exits at once with status 0 and one line, even while the main thread is inside a long
C++ call such as an XLA compile: TPU maintenance events and spot preemptions give about 30 s, which
a compile can outlast. A watcher thread makes that possible: Python runs signal handlers only
between bytecodes of the main thread, but the C-level handler writes each signal number to
`signal.set_wakeup_fd` at once, and the watcher reads it there.

Once training, the first signal asks the loop to finish its step, checkpoint and exit; a second
aborts at once (status 128 + signal). Once the run has saved its last checkpoint (`ended`), a
signal has nothing left to stop: it is noted and the process exits as it was going to, with the
run's status. A command's process ignores the signals from then on until it exits
(`guarded(linger=True)`), so a SIGTERM in its last second never kills it with the default handler
(status 143), which a pod's babysitter would read as a preemption.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_current: PreemptionGuard | None = None


class PreemptionGuard:
  def __init__(self):
    self.signal: int | None = None
    self._training = False
    self._ended = False
    self._previous: dict = {}
    self._previous_fd = -1
    self._pipe: tuple[int, int] | None = None

  def training(self):
    """The loop has run a step: from now on a signal saves a checkpoint before exiting."""
    self._training = True

  def ended(self):
    """The run has saved its last checkpoint (or failed): nothing is left for a signal to stop."""
    self._ended = True

  def _on_signal(self, signum: int):
    if self._ended:
      _say(f"celerity_jax: signal {signum} after the run ended: nothing to stop; exiting")
      return
    if not self._training:
      _say(
        f"celerity_jax: signal {signum} before the first step: nothing to save (a resume "
        f"starts from the last checkpoint, if any); run the same command to start again"
      )
      os._exit(0)
    if self.signal is not None:
      _say(f"celerity_jax: second signal {signum}: aborting without saving")
      os._exit(128 + signum)
    self.signal = signum
    _say(
      f"celerity_jax: signal {signum}: finishing this step and saving a checkpoint "
      f"(send it again to abort at once)"
    )

  def _watch(self, read_fd: int):
    while data := os.read(read_fd, 64):  # empty: the write end was closed (uninstalled)
      for signum in data:
        if signum in SIGNALS:
          self._on_signal(signum)
    os.close(read_fd)

  def install(self) -> bool:
    """Takes over SIGTERM and SIGINT; only the main thread can (elsewhere: returns False)."""
    if threading.current_thread() is not threading.main_thread():
      return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._pipe = (read_fd, write_fd)
    threading.Thread(
      target=self._watch, args=(read_fd,), name="celerity-signals", daemon=True
    ).start()
    for sig in SIGNALS:  # a Python handler must exist for the wakeup fd to fire;
      self._previous[sig] = signal.signal(sig, lambda *_: None)  # the watcher does the work
    self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    return True

  def uninstall(self):
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._previous_fd)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    os.close(self._pipe[1])  # ends the watcher, which closes the read end
    self._pipe = None


def _say(text: str):
  print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def guarded(linger: bool = False):
  """The process's guard for the block: installed here unless an outer block (the CLI, first
  thing) already did. `linger`: after the block the guard stays, ended, until the process exits
  (for a command's own process; a caller in a test or a notebook gets its handlers back)."""
  global _current
  if _current is not None:
    yield _current
    return
  guard = PreemptionGuard()
  installed = guard.install()
  _current = guard if installed else None
  try:
    yield guard
  finally:
    if installed and linger:
      guard.ended()
      for sig in SIGNALS:  # ignored, not handled: Python resets handled signals to the default
        signal.signal(sig, signal.SIG_IGN)  # (death) while the interpreter shuts down
    elif installed:
      guard.uninstall()
      _current = None
