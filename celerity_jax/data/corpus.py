"""Documents from files: `.txt` and `.py` (one file = one document), `.jsonl` (one JSON object per
line, its text field = one document) and their `.gz` and `.zst` forms, and `.parquet` (one row's
text column = one document, read a row group at a time, so memory is bounded by a row group, not
the file). The text field or column is `data.text_field` ("text"; e.g. "content" for StarCoder).
Paths are local or any URL the project's storage reads (`gs://...`). And the built-in `stdlib`
corpus, the Python standard library source of the running interpreter (~30 MB of code and
docstrings, present on every machine).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from celerity_jax import storage
from celerity_jax.data import DataError

KINDS = {".txt": "text", ".py": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSED = (".gz", ".zst")  # around .txt, .py and .jsonl (parquet compresses inside)
PARQUET_BATCH = 1024  # rows decoded at a time
SAMPLE_BYTES = 1 << 16  # read at three places of each file for the corpus fingerprint


def stdlib_files() -> list[Path]:
  root = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(
    p
    for p in root.rglob("*.py")
    if not ({"site-packages", "dist-packages", "__pycache__"} & set(p.parts))
  )
  if not files:
    raise DataError(f"built-in corpus 'stdlib': no .py files under {root}")
  return files


def resolve_paths(spec: str) -> list:
  """Comma-separated files, directories (searched recursively) or globs, local or URLs -> sorted
  readable files (pathlib paths, or storage paths for URLs)."""
  files = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    found = _expand(item)
    for p in found:
      if not _kind(p):
        raise DataError(
          f"data.paths: {p}: unsupported file type (use .txt, .py, .jsonl or their .gz or .zst "
          f"forms, or .parquet)"
        )
    if not found:
      raise DataError(f"data.paths: {item}: matched no .txt/.py/.jsonl(.gz/.zst)/.parquet files")
    files += found
  if not files:
    raise DataError("data.paths is empty: name at least one file, directory or glob")
  unique = {str(p): p for p in files}
  return [unique[name] for name in sorted(unique)]


def _expand(item: str) -> list:
  globbed = any(ch in item for ch in "*?[")
  if "://" not in item:
    path = Path(item).expanduser()
    if path.is_dir():
      return [p.resolve() for p in path.rglob("*") if p.is_file() and _kind(p)]
    if globbed:
      return [Path(p).resolve() for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if path.is_file():
      return [path.resolve()]
    raise DataError(f"data.paths: {item}: no such file or directory")
  if not storage.is_remote(item):
    try:
      found = UrlPath(item).expand()
    except OSError as e:
      raise DataError(f"data.paths: {item}: cannot list: {e}") from None
    if not found:
      raise DataError(f"data.paths: {item}: no such file or directory")
    return [p for p in found if _kind(p)] if not any(ch in item for ch in "*?[") else found
  scheme = item.split("://", 1)[0]
  # (gcsfs's glob and walk answer without the scheme: put it back)
  located = lambda p: p if "://" in str(p) else storage.location(f"{scheme}://{p}")  # noqa: E731
  try:
    if globbed:  # the part before the first wildcard's folder is the root the pattern is under
      head = item[: min(item.index(ch) for ch in "*?[" if ch in item)]
      root = head.rsplit("/", 1)[0]
      found = map(located, storage.location(root).glob(item[len(root) + 1 :]))
      return [p for p in found if p.is_file()]
    path = storage.location(item)
    if path.is_dir():  # (walk: Cloud Storage paths have no recursive glob)
      found = (located(folder) / name for folder, _, names in path.walk() for name in names)
      return [p for p in found if _kind(p)]
    if path.exists():
      return [path]
  except OSError as e:
    raise DataError(f"data.paths: {item}: cannot list: {e}") from None
  raise DataError(f"data.paths: {item}: no such file or directory")


def _kind(path) -> str | None:
  name = path.name
  for suffix in COMPRESSED:
    if name.endswith(suffix):
      name = name[: -len(suffix)]
      break
  else:
    suffix = ""
  kind = next((k for ending, k in KINDS.items() if name.endswith(ending)), None)
  return None if kind == "parquet" and suffix else kind


def _open_text(raw, path):
  """A text stream over the binary file `raw`, decompressed by `path`'s suffix."""
  if path.name.endswith(".gz"):
    raw = gzip.GzipFile(fileobj=raw)
  elif path.name.endswith(".zst"):
    raw = io.BufferedReader(_Zstd(raw, path), 1 << 16)
  return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


