"""A local Cloud Storage server for tests: `gcp-storage-emulator` with the fixes our clients need.

The stock emulator (2026.7) lacks parts of the JSON API that tensorstore, gcsfs and Orbax use:
  - downloads carry no `x-goog-generation` header (tensorstore: "Malformed StorageGeneration");
  - suffix byte ranges (`Range: bytes=-N`, how sharded zarr3 reads its shard index) are ignored;
  - `ifGenerationMatch` / `ifGenerationNotMatch` preconditions are ignored (tensorstore's atomic
    writes and cache revalidation rely on them);
  - `moveTo` (gcsfs renames) answers 501;
  - listings ignore `startOffset` / `endOffset`, so tensorstore, which deletes a key range by
    listing it, deleted every object in the bucket;
  - multipart uploads are parsed with the `email` package, which is not binary-safe: an object
    whose last byte is `\r` lost it (gcsfs ends the part with `\n`), one upload in 256 for random
    bytes such as a TensorBoard record's checksum.
This module patches those handlers, then serves on 127.0.0.1. Run as a script it prints `ready`
once the port accepts requests:  python tests/gcs_emulator.py PORT BUCKET
`running()` starts it as a subprocess; `environment(port)` gives the variables that point every
client at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import socketserver
import subprocess
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

BUCKET = "celerity-test"


def gs(*parts: str) -> str:
  return "/".join([f"gs://{BUCKET}", *parts])


def committed_steps(fs, run_url: str) -> list[int]:
  """Checkpoint steps under run_url/checkpoints that carry Orbax's commit marker."""
  top = f"{run_url[len('gs://') :]}/checkpoints"
  if not fs.exists(top):
    return []
  return sorted(
    int(p.rsplit("/", 1)[1])
    for p in fs.ls(top, refresh=True)
    if p.rsplit("/", 1)[1].isdigit() and fs.exists(f"{p}/commit_success.txt")
  )


@contextlib.contextmanager
def running():
  """Starts the emulator with BUCKET on a free port; yields the port."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
    [sys.executable, __file__, str(port), BUCKET],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert server.stdout.readline().strip() == "ready", "the emulator did not start"
    yield port
  finally:
    server.stdin.close()
    server.wait(timeout=10)


def environment(port: int) -> dict:
  """Both variables are needed: a client left without one silently goes to the real service."""
  url = f"http://127.0.0.1:{port}"
  return {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (Orbax arrays)
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GOOGLE_CLOUD_PROJECT": "test",
  }


def _generation(storage, bucket: str, name: str) -> str:
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"  # GCS: generation 0 means "does not exist"


def _failed_precondition(request, storage, bucket: str, name: str | None) -> HTTPStatus | None:
  if name is None:
    return None
  current = None
  match = request.query.get("ifGenerationMatch")
  if match:
    current = _generation(storage, bucket, name)
    if match[0] != current:
      return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get("ifGenerationNotMatch")
  if not_match:
    current = current or _generation(storage, bucket, name)
    if not_match[0] == current:
      return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
  return None


def _object_name(request) -> str | None:
  if request.params.get("object_id"):
    return request.params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict):
    return (data.get("meta") or {}).get("name") or data.get("name")
  return None


def _guarded(handler):
  def guarded(request, response, storage, *args, **kwargs):
    if "upload_id" not in request.query:  # the precondition was checked when it began
      status = _failed_precondition(
        request, storage, request.params["bucket_name"], _object_name(request)
      )
      if status is not None:
        response.status = status
        return None
    return handler(request, response, storage, *args, **kwargs)

  return guarded


_read_data = server._read_data


def read_data(request_handler, query):
  """Multipart uploads split on their delimiter as bytes. The line ending before each delimiter
  belongs to it, in the style the first part's headers use (gcsfs writes bare \\n)."""
  content_type = request_handler.headers.get("Content-Type") or ""
  if not content_type.startswith("multipart/related"):
    return _read_data(request_handler, query)
  raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
  dashes = b"--" + re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
  newline = b"\r\n" if raw.startswith(dashes + b"\r\n") else b"\n"
  parts = []
  for part in raw[len(dashes) :].split(newline + dashes)[:-1]:
    head, body = part[len(newline) :].split(newline * 2, 1)  # the delimiter line's own ending
    headers = dict(line.split(b":", 1) for line in head.split(newline) if b":" in line)
    parts.append((headers.get(b"Content-Type", b"application/octet-stream").strip().decode(), body))
  (_, meta), (kind, content) = parts
  return {"meta": json.loads(meta), "content": content, "content-type": kind}


