"""A source's token stores, built in shards by every process of a run and every core of each.

A source's files are cut into shards of about `shard_bytes(total)` bytes (whole files packed in
order; a large parquet file split by row groups, a large plain .jsonl file by lines), a pure
function of the corpus: the same corpus gives the same shards whatever builds them. Shard i holds
the train and held-out stores of its documents:

  ENTRY/plan.json                the shards' inputs (informational: every process computes it)
  ENTRY/shards/00000/train/      a token store (data/store.py); ENTRY/shards/00000/eval/ likewise
  ENTRY/shards/00000/done.json   written last: the shard is complete
  ENTRY/meta.json                written last of all, by process 0: the source is complete

Process p of P builds the shards i with i % P == p, each in a worker process of its own (a core
each: encoding is CPU-bound Python, which threads would serialize), then waits until every shard is
done. A local shard is built in a `.partial-HOST-PID` directory moved into place; on Cloud Storage
done.json is what marks it complete. A killed build resumes from its finished shards; a source
without meta.json is never read.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from celerity_jax import storage
from celerity_jax.data import DataError, corpus, store
from celerity_jax.data import tokenizer as tokenizer_lib

ENCODE_BATCH = 256  # documents per encode call
MIN_SHARD, MAX_SHARD = 1 << 16, 64 << 20  # bytes of input per shard
TARGET_SHARDS = 64  # a small corpus still gives every core of a host a shard
POLL_S = 2.0
OPEN_THREADS = 16  # shards opened at once


def shard_bytes(total: int) -> int:
  return int(min(MAX_SHARD, max(MIN_SHARD, total // TARGET_SHARDS)))


def plan(files: list) -> list[dict]:
  """[{"pieces": [[file name, part or None], ...], "bytes": input bytes}, ...]: whole files packed
  in order up to the shard size; a parquet file larger than it split by row groups (part: [first,
  end) row groups), a plain .jsonl file by bytes (part: [first, end) bytes, whole lines)."""
  sizes = [corpus.size(f) for f in files]
  target = shard_bytes(sum(sizes))
  shards, current, filled = [], [], 0

  def close():
    nonlocal current, filled
    if current:
      shards.append({"pieces": current, "bytes": filled})
    current, filled = [], 0

  for path, size in zip(files, sizes, strict=True):
    if path.name.endswith(".parquet") and size > target:
      close()
      rows = corpus.row_groups(path)
      per_row = size / max(sum(rows), 1)
      first, bytes_in = 0, 0.0
      for i, n in enumerate(rows):
        bytes_in += n * per_row
        if bytes_in >= target or i == len(rows) - 1:
          shards.append({"pieces": [[str(path), [first, i + 1]]], "bytes": round(bytes_in)})
          first, bytes_in = i + 1, 0.0
      continue
    if corpus.splittable(path) and size > target:
      close()
      for first in range(0, size, target):
        end = min(first + target, size)
        shards.append({"pieces": [[str(path), [first, end]]], "bytes": end - first})
      continue
    current.append([str(path), None])
    filled += size
    if filled >= target:
      close()
  close()
  return shards


def shard_inputs(shard: dict) -> list:
  """The shard's files and parts of files, as corpus.documents takes them."""
  return [
    corpus.open_path(name) if groups is None else (corpus.open_path(name), tuple(groups))
    for name, groups in shard["pieces"]
  ]


def held_out(raw: bytes, eval_frac: float) -> bool:
  """Whether a document (its UTF-8 bytes) is held out: by a hash of its text, stable under any
  reordering."""
  bucket = int.from_bytes(hashlib.sha1(raw).digest()[:4], "big")
  return bucket < eval_frac * 2**32


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
  """Loaded once per worker process, not once per shard."""
  return tokenizer_lib.load(path)


def _shard_name(i: int) -> str:
  return f"shards/{i:05d}"


