"""grain pipeline: shuffled fixed-length windows; a batch is a pure function of (seed, step).

The token array is cut into windows of seq_len + 1 tokens (stride seq_len, so every token is a
target once per epoch). Window order is a grain shuffle per epoch; global row g of the run is window
order[g], so step s holds rows s*B ... s*B + B - 1 (plus `row_offset`, where a resume changed B:
resolve.py) and resuming at step k needs no replay. Each process reads only the rows its devices
hold (sharding.process_rows). Packing: `concat` joins
documents with EOS and lets
them attend across; `segments` also returns segment ids so the model masks attention per document.
"""

from __future__ import annotations

import grain
import numpy as np

from celerity_jax.data import DataError
from celerity_jax.data.store import TokenStore


class WindowBatches:
  def __init__(
    self,
    store: TokenStore,
    seq_len: int,
    global_batch: int,
    seed: int,
    packing: str = "concat",
    rows=None,
    row_offset: int = 0,
  ):
    self.store, self.seq_len, self.packing = store, seq_len, packing
    n_windows = (store.n_tokens - 1) // seq_len
    if n_windows < global_batch:
      raise DataError(
        f"token store {store.path}: {store.n_tokens:,} tokens make {n_windows} windows "
        f"of {seq_len + 1} tokens, fewer than one batch of {global_batch}; use a "
        f"larger corpus or a smaller train.batch_size / model.seq_len"
      )
    self.n_windows = n_windows
    self.rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
    self.global_batch, self.row_offset = global_batch, row_offset
    self.order = grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat()
    self.offsets = store.doc_offsets() if packing == "segments" else None

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The global batch's `rows` (default all) at `step`: inputs, targets (and segment_ids)."""
    first = step * self.global_batch + self.row_offset
    windows = np.asarray([self.order[int(first + r)] for r in self.rows], np.int64)
    starts = windows * self.seq_len
    tokens = self.store.read(starts, self.seq_len + 1)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if self.offsets is not None:
      positions = starts[:, None] + np.arange(self.seq_len)[None, :]
      doc = np.searchsorted(self.offsets, positions, side="right")
      out["segment_ids"] = (doc - doc[:, :1]).astype(np.int32)  # 0, 1, ... within each row
    return out


def prefetch(batch_fn, start_step: int, stop_step: int, threads: int = 2):
  """batch_fn(step) for steps [start, stop) in order, computed ahead by `threads` grain threads."""
  steps = grain.MapDataset.range(start_step, stop_step).map(batch_fn)
  if threads == 0:
    return (steps[i] for i in range(len(steps)))
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  return iter(steps.to_iter_dataset(options))
