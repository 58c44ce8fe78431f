"""One run owns a run directory: a second run started on it, alone or at the same moment, is
refused in one line and changes nothing; a lock left by a killed run or a machine that is gone is
taken over; a signal after the last checkpoint never kills a finished run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_checkpoint import cli
from test_checkpoint import subprocess_env as env

from celerity_jax import run_lock
from celerity_jax.main import main


def command(run_dir, *extra):
  return [
    sys.executable,
    "-m",
    "celerity_jax.main",
    *cli(run_dir, "checkpoint.every_steps=10", *extra),
  ]


def steps_logged(run_dir):
  rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "event" not in r]


def test_a_second_run_on_a_busy_run_dir_is_refused_and_changes_nothing(tmp_path):
  run_dir = tmp_path / "run"
  first = subprocess.Popen(
    command(run_dir, "scaling.tpp=2"), env=env(), stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 120
  while not (run_dir / "metrics.jsonl").exists() or not steps_logged(run_dir):
    assert first.poll() is None and time.time() < deadline, first.stderr.read()
    time.sleep(0.05)
  second = subprocess.run(command(run_dir), env=env(), capture_output=True, text=True, timeout=120)
  assert second.returncode == 2, second.stderr[-2000:]
  assert second.stderr.count("\n") == 1 and "is in use by another run" in second.stderr
  assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  logged = steps_logged(run_dir)
  assert logged == sorted(set(logged)) == list(range(1, logged[-1] + 1))  # no step twice
  assert not (run_dir / run_lock.NAME).exists()  # released at the end


def test_of_two_runs_started_together_one_trains_and_the_other_is_refused(tmp_path):
  run_dir = tmp_path / "run"
  both = [
    subprocess.Popen(command(run_dir), env=env(), stderr=subprocess.PIPE, text=True)
    for _ in range(2)
  ]
  results = [(p.wait(timeout=300), p.stderr.read()) for p in both]
  assert sorted(code for code, _ in results) == [0, 2], results
  refused = next(err for code, err in results if code == 2)
  assert "in use by another run" in refused or "took it at the same moment" in refused
  assert "Traceback" not in refused
  assert steps_logged(run_dir) == list(range(1, steps_logged(run_dir)[-1] + 1))


def test_a_killed_runs_lock_is_taken_over_on_this_machine(tmp_path, capsys):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = run_lock.RunLock(run_dir)
  record = {**lock.owner, "pid": dead.pid, "start": "1", "heartbeat": time.time()}
  (run_dir / run_lock.NAME).write_text(json.dumps(record))
  assert main(command(run_dir, "train.stop_step=3")[3:]) == 0
  assert "taking over the lock of a run that is gone" in capsys.readouterr().err


def test_another_machines_lock_is_waited_out_if_silent_and_refused_if_alive(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.2)
  monkeypatch.setattr(run_lock, "STALE_S", 1.0)
  elsewhere = {"host": "elsewhere", "boot": "b", "pid": 1, "token": "t", "start": ""}
  (tmp_path / run_lock.NAME).write_text(json.dumps({**elsewhere, "heartbeat": time.time()}))
  start = time.monotonic()
  taken = run_lock.RunLock(tmp_path)
  taken.acquire()  # silent for STALE_S: gone
  assert 0.9 < time.monotonic() - start < 5
  taken.release()
  assert not (tmp_path / run_lock.NAME).exists()

  # a live run elsewhere: its heartbeat moves on while we watch
  other = run_lock.RunLock(tmp_path)
  other.owner = {**other.owner, "host": "elsewhere", "boot": "b"}
  other.acquire()
  with pytest.raises(run_lock.RunDirInUse, match="in use by another run .host elsewhere"):
    run_lock.RunLock(tmp_path).acquire()
  # and a run whose lock was taken while it was frozen finds out and stops
  other._stop.set()
  other._thread.join()
  time.sleep(1.2)
  thief = run_lock.RunLock(tmp_path)
  thief.acquire()
  assert other._write(other.generation) is False  # its heartbeat can no longer write
  other.lost = True
  with pytest.raises(run_lock.RunDirInUse, match="was taken over by another run"):
    other.check()
  thief.release()


def test_the_lock_holds_on_cloud_storage(gcs):
  """The emulator honours the conditional writes the lock is made of, as Cloud Storage does."""
  from gcs_emulator import gs

  url = gs("locked_run")
  first = run_lock.RunLock(url)
  first.acquire()
  with pytest.raises(run_lock.RunDirInUse, match=f"pid {os.getpid()}"):
    run_lock.RunLock(url).acquire()
  first.release()
  again = run_lock.RunLock(url)
  again.acquire()
  again.release()


def test_sigterm_after_the_last_checkpoint_exits_with_the_runs_status(tmp_path):
  """A signal during the last second of a finished run (teardown, interpreter exit) neither kills
  it with status 143 nor loses anything: babysit reads it as finished."""
  run_dir = tmp_path / "run"
  proc = subprocess.Popen(
    command(run_dir, "train.stop_step=12"), env=env(), stderr=subprocess.PIPE, text=True
  )
  for line in proc.stderr:
    if line.startswith("celerity_jax: done at step"):
      break
  sent = 0
  while proc.poll() is None:  # from the summary to the process's very end
    proc.send_signal(signal.SIGTERM)
    sent += 1
    time.sleep(0.01)
  rest = proc.stderr.read()
  assert proc.returncode == 0 and sent >= 1, rest[-2000:]
  assert "Traceback" not in rest


def test_a_refused_run_leaves_no_run_dir_behind(tmp_path):
  """A run refused before it starts does not leave the directory it made (usage.md)."""
  refused = subprocess.run(
    command(tmp_path / "new" / "run", "data.corpus=stdlib", "data.paths=/nonexistent.txt"),
    env=env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert refused.returncode == 3 and "nonexistent.txt" in refused.stderr
  assert not (tmp_path / "new").exists()


def test_hostname_is_what_the_lock_names():
  assert run_lock.RunLock(".").owner["host"] == socket.gethostname()
