"""Sources -> tokenizer + each source's train/held-out token stores, built on first use and cached.

A source's cache entry is keyed by its corpus (corpus.fingerprint), text field, held-out fraction
and tokenizer, so a changed corpus is rebuilt, never silently reused. The held-out split is per
document, by a hash of its text: stable under reordering of the files. A tokenizer trained here
learns from a sample of at most SAMPLE_BYTES drawn across the sources by weight (evenly spaced
shards of each), so its time and memory do not grow with the corpus.

`Prepared.fingerprint` names the data a run trains on: the tokenizer and, per source, the corpus
and both token stores' contents. A run pins it in its checkpoints, and a resume on other data is
refused (train/resume.py); `pinned` lets that refusal come before a changed corpus is tokenized.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from etils import epath

from celerity_jax import storage
from celerity_jax.data import DataChanged, DataError, corpus, mixture, shards, store, tokenizer

SAMPLE_BYTES = 128 << 20  # the tokenizer's training sample, across all sources
SAMPLE_SHARDS = 32  # evenly spaced shards of a source that the sample reads from


@dataclass(frozen=True)
class Built:
  """One source, tokenized."""

  source: mixture.Source
  corpus: str  # corpus.fingerprint
  train: shards.SplitStore
  eval: shards.SplitStore
  entry: epath.Path


@dataclass(frozen=True)
class Prepared:
  tokenizer: tokenizer.Tokenizer | tokenizer.HFTokenizer
  tokenizer_path: str
  sources: list[Built]

  @property
  def fingerprint(self) -> dict:
    return {
      "tokenizer": self.tokenizer.fingerprint,
      "sources": {
        b.source.name: {
          "corpus": b.corpus,
          "train_tokens": b.train.content,
          "eval_tokens": b.eval.content,
        }
        for b in self.sources
      },
    }


def cache_root(data_cfg) -> epath.Path:
  """A local directory or gs:// (shared by every host of a pod, and kept across preemptions)."""
  root = data_cfg.cache_dir or os.environ.get("CELERITY_JAX_CACHE") or "~/.cache/celerity_jax"
  return storage.location(root)


def names(files) -> str:
  return ", ".join(str(f) for f in files[:3]) + (
    f", ... ({len(files)} files)" if len(files) > 3 else ""
  )


def _files(source: mixture.Source) -> list:
  try:
    return corpus.stdlib_files() if not source.paths else corpus.resolve_paths(source.paths)
  except DataError as e:
    if source.name in ("data", "stdlib"):
      raise
    raise DataError(f"source {source.name}: {e}") from None


