"""grain pipeline: shuffled fixed-length windows; a batch is a pure function of (seed, step).

A source's token array is cut into windows of seq_len + 1 tokens (stride seq_len, so every token is
a target once per epoch), in a grain shuffle per epoch: the source's k-th row is window order[k].
Global row g of the run is row s*B + r of step s (plus `row_offset`, where a resume changed B:
resolve.py); data/mixture.py says which source it comes from and as which of that source's rows,
so resuming at step k needs no replay. Each process reads only the rows its devices hold
(sharding.process_rows). Packing: `concat` joins documents with EOS and lets them attend across;
`segments` also returns segment ids so the model masks attention per document.
"""

from __future__ import annotations

import grain
import numpy as np

from celerity_jax.data import DataError
from celerity_jax.data.mixture import Segments


class Windows:
  """One source's shuffled windows."""

  def __init__(self, store, seq_len: int, seed: int, packing: str, name: str, batch: int = 0):
    """`batch`: the fewest windows the source must have (one batch; a mixture's sources, one)."""
    self.store, self.seq_len, self.name = store, seq_len, name
    n_windows = (store.n_tokens - 1) // seq_len
    if n_windows < max(batch, 1):
      least = f"one batch of {batch}" if batch else "one"
      raise DataError(
        f"token store {store.path} (source {name}): {store.n_tokens:,} tokens make {n_windows} "
        f"windows of {seq_len + 1} tokens, fewer than {least}; use a larger corpus or a "
        f"smaller train.batch_size / model.seq_len"
      )
    self.n_windows = n_windows
    self.order = grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat()
    self.offsets = store.doc_offsets() if packing == "segments" else None

  def rows(self, ranks: np.ndarray) -> dict[str, np.ndarray]:
    """The source's rows `ranks`: inputs, targets (and segment_ids)."""
    windows = np.asarray([self.order[int(k)] for k in ranks], np.int64)
    starts = windows * self.seq_len
    tokens = self.store.read(starts, self.seq_len + 1)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if self.offsets is not None:
      positions = starts[:, None] + np.arange(self.seq_len)[None, :]
      doc = np.searchsorted(self.offsets, positions, side="right")
      out["segment_ids"] = (doc - doc[:, :1]).astype(np.int32)  # 0, 1, ... within each row
    return out


class MixtureBatches:
  """The global batch's `rows` (default all) at each step, drawn from the sources by weight."""

  def __init__(self, sources: list[Windows], segments: Segments, global_batch: int, rows=None,
               row_offset: int = 0):  # fmt: skip
    self.sources, self.segments = sources, segments
    self.rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
    self.global_batch, self.row_offset = global_batch, row_offset
    self.seq_len = sources[0].seq_len

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The global batch's `rows` at `step`: inputs, targets (and segment_ids)."""
    rows = step * self.global_batch + self.row_offset + self.rows
    source, rank = self.segments.assign(rows)
    out = None
    for i in np.unique(source):
      at = np.flatnonzero(source == i)
      part = self.sources[i].rows(rank[at])
      if out is None:
        out = {k: np.empty((len(rows), *v.shape[1:]), v.dtype) for k, v in part.items()}
      for k, v in part.items():
        out[k][at] = v
    return out


def one_source(store, seq_len: int, global_batch: int, seed: int, packing: str = "concat",
               rows=None, row_offset: int = 0, name: str = "data") -> MixtureBatches:  # fmt: skip
  """The batches of a single source: its row g is global row g."""
  windows = Windows(store, seq_len, seed, packing, name, global_batch)
  segments = Segments([name], [[0, {name: 1.0}]])
  return MixtureBatches([windows], segments, global_batch, rows, row_offset)


def prefetch(batch_fn, start_step: int, stop_step: int, threads: int = 2):
  """batch_fn(step) for steps [start, stop) in order, computed ahead by `threads` grain threads."""
  steps = grain.MapDataset.range(start_step, stop_step).map(batch_fn)
  if threads == 0:
    return (steps[i] for i in range(len(steps)))
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  return iter(steps.to_iter_dataset(options))