def build_shard(entry: str, index: int, shard: dict, job: dict) -> int:
  """Builds shard `index` of the source at `entry` (run in a worker process); returns its input
  bytes. `job`: tokenizer (path), text_field, exclude, eval_frac."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
  tok = _tokenizer(job["tokenizer"])
  final = storage.location(entry) / _shard_name(index)
  remote = storage.is_remote(entry)
  target = str(final) if remote else str(store.partial_dir(Path(os.fspath(final))))
  writers = {
    split: store.Writer(f"{target}/{split}", tok.eos_id, in_place=True)
    for split in ("train", "eval")
  }
  nbytes = 0
  try:
    batch: list[str] = []
    docs = corpus.documents(shard_inputs(shard), job["text_field"], job.get("exclude"))
    for doc in itertools.chain(docs, [None]):  # streamed: a shard is never held in memory
      if doc is not None:
        batch.append(doc)
      if batch and (doc is None or len(batch) == ENCODE_BATCH):
        for text, ids in zip(batch, tok.encode(batch, threads=1), strict=True):
          raw = text.encode("utf-8", "replace")
          nbytes += len(raw)
          writers["eval" if held_out(raw, job["eval_frac"]) else "train"].add(ids)
        batch = []
    meta = {"tokenizer": tok.fingerprint}
    done = {split: w.finish(meta) for split, w in writers.items()}
  except BaseException:
    if not remote:
      shutil.rmtree(target, ignore_errors=True)
    raise
  summary = {
    split: {k: m[k] for k in ("n_tokens", "n_docs", "content", "max_token_id")}
    for split, m in done.items()
  }
  # (which process of the run built it: a record for the curious, not part of any content)
  built_by = {"process": job.get("process", 0), "host": socket.gethostname()}
  store.write_text(target, "done.json", json.dumps({**summary, "bytes": nbytes, **built_by}))
  if not remote:
    store.publish(Path(target), Path(os.fspath(final)))
  return nbytes


def _kv(entry: str):
  return ts.KvStore.open(storage.kvstore_url(entry)).result()


def finished(kv, shards) -> set[int]:
  """Which of the shards have their done.json: read concurrently, one small read each (a listing
  would return every array file of every shard, on Cloud Storage a thousand keys per request)."""
  reads = {i: kv.read(f"{_shard_name(i)}/done.json") for i in shards}
  return {i for i, read in reads.items() if read.result().state == "value"}


def _read_json(kv, key: str):
  found = kv.read(key).result()
  return json.loads(found.value) if found.state == "value" else None


def build(
  entry: str,
  shards: list[dict],
  job: dict,
  process: tuple[int, int] = (0, 1),
  workers: int = 0,
  progress: bool = True,
  label: str = "",
) -> dict:
  """Builds this process's missing shards with `workers` processes (0: one per core), waits for
  every other process's, and returns the source's meta.json (process 0 writes it)."""
  kv = _kv(entry)
  meta = _read_json(kv, "meta.json")
  if meta is not None:
    return meta
  storage.check_writable(storage.location(entry), "data.cache_dir")
  index, count = process
  storage.write_atomic(storage.location(entry) / "plan.json", json.dumps(shards) + "\n")
  done = finished(kv, range(len(shards)))
  mine = [i for i in range(len(shards)) if i % count == index and i not in done]
  if mine:
    job = {**job, "process": index}
    _run(entry, shards, job, mine, workers or os.cpu_count() or 1, progress, label, len(done))
  meta = _wait(kv, set(range(len(shards))) - done - set(mine), index == 0, label)
  if meta is None:  # process 0: every shard is done
    meta = _summarize(kv, len(shards))
    store.write_text(entry, "meta.json", json.dumps(meta, indent=2))
  return meta


def _run(entry, shards, job, mine, workers, progress, label, already):
  total = sum(shards[i]["bytes"] for i in mine)
  if progress:
    used = min(workers, len(mine))
    print(
      f"celerity_jax: {label}: building token stores in {entry}: {len(mine)} of {len(shards)} "
      f"shards ({already} already built) with {used} process{'es' * (used > 1)}",
      file=sys.stderr,
    )
  bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
             file=sys.stderr)  # fmt: skip
  start, nbytes = time.perf_counter(), 0
  try:
    if workers == 1 or len(mine) == 1:
      for i in mine:
        nbytes += build_shard(entry, i, shards[i], job)
        bar.update(shards[i]["bytes"])
    else:
      # spawn: a forked child of a process that has started JAX's threads may deadlock
      context = multiprocessing.get_context("spawn")
      with ProcessPoolExecutor(min(workers, len(mine)), mp_context=context) as pool:
        running = {pool.submit(build_shard, entry, i, shards[i], job): i for i in mine}
        while running:
          finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
          for future in finished_now:
            i = running.pop(future)
            try:
              nbytes += future.result()  # a worker's DataError is raised here, in this process
            except BrokenProcessPool:
              raise DataError(
                f"{label}: a tokenizing process died while building shard {i} (killed, or out "
                f"of memory: fewer data.build_processes use less); the same command resumes "
                f"from the finished shards"
              ) from None
            bar.update(shards[i]["bytes"])
  finally:
    bar.close()
  seconds = time.perf_counter() - start
  if progress:
    print(
      f"celerity_jax: {label}: tokenized {nbytes / 1e6:.1f} MB in {seconds:.1f} s "
      f"({nbytes / 1e6 / seconds:.2f} MB/s)",
      file=sys.stderr,
    )


def _wait(kv, others: set[int], primary: bool, label: str):
  """Process 0: None once the other processes' shards `others` are done (those still missing are
  read again each poll); the others: the source's meta.json."""
  since, said = time.monotonic(), 0.0
  while True:
    if primary:
      others -= finished(kv, others)
      if not others:
        return None
    elif (meta := _read_json(kv, "meta.json")) is not None:
      return meta
    waited = time.monotonic() - since
    if waited - said >= 60:
      missing = f"{len(others)} shards missing" if primary else "no meta.json yet"
      print(f"celerity_jax: {label}: waiting for the other processes ({missing}, {waited:.0f} s)",
            file=sys.stderr)  # fmt: skip
      said = waited
    time.sleep(POLL_S)