class _Zstd(io.RawIOBase):
  """A zstd stream of one or more frames, decompressed as it is read. zstandard's own stream
  reader returns a truncated file's readable part as if it were whole; this one checks that the
  last frame ended and raises DataError where it did not."""

  def __init__(self, raw, path):
    import zstandard

    self.raw, self.path, self.new = raw, path, zstandard.ZstdDecompressor().decompressobj
    self.frame, self.pending = self.new(), b""

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self.pending:
      chunk = self.raw.read(1 << 16)
      if not chunk:
        if not self.frame.eof:
          raise DataError(f"{self.path}: cannot read: the zstd stream ends inside a frame")
        return 0
      while chunk:
        if self.frame.eof:  # the previous frame ended: the rest is the next one
          self.frame = self.new()
        self.pending += self.frame.decompress(chunk)
        chunk = self.frame.unused_data if self.frame.eof else b""
    n = min(len(buffer), len(self.pending))
    buffer[:n], self.pending = self.pending[:n], self.pending[n:]
    return n


def open_path(name: str):
  """A file named as plan.json records it (data/shards.py): a local path or a URL."""
  if "://" not in name:
    return Path(name)
  return storage.location(name) if storage.is_remote(name) else UrlPath(name)


class UrlPath:
  """A file at any other URL fsspec reads (s3://, hf://, https://, memory://, ...), with the
  few path methods the corpus uses. gs:// goes through the project's storage paths instead."""

  def __init__(self, url: str):
    import fsspec

    self.url = url
    try:
      self.fs, self.path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown scheme, or its library not installed
      raise DataError(f"data.paths: {url}: cannot open: {e}") from None
    self.name = url.rstrip("/").rsplit("/", 1)[-1]

  def __str__(self) -> str:
    return self.url

  def open(self, mode: str = "rb"):
    return self.fs.open(self.path, mode)

  def stat(self):
    return os.stat_result((0, 0, 0, 0, 0, 0, self.fs.size(self.path), 0, 0, 0))

  def is_file(self) -> bool:
    return self.fs.isfile(self.path)

  def expand(self) -> list:
    """The file, the files under the folder, or the glob's files."""
    if any(ch in self.url for ch in "*?["):
      found = self.fs.glob(self.path)
    elif self.fs.isdir(self.path):
      found = self.fs.find(self.path)
    else:
      found = [self.path] if self.fs.exists(self.path) else []
    files = [UrlPath(self.fs.unstrip_protocol(p)) for p in found]
    return [f for f in files if f.is_file()]


def documents(files: list, text_field: str = "text", exclude: dict | None = None) -> Iterator[str]:
  """Yields every non-empty document of `files`, in order. An item may also be a pair (path,
  (first, end)): that part of the file, row groups of a parquet file or bytes of a plain .jsonl
  (the lines that start in [first, end)). `exclude`: {field: [values]} skips the
  JSONL records or parquet rows whose field (dotted into nested objects: meta.set_name) holds one
  of the values (SlimPajama's web subsets)."""
  import zstandard

  for item in files:
    path, part = item if isinstance(item, tuple) else (item, None)
    try:
      with path.open("rb") as raw:
        kind = _kind(path)
        if kind == "parquet":
          yield from _parquet_documents(raw, path, text_field, part, exclude or {})
        elif kind == "jsonl" and part:
          yield from _jsonl_documents(_byte_range(raw, *part), path, text_field, exclude or {})
        elif kind == "jsonl":
          lines = enumerate(_open_text(raw, path), 1)
          yield from _jsonl_documents(lines, path, text_field, exclude or {})
        else:
          text = _open_text(raw, path).read()
          if "\0" in text:  # text has no NUL; binaries nearly always do
            raise DataError(f"{path}: not a text file (it holds NUL bytes)")
          if text.strip():  # whitespace alone is no document
            yield text
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:  # BadGzipFile: OSError
      raise DataError(f"{path}: cannot read: {e}") from None


