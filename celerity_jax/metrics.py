"""Run outputs: metrics.jsonl rows and events, TensorBoard scalars, a tokens/s progress bar.

Both files are appended through `storage.append`, on disk or on Cloud Storage. On Cloud Storage
every append is a few requests, so rows are sent in batches every `REMOTE_FLUSH_SECONDS` and at
every `flush()` (the loop flushes before each checkpoint: a resume never misses a row).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm

from celerity_jax import storage

REMOTE_FLUSH_SECONDS = 15


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them readable
  return value


class MetricsWriter:
  """Appends rows to run_dir/metrics.jsonl (one JSON object per line) and mirrors scalars to
  TensorBoard. Rows with an `event` key are run events (start, restart, ...), not step metrics.
  Disabled (every call a no-op) on all but process 0."""

  def __init__(self, run_dir, tensorboard: bool, enabled: bool = True):
    self.path = run_dir / "metrics.jsonl"
    self.enabled = enabled
    self.unsent: list[str] = []
    self.send_every = REMOTE_FLUSH_SECONDS if storage.is_remote(run_dir) else 0.0
    self.last_sent = time.monotonic()
    self.tb = None
    if enabled:  # a run killed inside an append left its staged bytes beside the files
      for directory in (run_dir, run_dir / "tb"):
        storage.remove_append_tails(directory)
    if tensorboard and enabled:
      from tensorboardX import SummaryWriter, record_writer

      record_writer.register_writer_factory("gs", _AppendingRecordFactory())
      self.tb = SummaryWriter(os.fspath(run_dir / "tb"), flush_secs=self.send_every or 120)

  def row(self, row: dict):
    if not self.enabled:  # not process 0 of a multi-process run
      return
    self.unsent.append(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    if time.monotonic() - self.last_sent >= self.send_every:
      self._send()
    if self.tb is not None and "step" in row and "event" not in row:
      for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
          self.tb.add_scalar(key, value, row["step"])

  def _send(self):
    storage.append(self.path, "".join(self.unsent))
    self.unsent, self.last_sent = [], time.monotonic()

  def flush(self):
    """Every row so far is in metrics.jsonl and every scalar in TensorBoard's file."""
    if self.enabled:
      self._send()
    if self.tb is not None:
      self.tb.flush()

  def close(self):
    self.flush()
    if self.tb is not None:
      self.tb.close()


def keep_rows_until(path, step: int):
  """On resume (process 0): forgets the rows logged after the restored `step`, events included
  (they are about to be logged again), and lines a crash cut short or garbled (warned about,
  never fatal); the complete rows up to `step` stay as they were."""
  if not path.exists():
    return
  kept, unreadable, later = [], 0, 0
  for line in path.read_bytes().split(b"\n"):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
      row_step = row.get("step", 0) if isinstance(row, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
      row_step = None
    if not isinstance(row_step, (int, float)):
      unreadable += 1
    elif row_step > step:
      later += 1
    else:
      kept.append(line.decode("utf-8") + "\n")
  if unreadable:
    print(
      f"celerity_jax: warning: {path}: dropped {unreadable} unreadable line(s) (a write cut "
      f"short by a crash?); the complete rows are kept",
      file=sys.stderr,
    )
  if unreadable or later:
    storage.write_atomic(path, "".join(kept))


class _AppendingRecordFactory:
  """tensorboardX's writers for gs:// paths: bytes are appended through storage.append when
  TensorBoard flushes (its own gs:// writer re-uploads the whole file on every flush)."""

  def open(self, path):
    return _AppendingRecordWriter(path)

  def directory_check(self, path):
    pass  # Cloud Storage has no directories to create


class _AppendingRecordWriter:
  def __init__(self, path):
    self.path, self.buffer = storage.location(path), bytearray()

  def write(self, data: bytes):
    self.buffer += data

  def flush(self):
    data, self.buffer = bytes(self.buffer), bytearray()
    storage.append(self.path, data)

  def close(self):
    self.flush()


class Throughput:
  """Tokens/s between consecutive fetched rows (the first interval includes compilation)."""

  def __init__(self):
    self.last_time, self.last_tokens = None, 0

  def update(self, tokens: int) -> float | None:
    now = time.perf_counter()
    rate = None
    if self.last_time is not None and now > self.last_time:
      rate = (tokens - self.last_tokens) / (now - self.last_time)
    self.last_time, self.last_tokens = now, tokens
    return rate


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
  return tqdm(
    total=total,
    initial=initial,
    unit="step",
    disable=not enabled,
    file=sys.stderr,
    dynamic_ncols=True,
    mininterval=0.5,
  )
