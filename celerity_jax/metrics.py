"""Run outputs: metrics.jsonl rows and events, TensorBoard scalars, a wandb mirror
(wandb_mirror.py), a tokens/s progress bar.

Both files are appended through `storage.append`, on disk or on Cloud Storage, in the calling
thread: a write that fails (a full disk) raises where the run can report it, and no writer thread
can die and leave the run waiting on its queue. On Cloud Storage every append is a few requests,
so rows are sent in batches every `REMOTE_FLUSH_SECONDS` and at every `flush()` (the loop flushes
before each checkpoint: a resume never misses a row).
"""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import time

from tqdm import tqdm

from celerity_jax import storage

REMOTE_FLUSH_SECONDS = 15


# Dense bf16 peak FLOP/s per chip, by the device_kind jax reports (the vendors' data sheets); the
# first name a device_kind contains wins, so the longer names come first. MFU is reported against
# it (metrics.jsonl `mfu`); a device missing here (a CPU) gets no MFU.
PEAK_FLOPS = (
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
  ("TPU v6e", 918e12),
  ("TPU7x", 2307e12),
  ("TPU v4", 275e12),
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("B200", 2250e12),
  ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The peak bf16 FLOP/s of one device of this kind, or None where unknown."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them readable
  return value


class MetricsWriter:
  """Appends rows to run_dir/metrics.jsonl (one JSON object per line) and mirrors scalars to
  TensorBoard and, given `wandb` = (project, the run's resolved config), every row to wandb. Rows
  with an `event` key are run events (start, restart, ...), not step metrics. Disabled (every
  call a no-op) on all but process 0."""

  def __init__(self, run_dir, tensorboard: bool, enabled: bool = True, wandb=None):
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
      self.tb = TensorBoardFile(run_dir / "tb")
    self.wandb = None
    if wandb is not None and wandb[0] and enabled:
      from celerity_jax.wandb_mirror import WandbMirror

      self.wandb = WandbMirror(wandb[0], run_dir, wandb[1])

  def row(self, row: dict):
    if not self.enabled:  # not process 0 of a multi-process run
      return
    self.unsent.append(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    if self.tb is not None and "step" in row and "event" not in row:
      self.tb.scalars(row["step"], row)
    if self.wandb is not None:
      self.wandb.row(row)
    if time.monotonic() - self.last_sent >= self.send_every:
      self._send()

  def _send(self):
    storage.append(self.path, "".join(self.unsent))
    self.unsent, self.last_sent = [], time.monotonic()
    if self.tb is not None:
      self.tb.flush()

  def flush(self):
    """Every row so far is in metrics.jsonl and every scalar in TensorBoard's file."""
    if self.enabled:
      self._send()

  def close(self):
    self.flush()
    if self.wandb is not None:
      self.wandb.close()


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


class TensorBoardFile:
  """Scalars as TensorBoard events: TFRecord-framed `Event` protos, buffered and appended to one
  events file per process start (tb/events.out.tfevents.TIME.HOST) at each flush."""

  def __init__(self, directory):
    from tensorboardX.proto import event_pb2, summary_pb2

    self.event, self.summary = event_pb2.Event, summary_pb2.Summary
    storage.make_dir(directory)
    self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.buffer = bytearray()
    self._record(self.event(wall_time=time.time(), file_version="brain.Event:2"))

  def scalars(self, step: int, row: dict):
    values = [
      self.summary.Value(tag=key, simple_value=float(value))
      for key, value in row.items()
      if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
    ]
    event = self.event(wall_time=time.time(), step=int(step), summary=self.summary(value=values))
    self._record(event)

  def _record(self, event):
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self.buffer += header + struct.pack("<I", masked_crc32c(header))
    self.buffer += data + struct.pack("<I", masked_crc32c(data))

  def flush(self):
    data, self.buffer = bytes(self.buffer), bytearray()
    storage.append(self.path, data)


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