def _summarize(kv, n: int) -> dict:
  """The source's meta.json from its shards' done.json files (read concurrently)."""
  reads = [kv.read(f"{_shard_name(i)}/done.json") for i in range(n)]
  done = [json.loads(r.result().value) for r in reads]
  splits = {}
  for split in ("train", "eval"):
    parts = [d[split] for d in done]
    splits[split] = {
      "n_tokens": sum(p["n_tokens"] for p in parts),
      "n_docs": sum(p["n_docs"] for p in parts),
      "max_token_id": max(p["max_token_id"] for p in parts),
      "content": store.combined_content([p["content"] for p in parts]),
    }
  return {
    "format": store.FORMAT,
    "bytes": sum(d["bytes"] for d in done),
    "shards": [{split: d[split]["n_tokens"] for split in ("train", "eval")} for d in done],
    **splits,
  }


class SplitStore:
  """The train or held-out split of a built source: its shards' stores read as one token array
  (a tensorstore concatenation: a window may span two shards)."""

  def __init__(self, entry: str, split: str, meta: dict, tokenizer_fingerprint: str, vocab: int):
    self.path = f"{entry}/{split}"
    info = meta[split]
    if info["max_token_id"] >= vocab:
      raise DataError(
        f"token store {entry}: token id {info['max_token_id']} >= model.vocab_size={vocab}"
      )
    names = [
      f"{entry}/{_shard_name(i)}/{split}"
      for i, counts in enumerate(meta["shards"])
      if counts[split]
    ]
    # each shard's store is checked as it opens (a listing and a few reads): thousands of shards on
    # Cloud Storage open in parallel, not one round trip after another
    with ThreadPoolExecutor(OPEN_THREADS) as pool:
      parts = list(pool.map(lambda n: store.TokenStore(n, tokenizer_fingerprint, vocab), names))
    if not parts:
      raise DataError(f"token store {entry}: the {split} split has no tokens")
    self.parts = parts
    self.n_tokens = sum(p.n_tokens for p in parts)
    if self.n_tokens != info["n_tokens"]:
      raise DataError(f"token store {entry}: shards do not add up to meta.json; rebuild it")
    self.meta = info
    self.content = info["content"]
    arrays = [p.tokens for p in parts]
    self.tokens = ts.concat(arrays, axis=0) if len(arrays) > 1 else arrays[0]

  def read(self, starts: np.ndarray, length: int) -> np.ndarray:
    return self.parts[0].read(starts, length, self.tokens)

  def doc_offsets(self) -> np.ndarray:
    """Document boundaries in the concatenated array (starting at 0)."""
    out, base = [np.zeros(1, np.int64)], 0
    for part in self.parts:
      offsets = part.doc_offsets()
      out.append(offsets[1:] + base)
      base += part.n_tokens
    return np.concatenate(out)
