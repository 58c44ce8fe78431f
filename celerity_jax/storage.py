"""Where run files live: a local path or a Cloud Storage URL (gs://bucket/path), behind one type.

Everything a run writes or reads outside arrays goes through `location()` (an etils.epath Path:
pathlib on local disk, gcsfs for gs://); arrays go through tensorstore, which takes `kvstore_url`.
Cloud Storage differs from a disk in three ways that matter here, and each is handled once, here:
  - no directories: `make_dir` creates nothing there, and never a bucket (gcsfs would create a
    missing bucket on mkdir; a typo must fail instead: `check_writable`);
  - no append: `append` uploads the new bytes as a temporary object and composes it onto the end;
  - object writes are atomic, so `write_atomic` needs no temporary file there.
Tests point gcsfs and tensorstore at a local emulator through STORAGE_EMULATOR_HOST and
TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from etils import epath

from celerity_jax.config import ConfigError

REMOTE_SCHEMES = ("gs://",)


class StorageError(ConfigError):
  """A configured location cannot be used (missing bucket, no permission); names the key."""


def is_remote(where) -> bool:
  return os.fspath(where).startswith(REMOTE_SCHEMES)


def location(where) -> epath.Path:
  """A Path for a local path (~ expanded, made absolute) or a gs:// URL."""
  if is_remote(where):
    return epath.Path(os.fspath(where))
  return epath.Path(Path(os.fspath(where)).expanduser().absolute())


def kvstore_url(where) -> str:
  """The directory as a tensorstore kvstore URL (file:///... or gs://...), ending in '/'."""
  where = os.fspath(where)
  if is_remote(where):
    return where.rstrip("/") + "/"
  return "file://" + str(Path(where).expanduser().resolve()) + "/"


def make_dir(path: epath.Path):
  if not is_remote(path):
    path.mkdir(parents=True, exist_ok=True)


def check_writable(path: epath.Path, key: str):
  """Fails early, naming `key`, when `path` cannot hold a run's files."""
  try:
    if is_remote(path):
      bucket = os.fspath(path)[len("gs://") :].split("/", 1)[0]
      if not bucket or not _gcs().exists(bucket):
        raise StorageError(
          f"{key}={path}: bucket gs://{bucket} does not exist or is not "
          f"visible with these credentials"
        )
    else:
      make_dir(path)
      probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"  # an existing read-only directory
      probe.write_bytes(b"")  # passes mkdir, not this
      probe.unlink()
  except StorageError:
    raise
  except Exception as e:  # gcsfs/auth/OS errors: one line, naming the setting
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    raise StorageError(f"{key}={path}: cannot be used ({reason})") from None


def write_atomic(path: epath.Path, data: bytes | str):
  """Readers see the old content or the new, never a torn file."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    path.write_bytes(data)
    _forget(path)
    return
  partial = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex[:8]}")
  partial.write_bytes(data)
  os.replace(partial, path)


APPEND_TAIL = ".celerity-append-"  # the staged object of a remote append, beside the file


def append(path: epath.Path, data: bytes | str):
  """Adds `data` at the end of `path` (created if missing). On Cloud Storage the data is staged as
  an object named APPEND_TAIL... (no part of the file's name, so a tail that a killed process
  leaves is not taken for a TensorBoard event file) and composed onto the file."""
  data = data.encode() if isinstance(data, str) else data
  if not data:
    return
  if not is_remote(path):
    with open(path, "ab") as f:
      f.write(data)
    return
  fs, key = _gcs(), os.fspath(path)[len("gs://") :]
  if not fs.exists(key):
    fs.pipe(key, data)
  else:
    tail = f"{key.rsplit('/', 1)[0]}/{APPEND_TAIL}{uuid.uuid4().hex[:12]}"
    fs.pipe(tail, data)
    try:
      fs.merge(key, [key, tail])  # server-side compose: no download
    except NotImplementedError:  # zonal buckets have no compose
      fs.pipe(key, fs.cat(key) + data)
    finally:
      fs.rm(tail)
  _forget(path)


def remove_append_tails(directory: epath.Path):
  """Deletes the staged appends a process killed inside append() left in `directory` (call it
  from the directory's only writer before it appends)."""
  if is_remote(directory):
    fs = _gcs()
    prefix = os.fspath(directory)[len("gs://") :].rstrip("/")
    fs.invalidate_cache(prefix)
    for key in fs.glob(f"{prefix}/{APPEND_TAIL}*"):
      fs.rm(key)


def file_sizes(directory: epath.Path) -> dict[str, int]:
  """{relative path: bytes} of every file under `directory` (one listing on Cloud Storage)."""
  if not is_remote(directory):
    root = Path(os.fspath(directory))
    return {
      p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }
  prefix = os.fspath(directory)[len("gs://") :].rstrip("/") + "/"
  return {
    key[len(prefix) :]: int(info["size"])
    for key, info in _gcs().find(prefix, detail=True).items()
    if info["type"] == "file"
  }


def move(source: epath.Path, target: epath.Path):
  """Renames a file or directory (on Cloud Storage: copies each object, then deletes it)."""
  if not is_remote(source):
    os.replace(source, target)
    return
  _gcs().mv(os.fspath(source)[len("gs://") :], os.fspath(target)[len("gs://") :], recursive=True)
  _gcs().invalidate_cache()


def _gcs():
  """The gcsfs client etils.epath uses for gs:// paths: one client, one metadata cache."""
  return epath.backend.fsspec_backend.fs("gs://")


def _forget(path: epath.Path):
  """gcsfs caches object sizes; a read after our own write must not see the old size."""
  if is_remote(path):
    _gcs().invalidate_cache(os.fspath(path)[len("gs://") :])
