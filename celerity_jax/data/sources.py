"""The run's train and held-out batch sources, from `data.*`: synthetic, stdlib or user files."""
from __future__ import annotations

import jax

from celerity_jax.data.synthetic import SyntheticTokens

EVAL_SEED = 2 ** 31 - 1     # the held-out batches are fixed: independent of train.seed


def make_sources(cfg, resolved, progress: bool = True):
  """Returns (train, held_out): objects with .batch(step) -> this process's rows of a batch."""
  m, d = cfg.model, cfg.data
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if not d.paths and d.corpus == "synthetic":
    return (SyntheticTokens(m.vocab_size, m.seq_len, resolved.batch_seqs, cfg.train.seed, **process),
            SyntheticTokens(m.vocab_size, m.seq_len, resolved.batch_seqs, EVAL_SEED, **process))
  from celerity_jax.data.pipeline import WindowBatches
  from celerity_jax.data.prepare import prepare
  prepared = prepare(d, m.vocab_size, progress)
  return (WindowBatches(prepared.train, m.seq_len, resolved.batch_seqs, cfg.train.seed, d.packing,
                        **process),
          WindowBatches(prepared.eval, m.seq_len, resolved.batch_seqs, EVAL_SEED, d.packing,
                        **process))
