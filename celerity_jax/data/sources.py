"""The run's train and held-out batch sources, from `data.*`: synthetic, stdlib or user files."""
from __future__ import annotations

import jax

from celerity_jax.data.synthetic import SyntheticTokens

EVAL_SEED = 2 ** 31 - 1     # the held-out batches are fixed: independent of train.seed


def make_sources(cfg, resolved, progress: bool = True):
  """Returns (train, held_out) with .batch(step) -> this process's rows of a batch; held_out is
  None when `train.eval_every` is 0."""
  m, d = cfg.model, cfg.data
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  evaluate = cfg.train.eval_every > 0
  if not d.paths and d.corpus == "synthetic":
    def synthetic(seed):
      return SyntheticTokens(m.vocab_size, m.seq_len, resolved.batch_seqs, seed, **process)
    return synthetic(cfg.train.seed), synthetic(EVAL_SEED) if evaluate else None
  from celerity_jax.data.pipeline import WindowBatches
  from celerity_jax.data.prepare import prepare
  prepared = prepare(d, m.vocab_size, progress)

  def windows(split, seed):
    return WindowBatches(split, m.seq_len, resolved.batch_seqs, seed, d.packing, **process)
  return (windows(prepared.train, cfg.train.seed),
          windows(prepared.eval, EVAL_SEED) if evaluate else None)
