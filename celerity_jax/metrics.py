"""Run outputs: metrics.jsonl rows and events, TensorBoard scalars, a tokens/s progress bar."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)            # JSON has no NaN/inf; keep them readable
  return value


class MetricsWriter:
  """Appends rows to run_dir/metrics.jsonl (one JSON object per line) and mirrors scalars to
  TensorBoard. Rows with an `event` key are run events (start, restart, ...), not step metrics.
  Disabled (every call a no-op) on all but process 0."""

  def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
    self.path = run_dir / "metrics.jsonl"
    self.file = self.path.open("a", buffering=1) if enabled else None
    self.tb = None
    if tensorboard and enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(run_dir / "tb"))

  def row(self, row: dict):
    if self.file is None:          # not process 0 of a multi-process run
      return
    self.file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    if self.tb is not None and "step" in row and "event" not in row:
      for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
          self.tb.add_scalar(key, value, row["step"])

  def close(self):
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


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
  return tqdm(total=total, initial=initial, unit="step", disable=not enabled, file=sys.stderr,
              dynamic_ncols=True, mininterval=0.5)
