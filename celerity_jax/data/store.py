"""Token store: one flat token array plus document offsets, written with tensorstore (zarr3).

Layout of a store directory (local path or gs://bucket/path):
  tokens/       zarr3 int32 [n_tokens]       every document's tokens followed by EOS
  offsets/      zarr3 int64 [n_docs + 1]     document d is tokens[offsets[d]:offsets[d+1]]
  meta.json     written last; a store without it is incomplete and is never read
meta.json lists every array file with its size, checked when the store is opened (a deleted or
truncated shard is refused before training starts), and a digest of a sample of every shard (its
first and last SAMPLE tokens), read back when the store is opened: two intact shards swapped, or a
shard overwritten with another of the same size, are refused too. The digest over all samples is
the store's `content` fingerprint, which a run pins in its checkpoints. Every inner chunk carries a
crc32c checksum (corrupted bytes fail the read) and the token fill value is -1, so a read of a
chunk that is not there can never pass as tokens.
Local builds go to a sibling `.partial-HOST-PID` directory renamed into place, so an interrupted
build never leaves a store that looks complete and never touches an existing one. On Cloud Storage
(no renames) the store is written in place and meta.json, written last, is what marks it complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import tensorstore as ts

from celerity_jax import platform, storage
from celerity_jax.data import DataError

FORMAT = 3  # 3: shard samples and the content fingerprint in meta.json
FILL = -1  # no token id is negative: a read that returns it found no data
WRITE_CHUNK = 1 << 20  # tokens per file (zarr3 shard)
READ_CHUNK = 1 << 14  # tokens per independently readable inner chunk: windows read ~64 KB
CACHE_BYTES = 256 << 20  # decoded chunks kept in memory by a process's readers
READ_THREADS = 16  # tensorstore's read and decode threads per process
SAMPLE = 64  # tokens read at each end of every shard to check it is the shard that was written


def _spec(path: str, name: str) -> dict:
  return {"driver": "zarr3", "kvstore": storage.kvstore_url(path) + name + "/"}


def _create(path: str, name: str, dtype: str) -> ts.TensorStore:
  # both chunk sizes explicitly: left unset, zarr3 picks one-element inner chunks (100x slower)
  checked = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
  metadata = {
    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [WRITE_CHUNK]}},
    "codecs": [
      {
        "name": "sharding_indexed",
        "configuration": {"chunk_shape": [READ_CHUNK], "codecs": checked, "index_codecs": checked},
      }
    ],
    "data_type": dtype,
    "fill_value": FILL,
    "shape": [0],
  }
  return ts.open(
    {**_spec(path, name), "metadata": metadata}, create=True, delete_existing=True
  ).result()


def _append(array: ts.TensorStore, values: np.ndarray, at: int, wait: bool = True):
  """(the array grown by `values` at `at`, the write's future: already done when `wait`)."""
  array = array.resize(exclusive_max=[at + len(values)], expand_only=True).result()
  write = array[at : at + len(values)].write(values)
  if wait:
    write.result()
  return array, write


def _sample_reads(array: ts.TensorStore, length: int) -> list:
  """Futures of each WRITE_CHUNK shard's first and last SAMPLE elements, in shard order."""
  reads = []
  for start in range(0, length, WRITE_CHUNK):
    end = min(start + WRITE_CHUNK, length)
    reads.append(
      (array[start : min(start + SAMPLE, end)].read(), array[max(end - SAMPLE, start) : end].read())
    )
  return reads


def _shard_digests(pairs) -> list[str]:
  return [
    hashlib.sha256(
      np.ascontiguousarray(head).tobytes() + np.ascontiguousarray(tail).tobytes()
    ).hexdigest()[:16]
    for head, tail in pairs
  ]


def combined_content(contents: list[str]) -> str:
  """The content fingerprint of stores read one after another (a sharded source's split)."""
  if len(contents) == 1:
    return contents[0]
  return hashlib.sha256(json.dumps(contents).encode()).hexdigest()[:16]


def _content(n_tokens: int, n_docs: int, samples: dict) -> str:
  """The store's content fingerprint: its sizes and every shard's sample digest."""
  text = json.dumps({"n_tokens": n_tokens, "n_docs": n_docs, "samples": samples}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def partial_dir(final: Path) -> Path:
  """A build directory of this process's own (two processes building the same store never write
  into each other's), after removing those of dead processes of this host (killed builds)."""
  host = socket.gethostname()
  for stale in final.parent.glob(f"{final.name}.partial-{host}-*"):
    pid = stale.name.rsplit("-", 1)[-1]
    if pid.isdigit() and not platform.process_alive(int(pid)):
      shutil.rmtree(stale, ignore_errors=True)
  return final.with_name(f"{final.name}.partial-{host}-{os.getpid()}")


class Writer:
  """Writes one store from per-document token arrays (EOS appended here), streamed: memory holds
  at most WRITE_CHUNK tokens and the document offsets. A store may be empty (a shard whose
  documents were all held out): it then has meta.json and no arrays."""

  def __init__(self, path: str, eos_id: int, in_place: bool = False):
    """`in_place`: write into `path` directly (a shard's stores, inside the shard's own partial
    directory); else locally into a partial directory moved into place at the end."""
    self.path, self.eos_id = path, eos_id
    self.local = not storage.is_remote(path) and not in_place
    self.final = Path(path) if self.local else None
    self.target = str(partial_dir(self.final)) if self.local else path
    if not storage.is_remote(path):
      Path(self.target).mkdir(parents=True, exist_ok=in_place)
    self.tokens = None
    self.n_tokens, self.offsets, self.max_id = 0, [0], -1
    self.buffer: list[np.ndarray] = []
    self.pending = 0
    self._eos = np.asarray([eos_id], np.int32)
    self.writing = None  # the last block's write

  def add(self, ids):
    self.buffer += (ids, self._eos)  # (concatenated at the flush: one copy per WRITE_CHUNK)
    self.pending += len(ids) + 1
    self.offsets.append(self.offsets[-1] + len(ids) + 1)
    if self.pending >= WRITE_CHUNK:
      self._flush()

  def _flush(self):
    if self.buffer:
      block = np.concatenate(self.buffer).astype(np.int32, copy=False)
      self.max_id = max(self.max_id, int(block.max()))
      if self.tokens is None:
        self.tokens = _create(self.target, "tokens", "int32")
      if self.writing is not None:
        self.writing.result()
      # the write runs on tensorstore's threads while the next block is encoded
      self.tokens, self.writing = _append(self.tokens, block, self.n_tokens, wait=False)
      self.n_tokens += len(block)
      self.buffer, self.pending = [], 0

  def finish(self, meta: dict) -> dict:
    """Writes the offsets and meta.json (last), moves a local build into place; returns meta."""
    self._flush()
    if self.writing is not None:
      self.writing.result()
    samples = {}
    if self.n_tokens:
      offsets, _ = _append(
        _create(self.target, "offsets", "int64"), np.asarray(self.offsets, np.int64), 0
      )
      samples = {
        name: _shard_digests([(a.result(), b.result()) for a, b in _sample_reads(array, size)])
        for name, array, size in (
          ("tokens", self.tokens, self.n_tokens),
          ("offsets", offsets, len(self.offsets)),
        )
      }
    n_docs = len(self.offsets) - 1
    meta = {
      **meta,
      "format": FORMAT,
      "n_tokens": self.n_tokens,
      "n_docs": n_docs,
      "max_token_id": self.max_id,
      "files": storage.file_sizes(storage.location(self.target)),
      "samples": samples,
      "content": _content(self.n_tokens, n_docs, samples),
    }
    write_text(self.target, "meta.json", json.dumps(meta, indent=2))
    if self.local:
      publish(Path(self.target), self.final)
    return meta


def publish(built: Path, final: Path):
  """Moves a finished local build into place, unless another process finished it first."""
  if (final / "meta.json").exists() or (final / "done.json").exists():
    shutil.rmtree(built, ignore_errors=True)
  else:
    shutil.rmtree(final, ignore_errors=True)  # an incomplete build of the same name
    os.replace(built, final)


def write_text(path: str, name: str, text: str):
  kv = ts.KvStore.open(storage.kvstore_url(path)).result()
  kv.write(name, text.encode()).result()


@functools.lru_cache(maxsize=1)
def read_context() -> ts.Context:
  """The tensorstore resources every store of a process reads with: one cache of CACHE_BYTES of
  decoded chunks and one set of I/O threads, however many stores and shards are open."""
  return ts.Context(
    {
      "cache_pool": {"total_bytes_limit": CACHE_BYTES},
      "file_io_concurrency": {"limit": READ_THREADS},
      "data_copy_concurrency": {"limit": READ_THREADS},
    }
  )


class TokenStore:
  """Read access to a complete, validated store."""

  def __init__(
    self,
    path: str,
    tokenizer_fingerprint: str | None = None,
    vocab_size: int | None = None,
    context: ts.Context | None = None,
  ):
    """`context`: the tensorstore resources it reads with (default: read_context())."""
    self.path = path
    try:
      raw = ts.KvStore.open(storage.kvstore_url(path)).result().read("meta.json").result()
    except (ValueError, RuntimeError) as e:
      raise DataError(f"token store {path}: cannot read meta.json: {e}") from None
    if raw.state != "value":
      raise DataError(f"token store {path}: incomplete or not a store (no meta.json); rebuild it")
    try:
      self.meta = json.loads(raw.value)
    except json.JSONDecodeError:
      raise DataError(f"token store {path}: meta.json is corrupt; rebuild the store") from None
    if self.meta.get("format") != FORMAT:
      raise DataError(f"token store {path}: format {self.meta.get('format')}, expected {FORMAT}")
    if tokenizer_fingerprint and self.meta.get("tokenizer") != tokenizer_fingerprint:
      raise DataError(
        f"token store {path}: built with tokenizer {self.meta.get('tokenizer')}, "
        f"not the configured one ({tokenizer_fingerprint}); rebuild the store"
      )
    if vocab_size is not None and self.meta["max_token_id"] >= vocab_size:
      raise DataError(
        f"token store {path}: token id {self.meta['max_token_id']} >= model.vocab_size={vocab_size}"
      )
    self._check_files()
    try:
      context = context or read_context()
      self.tokens = ts.open(_spec(path, "tokens"), open=True, read=True, context=context).result()
      self.offsets = ts.open(_spec(path, "offsets"), open=True, read=True, context=context).result()
    except (ValueError, RuntimeError) as e:
      raise DataError(f"token store {path}: corrupt arrays ({e}); rebuild the store") from None
    if (
      self.tokens.shape[0] != self.meta["n_tokens"]
      or self.offsets.shape[0] != self.meta["n_docs"] + 1
    ):
      raise DataError(f"token store {path}: arrays do not match meta.json (truncated?); rebuild")
    self.n_tokens = self.meta["n_tokens"]
    self.content = self.meta["content"]
    self._check_samples()

  def _check_samples(self):
    """Every shard still starts and ends with the tokens it was written with."""
    arrays = {
      "tokens": (self.tokens, self.n_tokens),
      "offsets": (self.offsets, self.meta["n_docs"] + 1),
    }
    for name, (array, size) in arrays.items():
      pairs = [(self._result(a), self._result(b)) for a, b in _sample_reads(array, size)]
      for shard, (found, expected) in enumerate(
        zip(_shard_digests(pairs), self.meta["samples"][name], strict=True)
      ):
        if found != expected:
          raise DataError(
            f"token store {self.path}: {name}/c/{shard} holds other data than was written there "
            f"(shards swapped or overwritten?); delete the directory to rebuild it"
          )

  def _check_files(self):
    """Every array file meta.json lists is there with its size: before any step reads one."""
    found = storage.file_sizes(storage.location(self.path))
    for name, size in sorted(self.meta["files"].items()):
      if name not in found:
        raise DataError(
          f"token store {self.path}: file {name} is missing; the store is "
          f"incomplete: delete the directory to rebuild it"
        )
      if found[name] != size:
        raise DataError(
          f"token store {self.path}: file {name} has {found[name]:,} bytes, "
          f"meta.json says {size:,} (truncated or overwritten); delete the "
          f"directory to rebuild it"
        )

  def read(self, starts: np.ndarray, length: int, tokens=None) -> np.ndarray:
    """Rows tokens[s:s+length] for each start, read concurrently; int32 [len(starts), length].
    `tokens`: another array to read (several stores concatenated), checked the same way."""
    tokens = self.tokens if tokens is None else tokens
    futures = [tokens[int(s) : int(s) + length].read() for s in starts]
    rows = (
      np.stack([self._result(f) for f in futures]) if futures else np.zeros((0, length), np.int32)
    )
    if (rows == FILL).any():
      raise DataError(
        f"token store {self.path}: a read found no data (a chunk is missing); "
        f"delete the directory to rebuild it"
      )
    return rows

  def doc_offsets(self) -> np.ndarray:
    return self._result(self.offsets.read())

  def _result(self, future):
    try:
      return future.result()
    except (ValueError, RuntimeError) as e:  # tensorstore: DATA_LOSS (checksum), NOT_FOUND
      message = " ".join(str(e).split())[:200]
      raise DataError(
        f"token store {self.path}: unreadable ({message}); delete the directory to rebuild it"
      ) from None
