"""The run's train and held-out batch sources, from `data.*`: synthetic, stdlib or user files."""

from __future__ import annotations

import sys
from typing import NamedTuple

import jax
from jax.experimental import multihost_utils

from celerity_jax.data.synthetic import SyntheticTokens

EVAL_SEED = 2**31 - 1  # the held-out batches are fixed: independent of train.seed


class Sources(NamedTuple):
  """Each source's .batch(step) is the global batch's rows for this process."""

  train: object
  held_out: object | None  # None when train.eval_every is 0
  tokenizer: object | None  # the text's tokenizer (data/tokenizer.py); None for synthetic tokens
  fingerprint: dict  # what the run trains on, pinned in its checkpoints (data/prepare.py)


def make_sources(
  cfg, resolved, rows=None, progress: bool = True, pinned: dict | None = None
) -> Sources:
  """The run's sources; `rows` are the global batch's rows to read (default all; in a
  multi-process run this process's, sharding.process_rows). `pinned`: the data fingerprint of the
  checkpoint a run resumes from, when other data is refused (prepare)."""
  model, d = cfg.model, cfg.data
  evaluate = cfg.train.eval_every > 0
  if not d.paths and d.corpus == "synthetic":

    def synthetic(seed):
      return SyntheticTokens(model.vocab_size, model.seq_len, resolved.batch_seqs, seed, rows=rows)

    return Sources(
      synthetic(cfg.train.seed),
      synthetic(EVAL_SEED) if evaluate else None,
      None,
      {"corpus": "synthetic"},
    )
  from celerity_jax.data.pipeline import WindowBatches
  from celerity_jax.data.prepare import prepare

  # process 0 builds the tokenizer and stores first: on a shared cache the others then reuse them
  if jax.process_index() != 0:
    multihost_utils.sync_global_devices("celerity_jax data prepared")
  prepared = prepare(d, model.vocab_size, progress and jax.process_index() == 0, pinned)
  if jax.process_index() == 0 and jax.process_count() > 1:
    multihost_utils.sync_global_devices("celerity_jax data prepared")

  def windows(split, seed, row_offset=0):
    return WindowBatches(
      split, model.seq_len, resolved.batch_seqs, seed, d.packing, rows, row_offset
    )

  reads, have = resolved.steps * resolved.batch_tokens, prepared.train.n_tokens
  if reads > have and jax.process_index() == 0:
    # legal (small experiments on small corpora), but a second pass bends the loss curve
    print(
      f"celerity_jax: warning: the run reads {reads:,} tokens, {reads / have:.1f} passes over "
      f"the corpus's {have:,} training tokens: repeated data "
      f"lowers the loss late in the run, off the collapse curve",
      file=sys.stderr,
    )

  return Sources(
    windows(prepared.train, cfg.train.seed, resolved.row_offset),
    windows(prepared.eval, EVAL_SEED) if evaluate else None,
    prepared.tokenizer,
    prepared.fingerprint,
  )
