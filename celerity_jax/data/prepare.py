"""Corpus -> tokenizer + train/eval token stores, built on first use and cached.

The cache entry is keyed by the corpus content, the tokenizer settings (or the given tokenizer's
own fingerprint) and the split, so a changed corpus is rebuilt, never silently reused. The held-out
split is per document, by a hash of its text: stable under reordering of the files.

`Prepared.fingerprint` names the data a run trains on: the corpus's content, the tokenizer and both
token stores' contents. A run pins it in its checkpoints, and a resume on other data is refused
(train/loop.py); `pinned` lets that refusal come before a changed corpus is tokenized.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

from etils import epath
from tqdm import tqdm

from celerity_jax import storage
from celerity_jax.data import DataChanged, DataError, corpus, store, tokenizer

ENCODE_BATCH = 256


@dataclass(frozen=True)
class Prepared:
  tokenizer: tokenizer.Tokenizer
  train: store.TokenStore
  eval: store.TokenStore
  entry: epath.Path

  @property
  def fingerprint(self) -> dict:
    return {
      "corpus": self.corpus,
      "tokenizer": self.tokenizer.fingerprint,
      "train_tokens": self.train.content,
      "eval_tokens": self.eval.content,
    }

  @property
  def corpus(self) -> str:
    return self.train.meta["settings"]["corpus"]


def cache_root(data_cfg) -> epath.Path:
  """A local directory or gs:// (shared by every host of a pod, and kept across preemptions)."""
  root = data_cfg.cache_dir or os.environ.get("CELERITY_JAX_CACHE") or "~/.cache/celerity_jax"
  return storage.location(root)


def _names(files) -> str:
  return ", ".join(str(f) for f in files[:3]) + (
    f", ... ({len(files)} files)" if len(files) > 3 else ""
  )


def _held_out(text: str, eval_frac: float) -> bool:
  bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:4], "big")
  return bucket < eval_frac * 2**32


def prepare(
  data_cfg, vocab_size: int, progress: bool = True, pinned: dict | None = None
) -> Prepared:
  """The corpus's tokenizer and stores, built unless cached. `pinned`: the fingerprint a resumed
  run's checkpoint holds; a corpus or given tokenizer that differs from it is refused (ConfigError)
  before anything is built."""
  files = corpus.stdlib_files() if not data_cfg.paths else corpus.resolve_paths(data_cfg.paths)
  field = data_cfg.text_field
  if next(corpus.documents(files, field), None) is None:
    raise DataError(f"corpus {_names(files)}: no non-empty documents")
  given = tokenizer.load(data_cfg.tokenizer) if data_cfg.tokenizer else None
  found = {"corpus": corpus.fingerprint(files, field)} | (
    {"tokenizer": given.fingerprint} if given else {}
  )
  changed = [k for k, v in found.items() if pinned and k in pinned and pinned[k] != v]
  if changed:
    raise DataChanged(changed, found)
  settings = {
    "corpus": found["corpus"],
    "eval_frac": data_cfg.eval_frac,
    "tokenizer": given.fingerprint
    if given
    else {"vocab_size": vocab_size, "type": data_cfg.tokenizer_type},
    "format": store.FORMAT,
  }
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  entry = cache_root(data_cfg) / f"{'stdlib' if not data_cfg.paths else 'files'}-{key}"
  model_path = entry / "tokenizer.model"
  if not (entry / "train" / "meta.json").exists() or not (entry / "eval" / "meta.json").exists():
    _build(files, given, data_cfg, vocab_size, entry, settings, progress)
  tok = given or tokenizer.load(model_path)
  if tok.vocab_size > vocab_size:
    raise DataError(
      f"tokenizer {data_cfg.tokenizer or model_path}: vocab {tok.vocab_size} > "
      f"model.vocab_size={vocab_size}"
    )
  return Prepared(
    tok,
    store.TokenStore(os.fspath(entry / "train"), tok.fingerprint, vocab_size),
    store.TokenStore(os.fspath(entry / "eval"), tok.fingerprint, vocab_size),
    entry,
  )


def _build(files, given, data_cfg, vocab_size, entry: epath.Path, settings: dict, progress: bool):
  storage.check_writable(entry, "data.cache_dir")
  if progress:  # run.progress=false keeps stderr to warnings and errors
    print(
      f"celerity_jax: building token stores in {entry} from {len(files)} files", file=sys.stderr
    )
  if given is None:
    tok = tokenizer.train(
      lambda: corpus.documents(files, data_cfg.text_field),
      vocab_size,
      data_cfg.tokenizer_type,
      source=f"corpus {_names(files)}",
    )
    tok.save(entry / "tokenizer.model")
  else:
    tok = given
  held_out: list = []
  nbytes = 0
  bar = tqdm(
    total=sum(corpus.size(f) for f in files),
    unit="B",
    unit_scale=True,
    desc="tokenize",
    disable=not progress,
    file=sys.stderr,
  )
  start = time.perf_counter()

  def train_docs():
    batch: list[str] = []
    for doc in corpus.documents(files, data_cfg.text_field):
      batch.append(doc)
      if len(batch) == ENCODE_BATCH:
        yield from _encode(batch)
        batch = []
    yield from _encode(batch)

  def _encode(texts):
    nonlocal nbytes
    for text, ids in zip(texts, tok.encode(texts, threads=data_cfg.threads), strict=True):
      size = len(text.encode("utf-8", "replace"))
      nbytes += size
      bar.update(size)
      if _held_out(text, data_cfg.eval_frac):
        held_out.append(ids)
      else:
        yield ids

  meta = {"tokenizer": tok.fingerprint, "settings": settings}
  train_meta = store.build(os.fspath(entry / "train"), train_docs(), tokenizer.EOS, meta)
  seconds = time.perf_counter() - start
  bar.close()
  if not held_out:
    raise DataError(
      f"corpus {_names(files)}: no held-out document at data.eval_frac="
      f"{data_cfg.eval_frac}; raise it or add documents"
    )
  store.build(os.fspath(entry / "eval"), held_out, tokenizer.EOS, meta)
  megabytes = nbytes / 1e6
  if progress:
    print(
      f"celerity_jax: tokenized {megabytes:.1f} MB into {train_meta['n_tokens']:,} train "
      f"tokens in {seconds:.1f} s ({megabytes / seconds:.2f} MB/s)",
      file=sys.stderr,
    )