def download(request, response, storage, *args, **kwargs):
  bucket, name = request.params["bucket_name"], request.params["object_id"]
  status = _failed_precondition(request, storage, bucket, name)
  if status is not None:
    response.status = status
    return
  try:
    obj = storage.get_file_obj(bucket, name)
    size = len(storage.get_file(bucket, name))
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
  if suffix:  # the last N bytes, as an explicit range
    start = max(0, size - int(suffix.group(1)))
    request._request_handler.headers.replace_header("range", f"bytes={start}-")
  objects.download(request, response, storage, *args, **kwargs)
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  response["x-goog-stored-content-length"] = str(size)


def get(request, response, storage, *args, **kwargs):
  if request.query.get("alt") == ["media"]:
    return download(request, response, storage, *args, **kwargs)
  return _guarded(objects.get)(request, response, storage, *args, **kwargs)


def ls(request, response, storage, *args, **kwargs):
  objects.ls(request, response, storage, *args, **kwargs)
  start, end = request.query.get("startOffset", [""])[0], request.query.get("endOffset", [None])[0]
  if response.status != HTTPStatus.OK or not (start or end):
    return
  listing = json.loads(response._content)

  def inside(name):
    return name >= start and (end is None or name < end)

  listing["items"] = [item for item in listing.get("items") or [] if inside(item["name"])]
  listing["prefixes"] = [prefix for prefix in listing.get("prefixes") or [] if inside(prefix)]
  response.json(listing)


def move(request, response, storage, *args, **kwargs):
  """objects.move: a copy then a delete (atomic enough for one client at a time)."""
  bucket = request.params["bucket_name"]
  try:
    moved = objects._copy(
      request.base_url,
      storage,
      bucket,
      request.params["object_id"],
      bucket,
      request.params["dest_object_id"],
    )
    storage.delete_file(bucket, request.params["object_id"])
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  response.json(moved)


def _patched_handlers():
  replace = {
    objects.download: download,
    objects.get: get,
    objects.ls: ls,
    objects.insert: _guarded(objects.insert),
    objects.delete: _guarded(objects.delete),
    objects.upload_partial: objects.upload_partial,
  }
  moves = [
    (
      rf"^{re.escape(prefix)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
      r"(?P<dest_object_id>.*[^/]+)$",
      {"POST": move},
    )
    for prefix in (server.settings.API_ENDPOINT, "")
  ]
  return (
    *moves,
    *(
      (regex, {method: replace.get(fn, fn) for method, fn in methods.items()})
      for regex, methods in server.HANDLERS
    ),
  )


server.HANDLERS = _patched_handlers()
server._read_data = read_data


def _quiet_disconnects(self, request, client_address):
  """Clients that close a connection early (normal for tensorstore) are not worth a traceback."""
  if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
    _report_error(self, request, client_address)


_report_error = socketserver.BaseServer.handle_error


def main(port: int, bucket: str):
  logging.disable(logging.WARNING)  # the emulator warns on every JSON response
  socketserver.BaseServer.handle_error = _quiet_disconnects
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  emulator.start()
  print("ready", flush=True)
  try:
    sys.stdin.read()  # runs until the parent closes our stdin or kills us
  finally:
    emulator.stop()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
