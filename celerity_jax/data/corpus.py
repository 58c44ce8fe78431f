"""Documents from text files: `.txt` (one file = one document), `.jsonl` (one `text` field per line
= one document) and their `.gz` forms; and the built-in `stdlib` corpus, the Python standard library
source of the running interpreter (~30 MB of code and docstrings, present on every machine).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from celerity_jax.data import DataError

SUFFIXES = (".txt", ".jsonl", ".py")


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


def resolve_paths(spec: str) -> list[Path]:
  """Comma-separated files, directories (searched recursively) or globs -> sorted readable files."""
  files: list[Path] = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    path = Path(item).expanduser()
    if path.is_dir():
      found = [p for p in path.rglob("*") if p.is_file() and _kind(p)]
    elif any(ch in item for ch in "*?["):
      found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    elif path.is_file():
      found = [path]
    else:
      raise DataError(f"data.paths: {item}: no such file or directory")
    for p in found:
      if not _kind(p):
        raise DataError(f"data.paths: {p}: unsupported file type (use .txt, .jsonl, .py or .gz)")
    if not found:
      raise DataError(f"data.paths: {item}: matched no .txt/.jsonl(.gz) files")
    files += found
  if not files:
    raise DataError("data.paths is empty: name at least one file, directory or glob")
  return sorted({p.resolve() for p in files})


def _kind(path: Path) -> str | None:
  name = path.name[:-3] if path.name.endswith(".gz") else path.name
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      return "jsonl" if suffix == ".jsonl" else "text"
  return None


def _open_text(path: Path):
  if path.name.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace")
  return path.open("r", encoding="utf-8", errors="replace")


def documents(files: list[Path]) -> Iterator[str]:
  """Yields every non-empty document of `files`, in order."""
  for path in files:
    try:
      with _open_text(path) as f:
        if _kind(path) == "jsonl":
          for number, line in enumerate(f, 1):
            if not line.strip():
              continue
            try:
              text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
              raise DataError(f"{path}:{number}: not a JSON object with a 'text' field") from None
            if not isinstance(text, str):
              raise DataError(f"{path}:{number}: 'text' is a {type(text).__name__}, not a string")
            if text.strip():
              yield text
        else:
          text = f.read()
          if "\0" in text:  # text has no NUL; binaries nearly always do
            raise DataError(f"{path}: not a text file (it holds NUL bytes)")
          if text.strip():  # whitespace alone is no document
            yield text
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
      raise DataError(f"{path}: cannot read: {e}") from None


def fingerprint(files: list[Path]) -> str:
  """Content hash of the corpus (names relative to their common root, and bytes)."""
  digest = hashlib.sha256()
  root = files[0].parent if len(files) == 1 else Path(os.path.commonpath(files))
  for path in files:
    digest.update(str(path.relative_to(root)).encode() + b"\0")
    digest.update(path.read_bytes())
  return digest.hexdigest()[:16]