def _key(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(
  data_cfg,
  vocab_size: int,
  progress: bool = True,
  pinned: dict | None = None,
  process: tuple[int, int] = (0, 1),
  run_tokenizer: str = "",
) -> Prepared:
  """The sources' tokenizer and stores, built unless cached; process p of P builds its share of
  every source's shards (data/shards.py). `pinned`: the fingerprint a resumed run's checkpoint
  holds; a corpus or given tokenizer that differs is refused (DataChanged) before anything is
  built. `run_tokenizer`: the resumed run's own tokenizer file, kept when no other is given."""
  sources = mixture.sources(data_cfg)
  files = {s.name: _files(s) for s in sources}
  for s in sources:
    if next(corpus.documents(files[s.name], s.text_field, s.exclude), None) is None:
      raise DataError(f"source {s.name}: {names(files[s.name])}: no non-empty documents")
  given_path = data_cfg.tokenizer or run_tokenizer
  given = tokenizer.load(given_path) if given_path else None
  fingerprints = {
    s.name: corpus.fingerprint(files[s.name], s.text_field, s.exclude) for s in sources
  }
  _check_pinned(pinned, fingerprints, given if data_cfg.tokenizer else None)
  plans = {s.name: shards.plan(files[s.name]) for s in sources}
  root = cache_root(data_cfg)
  if given is None:
    given_path, given = _trained(root, sources, plans, fingerprints, data_cfg, vocab_size, process)
  if given.vocab_size > vocab_size:
    raise DataError(
      f"tokenizer {given_path}: vocab {given.vocab_size} > model.vocab_size={vocab_size}"
    )
  built = []
  for s in sources:
    settings = {
      "corpus": fingerprints[s.name],
      "eval_frac": data_cfg.eval_frac,
      "tokenizer": given.fingerprint,
      "format": store.FORMAT,
    }
    entry = root / f"{s.name}-{_key(settings)}"
    job = {"tokenizer": str(given_path), "text_field": s.text_field, "exclude": s.exclude}
    job["eval_frac"] = data_cfg.eval_frac
    label = f"source {s.name}" if len(sources) > 1 else "data"
    meta = shards.build(
      str(entry), plans[s.name], job, process, data_cfg.build_processes, progress, label
    )
    if not meta["eval"]["n_tokens"]:
      raise DataError(
        f"source {s.name}: {names(files[s.name])}: no held-out document at data.eval_frac="
        f"{data_cfg.eval_frac}; raise it or add documents"
      )
    split = {
      name: shards.SplitStore(str(entry), name, meta, given.fingerprint, vocab_size)
      for name in ("train", "eval")
    }
    built.append(Built(s, fingerprints[s.name], split["train"], split["eval"], entry))
  return Prepared(given, str(given_path), built)


def _check_pinned(pinned: dict | None, fingerprints: dict, given):
  if not pinned or "sources" not in pinned:
    return
  found = {"sources": {n: {"corpus": fp} for n, fp in fingerprints.items()}}
  changed = []
  was = pinned.get("sources", {})
  for name, fp in fingerprints.items():
    if name in was and was[name].get("corpus") != fp:
      changed.append(f"sources.{name}.corpus")
  changed += [f"sources.{name}" for name in sorted(set(was) ^ set(fingerprints))]
  if given is not None:
    found["tokenizer"] = given.fingerprint
    if pinned.get("tokenizer") not in (None, given.fingerprint):
      changed.append("tokenizer")
  if changed:
    raise DataChanged(changed, found)


def _trained(root, sources, plans, fingerprints, data_cfg, vocab_size, process):
  """(path, tokenizer) trained on a sample across the sources by weight: process 0 trains it,
  the others wait for its file."""
  settings = {
    "sources": {s.name: [fingerprints[s.name], s.weight] for s in sources},
    "vocab_size": vocab_size,
    "type": data_cfg.tokenizer_type,
    "sample_bytes": SAMPLE_BYTES,
  }
  path = root / f"tokenizer-{_key(settings)}" / "tokenizer.model"
  if not path.exists():
    if process[0] == 0:
      storage.check_writable(path.parent, "data.cache_dir")
      sample = sample_documents(sources, plans, SAMPLE_BYTES)
      where = ", ".join(s.name for s in sources) if len(sources) > 1 else "the corpus"
      trained = tokenizer.train(
        lambda: sample, vocab_size, data_cfg.tokenizer_type, source=f"corpus {where}"
      )
      trained.save(path)
    else:
      while not path.exists():
        time.sleep(shards.POLL_S)
  return path, tokenizer.load(path)


def sample_documents(sources, plans, budget: int) -> list[str]:
  """Documents from every source, budget x its weight bytes each: all of a source that small,
  else the first documents of SAMPLE_SHARDS evenly spaced shards, an equal share from each."""
  total_weight = sum(s.weight for s in sources)
  out = []
  for s in sources:
    plan = plans[s.name]
    share = budget * s.weight / total_weight
    if sum(shard["bytes"] for shard in plan) <= share:
      picks, each = range(len(plan)), float("inf")
    else:
      k = min(len(plan), SAMPLE_SHARDS)
      picks = sorted({round(i * (len(plan) - 1) / max(k - 1, 1)) for i in range(k)})
      each = share / k
    for i in picks:
      taken = 0
      for doc in corpus.documents(shards.shard_inputs(plan[i]), s.text_field, s.exclude):
        out.append(doc)
        taken += len(doc.encode("utf-8", "replace"))
        if taken >= each:
          break
  if not out:
    raise DataError("the sources hold no documents to train a tokenizer on")
  return out
