"""The run's train and held-out batches, from `data.*`: synthetic, stdlib, files or a mixture."""

from __future__ import annotations

import hashlib
import sys
import uuid
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from celerity_jax.data.synthetic import SyntheticTokens

EVAL_SEED = 2**31 - 1  # the held-out batches are fixed: independent of train.seed


class Sources(NamedTuple):
  """Each source's .batch(step) is the global batch's rows for this process."""

  train: object
  held_out: dict | None  # {source name: batches}; None when train.eval_every is 0
  tokenizer: object | None  # the text's tokenizer (data/tokenizer.py); None for synthetic tokens
  fingerprint: dict  # what the run trains on, pinned in its checkpoints (data/prepare.py)
  weights: dict  # {source name: weight, normalized} from this point of the run on
  event: str = ""  # a change of weights on resume, in words


def make_sources(
  cfg,
  resolved,
  rows=None,
  progress: bool = True,
  pinned: dict | None = None,
  at_rows: int = 0,
  run_tokenizer: str = "",
) -> Sources:
  """The run's sources; `rows` are the global batch's rows to read (default all; in a
  multi-process run this process's, sharding.process_rows). `pinned`: the data fingerprint of the
  checkpoint a run resumes from at row `at_rows`, when other data is refused (prepare), and its
  own tokenizer file."""
  model, d = cfg.model, cfg.data
  evaluate = cfg.train.eval_every > 0
  if not d.paths and not d.mixture and d.corpus == "synthetic":

    def synthetic(seed):
      return SyntheticTokens(model.vocab_size, model.seq_len, resolved.batch_seqs, seed, rows=rows)

    return Sources(
      synthetic(cfg.train.seed),
      {"synthetic": synthetic(EVAL_SEED)} if evaluate else None,
      None,
      {"corpus": "synthetic"},
      {"synthetic": 1.0},
    )
  from celerity_jax.data import mixture
  from celerity_jax.data.pipeline import MixtureBatches, Windows, one_source
  from celerity_jax.data.prepare import cache_root, prepare

  process = builders(cache_root(d))
  prepared = prepare(
    d, model.vocab_size, progress and jax.process_index() == 0, pinned, process, run_tokenizer
  )
  names = [b.source.name for b in prepared.sources]
  total = sum(b.source.weight for b in prepared.sources)
  weights = {b.source.name: b.source.weight / total for b in prepared.sources}
  segments, event = _segments(pinned, weights, at_rows)
  single = len(names) == 1

  def windows(split, seed, name):
    return Windows(split, model.seq_len, seed, d.packing, name, resolved.batch_seqs * single)

  def seed_of(name):  # one source keeps train.seed's order; a mixture's sources get their own
    digest = hashlib.sha256(f"{cfg.train.seed}/{name}".encode()).digest()
    return cfg.train.seed if single else int.from_bytes(digest[:4], "big")

  train = MixtureBatches(
    [windows(b.train, seed_of(b.source.name), b.source.name) for b in prepared.sources],
    mixture.Segments(names, segments),
    resolved.batch_seqs,
    rows,
    resolved.row_offset,
  )
  held_out = None
  if evaluate:
    held_out = {
      b.source.name: one_source(
        b.eval, model.seq_len, resolved.batch_seqs, EVAL_SEED, d.packing, rows, name=b.source.name
      )
      for b in prepared.sources
    }
  if jax.process_index() == 0:
    _report_epochs(prepared, train.segments, resolved)
  fingerprint = prepared.fingerprint | {"mixture": segments}
  return Sources(train, held_out, prepared.tokenizer, fingerprint, weights, event)


def builders(root) -> tuple[int, int]:
  """(this process, processes) that split the token-store build: every process of the run when
  they all see the same cache (gs://, or a shared file system), else each builds every shard."""
  if jax.process_count() == 1:
    return 0, 1
  from celerity_jax import storage

  token = int(multihost_utils.broadcast_one_to_all(np.int32(uuid.uuid4().int % 2**31)))
  marker = root / f".shared-{token}"
  if jax.process_index() == 0:
    storage.check_writable(root, "data.cache_dir")
    marker.write_text("")
  multihost_utils.sync_global_devices("celerity_jax cache marker written")
  seen = multihost_utils.process_allgather(np.int32(marker.exists()))
  multihost_utils.sync_global_devices("celerity_jax cache marker read")
  if jax.process_index() == 0:
    marker.unlink()
  return (jax.process_index(), jax.process_count()) if np.all(seen) else (0, 1)


def _segments(pinned: dict | None, weights: dict, at_rows: int) -> tuple[list, str]:
  """The run's weights over its rows, and a new segment's words when a resume changed them."""
  history = (pinned or {}).get("mixture")
  if not history:
    return [[0, weights]], ""
  last = history[-1][1]
  if set(last) == set(weights) and all(abs(last[k] - weights[k]) < 1e-9 for k in weights):
    return history, ""
  if history[-1][0] == at_rows:  # changed again before any row was read with the last weights
    history = history[:-1]
  names = [*weights, *(k for k in last if k not in weights)]  # a source the resume dropped: -> 0
  shown = ", ".join(f"{k} {last.get(k, 0):.4f} -> {weights.get(k, 0):.4f}" for k in names)
  return [*history, [at_rows, weights]], f"mixture weights change at row {at_rows:,}: {shown}"


def _report_epochs(prepared, segments, resolved):
  """Each source's tokens read by the end of the run against what it holds; a warning for any it
  would repeat (a second pass bends the loss curve late in the run, off the collapse curve)."""
  n_rows = resolved.steps * resolved.batch_seqs + resolved.row_offset
  reads = segments.rows_per_source(n_rows)
  single = len(prepared.sources) == 1
  for built, rows in zip(prepared.sources, reads, strict=True):
    tokens, have = rows * resolved.batch_tokens // resolved.batch_seqs, built.train.n_tokens
    epochs = tokens / have
    name = "the corpus's" if single else f"source {built.source.name}'s"
    if epochs > 1:
      print(
        f"celerity_jax: warning: the run reads {tokens:,} tokens, {epochs:.1f} passes over "
        f"{name} {have:,} training tokens: repeated data lowers the loss late in the run, off "
        f"the collapse curve",
        file=sys.stderr,
      )
    elif not single:
      print(
        f"celerity_jax: source {built.source.name}: reads {tokens:,} of {have:,} training "
        f"tokens ({epochs:.2f} epochs)",
        file=sys.stderr,
      )
