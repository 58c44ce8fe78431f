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

import errno
import logging
import os
import re
import shutil
import socket
import urllib.parse
import uuid
from pathlib import Path

from etils import epath

from celerity_jax.config import ConfigError

REMOTE_SCHEMES = ("gs://",)
# gcsfs logs every request it gives up on with a traceback; the caller's error says it in one line
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


class StorageError(ConfigError):
  """A configured location cannot be used (missing bucket, no permission); names the key."""


# A write that failed for want of space, however it reached us: an OSError, or tensorstore's and
# Orbax's messages around one (they carry the OS error's text and code).
NO_SPACE = (
  "No space left on device",
  "Disk quota exceeded",
  "os_error_code='28'",
  "os_error_code='122'",
)


def out_of_space(error: BaseException) -> bool:
  """Whether `error`, or one it was raised from, is a write that found no space."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(marker in str(error) for marker in NO_SPACE):
      return True
    error = error.__cause__ or error.__context__
  return False


def out_of_space_message(error: BaseException) -> str:
  """One line: the file that could not be written, and the space left where it lives."""
  path = _failed_path(error)
  where = Path(path)
  while not where.exists() and where != where.parent:
    where = where.parent
  usage = shutil.disk_usage(where)
  return (
    f"no space left on the device of {path} ({_size(usage.free)} free of {_size(usage.total)}); "
    f"free some space and run the same command again (a run resumes from its last checkpoint)"
  )


def _failed_path(error: BaseException) -> str:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.filename:
      return os.fspath(error.filename)
    quoted = re.findall(r'"(/[^"]+)"', str(error))  # tensorstore quotes the file it wrote
    if quoted:
      return quoted[-1]
    error = error.__cause__ or error.__context__
  return os.getcwd()


def _size(n: float) -> str:
  for unit in ("bytes", "KB", "MB", "GB", "TB"):
    if n < 1000 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1000


def is_remote(where) -> bool:
  return os.fspath(where).startswith(REMOTE_SCHEMES)


def location(where, key: str | None = None) -> epath.Path:
  """A Path for a local path (~ expanded, made absolute) or a gs:// URL (Cloud Storage is checked
  to answer, once per process: a machine without a network fails in seconds, in one line that
  names `key`, the setting, where given)."""
  if is_remote(where):
    reachable(key, where, write=False)
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


def check_writable(path: epath.Path, key: str) -> Path | None:
  """Fails early, naming `key`, when `path` cannot hold a run's files; returns the topmost
  directory it created (None if it created none), for `remove_if_empty` when a run is refused."""
  created = None
  try:
    if is_remote(path):
      reachable(key, path)
      bucket = os.fspath(path)[len("gs://") :].split("/", 1)[0]
      if not bucket or not _gcs().exists(bucket):
        raise StorageError(
          f"{key}={path}: bucket gs://{bucket} does not exist or is not "
          f"visible with these credentials"
        )
    else:
      created = next((p for p in reversed(Path(path).parents) if not p.exists()), None)
      if created is None and not path.exists():
        created = Path(path)
      make_dir(path)
      probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"  # an existing read-only directory
      probe.write_bytes(b"")  # passes mkdir, not this
      probe.unlink()
  except StorageError:
    raise
  except Exception as e:  # gcsfs/auth/OS errors: one line, naming the setting
    remove_if_empty(created)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    raise StorageError(f"{key}={path}: cannot be used ({reason})") from None
  return created


def remove_if_empty(directory: Path | None):
  """Removes `directory` (one check_writable created) if nothing but empty directories is in it."""
  try:
    if directory is None or not directory.is_dir():
      return
    if any(p.is_file() or p.is_symlink() for p in directory.rglob("*")):
      return
    for sub in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
      sub.rmdir()
    directory.rmdir()
  except OSError:  # (a name too long to stat, a directory another process wrote into)
    pass


CONNECT_TIMEOUT_S = 10.0


def write_atomic(path: epath.Path, data: bytes | str):
  """Readers see the old content or the new, never a torn file."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    path.write_bytes(data)
    _forget(path)
    return
  partial = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex[:8]}")
  try:
    partial.write_bytes(data)
  except OSError as e:  # (a failed write() names no file)
    partial.unlink(missing_ok=True)
    raise OSError(e.errno, e.strerror, os.fspath(path)) from e
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
    try:
      with open(path, "ab") as f:
        f.write(data)
    except OSError as e:  # (a failed write() names no file)
      raise OSError(e.errno, e.strerror, os.fspath(path)) from e
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


def _endpoint() -> tuple[str, int, bool]:
  """(host, port, is an emulator) of the Cloud Storage API this process talks to."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator:
    parsed = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
    return parsed.hostname or "localhost", parsed.port or 80, True
  return "storage.googleapis.com", 443, False


_REACHED: set = set()  # endpoints (and credentials) already checked by this process


def _why_not(write: bool) -> str | None:
  """Why Cloud Storage cannot be used from here, or None: one connection attempt of at most
  CONNECT_TIMEOUT_S, and, to write, credentials (an emulator needs none), before any gcsfs call:
  gcsfs retries an unreachable service, or writes refused to an anonymous client, for a minute
  and a half before it gives up."""
  host, port, emulator = _endpoint()
  if (host, port) not in _REACHED:
    try:
      socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
      reason = e.strerror or type(e).__name__
      return f"cannot reach Cloud Storage at {host}:{port} ({reason}); check the network"
    _REACHED.add((host, port))
  if write and not emulator and "credentials" not in _REACHED:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
      google.auth.default()
    except DefaultCredentialsError:
      return (
        "no Google Cloud credentials on this machine (run `gcloud auth application-default "
        "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key)"
      )
    _REACHED.add("credentials")
  return None


def reachable(key: str | None, where, write: bool = True):
  """Raises StorageError, naming `key`, when Cloud Storage cannot be reached (or, to `write`,
  there are no credentials)."""
  reason = _why_not(write)
  if reason:
    raise StorageError(f"{key}={where}: {reason}" if key else f"{where}: {reason}")


def _gcs():
  """The gcsfs client etils.epath uses for gs:// paths: one client, one metadata cache."""
  return epath.backend.fsspec_backend.fs("gs://")


def _forget(path: epath.Path):
  """gcsfs caches object sizes; a read after our own write must not see the old size."""
  if is_remote(path):
    _gcs().invalidate_cache(os.fspath(path)[len("gs://") :])