def row_groups(path) -> list[int]:
  """Rows of each row group of a parquet file (its footer only is read)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    with path.open("rb") as raw:
      meta = pq.ParquetFile(raw).metadata
      return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"{path}: not a readable parquet file: {e}") from None


def _lookup(record, dotted: str):
  for part in dotted.split("."):
    record = record.get(part) if isinstance(record, dict) else None
  return record


def _excluded(record: dict, exclude: dict) -> bool:
  return any(_lookup(record, field) in values for field, values in exclude.items())


def splittable(path) -> bool:
  """A plain .jsonl file: its lines can be read from any byte offset (data/shards.py)."""
  return _kind(path) == "jsonl" and not path.name.endswith(COMPRESSED)


def _byte_range(raw, first: int, end: int):
  """(where, line) of the lines of a binary file that start at a byte offset in [first, end):
  the line a range begins inside belongs to the range before."""
  raw.seek(first)
  at = first
  if first:
    at += len(raw.readline())
  while at < end:
    line = raw.readline()
    if not line:
      return
    yield f"byte {at}", line.decode("utf-8", "replace")
    at += len(line)


def _jsonl_documents(lines, path, field: str, exclude: dict) -> Iterator[str]:
  for where, line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      text = record[field]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise DataError(f"{path}:{where}: not a JSON object with a {field!r} field") from None
    if exclude and _excluded(record, exclude):
      continue
    if not isinstance(text, str):
      raise DataError(f"{path}:{where}: {field!r} is a {type(text).__name__}, not a string")
    if text.strip():
      yield text


def _parquet_documents(raw, path, column: str, groups, exclude: dict) -> Iterator[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    table = pq.ParquetFile(raw)
    schema = table.schema_arrow
    if column not in schema.names:
      raise DataError(
        f"{path}: no column {column!r} (data.text_field); it has {', '.join(schema.names)}"
      )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise DataError(f"{path}: column {column!r} holds {kind}, not strings")
    tops = sorted({field.split(".")[0] for field in exclude} - {column})
    missing = [top for top in tops if top not in schema.names]
    if missing:
      raise DataError(f"{path}: no column {missing[0]!r} (a source's exclude); it has "
                      f"{', '.join(schema.names)}")  # fmt: skip
    groups = range(*groups) if groups else None
    for batch in table.iter_batches(PARQUET_BATCH, row_groups=groups, columns=[column, *tops]):
      records = batch.to_pylist() if exclude else ({column: t} for t in batch.column(0).to_pylist())
      for record in records:
        text = record[column]
        if text and text.strip() and not (exclude and _excluded(record, exclude)):
          yield text
  except pa.ArrowException as e:
    raise DataError(f"{path}: not a readable parquet file: {e}") from None


def size(path) -> int:
  """A file's bytes, local or on a storage path (whose stat calls it `length`)."""
  stat = path.stat()
  return getattr(stat, "st_size", None) or getattr(stat, "length", 0)


def fingerprint(files: list, text_field: str = "text", exclude: dict | None = None) -> str:
  """A hash of the corpus read in O(files), not O(bytes): names relative to their common root,
  sizes, and SAMPLE_BYTES at the start, middle and end of each file (and the text field when it is
  not the default, since the same bytes then give other documents). A terabyte corpus is not
  read at every start; an edit that keeps a file's size and misses those three places is not seen
  (a new data.cache_dir rebuilds)."""
  digest = hashlib.sha256()
  names = [str(p) for p in files]
  root = str(files[0].parent) if len(files) == 1 else os.path.commonpath(names)
  for path, name in zip(files, names, strict=True):
    length = size(path)
    digest.update(os.path.relpath(name, root).encode() + b"\0" + str(length).encode() + b"\0")
    with path.open("rb") as f:
      for at in sorted({0, max(0, length // 2 - SAMPLE_BYTES // 2), max(0, length - SAMPLE_BYTES)}):
        f.seek(at)
        digest.update(f.read(SAMPLE_BYTES))
  if text_field != "text":
    digest.update(b"\0text_field=" + text_field.encode())
  if exclude:
    digest.update(b"\0exclude=" + json.dumps(exclude, sort_keys=True).encode())
  return digest.hexdigest()[:16]
