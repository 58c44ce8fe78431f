"""Run directories, token stores and tokenizers on Cloud Storage, against a local emulator.

The emulator (tests/gcs_emulator.py) runs as its own process on 127.0.0.1; gcsfs, Orbax and
tensorstore reach it through STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL, set for this
module and inherited by the training subprocesses.
"""

import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE, SMALL, small_config
from gcs_emulator import BUCKET, committed_steps, gs
from test_checkpoint import abstract, assert_trees_equal, build, cli, trained_state

from celerity_jax import storage
from celerity_jax.checkpoint import Checkpointer
from celerity_jax.collapse.curves import load_run
from celerity_jax.commands import export
from celerity_jax.main import main


def losses(run_dir) -> list:
  text = (storage.location(run_dir) / "metrics.jsonl").read_text()
  rows = [json.loads(x) for x in text.splitlines()]
  return [(r["step"], r["loss"], r["loss_smooth"]) for r in rows if "event" not in r]


def tf_records(data: bytes) -> list[bytes]:
  """TensorBoard's event file framing (length, crc, payload, crc); fails on a torn or doubled
  append."""
  records, at = [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at : at + 8])
    records.append(data[at + 12 : at + 12 + length])
    at += 12 + length + 4
  assert at == len(data)
  return records


def test_append_composes_onto_the_end_and_reads_back_at_once(gcs, tmp_path):
  for where in (storage.location(gs("append", "log.txt")), storage.location(tmp_path / "log.txt")):
    pieces = [b"one\n", b"two\r", b"\r\n", b"\n\r", b"\x00\xff"]  # any bytes
    for piece in pieces:
      storage.append(where, piece)
      assert where.read_bytes().endswith(piece)  # our own write is never read stale
    assert where.read_bytes() == b"".join(pieces)
  assert gcs.ls(f"{BUCKET}/append", refresh=True) == [f"{BUCKET}/append/log.txt"]  # no leftovers


def test_an_append_killed_before_its_compose_leaves_nothing_tensorboard_reads(gcs):
  """A process killed between staging an append and composing it leaves the staged object; its
  name shares nothing with the file's (so TensorBoard never loads it as an event file) and the
  run's next metrics writer deletes it."""
  from celerity_jax.metrics import MetricsWriter

  run = storage.location(gs("killed_append"))
  event = run / "tb" / "events.out.tfevents.1.host"
  storage.append(event, b"first")
  gcs.pipe(f"{BUCKET}/killed_append/tb/{storage.APPEND_TAIL}0123", b"staged")  # the leftover
  gcs.pipe(f"{BUCKET}/killed_append/{storage.APPEND_TAIL}4567", b"staged")
  storage.append(event, b" second")
  names = [k.rsplit("/", 1)[1] for k in gcs.find(f"{BUCKET}/killed_append", refresh=True)]
  assert sorted(n for n in names if "tfevents" in n) == ["events.out.tfevents.1.host"]
  MetricsWriter(run, tensorboard=False).close()
  assert gcs.find(f"{BUCKET}/killed_append", refresh=True) == [
    f"{BUCKET}/killed_append/tb/events.out.tfevents.1.host"
  ]
  assert event.read_bytes() == b"first second"


@pytest.mark.slow
def test_gcs_run_dir_survives_sigkill_bit_identically(gcs, tmp_path):
  """Train with run.dir on gs://, SIGKILL at a random moment after a checkpoint, rerun the same
  command: every logged loss and the final parameters equal an uninterrupted local run."""
  tensorboard = ["run.tensorboard=true"]
  assert main(cli(tmp_path / "full", *tensorboard)) == 0
  killed = gs("killed")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(
    [sys.executable, "-m", "celerity_jax.main", *cli(killed, *tensorboard)],
    env=env,
    stderr=subprocess.PIPE,
    text=True,
  )
  rng = random.Random(0)
  deadline, target = time.time() + 300, rng.choice([10, 15, 20])
  while not any(step >= target for step in committed_steps(gcs, killed)):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() < deadline, "no checkpoint reached the emulator"
    time.sleep(0.1)
  time.sleep(rng.uniform(0, 1.5))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  told = f"the killed run said:\n{proc.stderr.read()[-3000:]}"
  assert main(cli(killed, *tensorboard)) == 0, told  # the same command resumes from gs://
  assert losses(killed) == losses(tmp_path / "full"), told
  steps = losses(killed)[-1][0]
  params = []
  for run_dir in (killed, str(tmp_path / "full")):
    ckpt = Checkpointer(storage.location(run_dir) / "checkpoints", small_config().checkpoint)
    params.append(ckpt.restore(steps, abstract(build(small_config())[1])).params)
    ckpt.close()
  assert_trees_equal(*params)
  events = [
    json.loads(x) for x in (storage.location(killed) / "metrics.jsonl").read_text().splitlines()
  ]
  assert [e["restarts"] for e in events if e.get("event") == "restart"] == [1], (events, told)
  assert (
    json.loads((storage.location(killed) / "config.json").read_text())["config"]["run"]["dir"]
    == killed
  )
  # the tools read a gs:// run directory: export (to gs:// too) and the collapse curve
  out = export.export(killed, None, gs("exported", "params.npz"))
  local = export.export(str(tmp_path / "full"), None, tmp_path / "params.npz")
  assert out["step"] == local["step"] == steps
  with (
    np.load(io.BytesIO(gcs.cat(f"{BUCKET}/exported/params.npz"))) as a,
    np.load(tmp_path / "params.npz") as b,
  ):
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  assert gcs.exists(f"{BUCKET}/exported/params.config.json")
  assert load_run(killed).loss_smooth.tolist() == load_run(tmp_path / "full").loss_smooth.tolist()
  tb = sorted(gcs.find(f"{BUCKET}/killed/tb"))
  assert len(tb) == 2, (tb, told)  # one event file per process start
  records = [r for path in tb for r in tf_records(gcs.cat(path))]
  assert sum(b"loss_smooth" in r for r in records) >= steps  # every step's scalars, once or more


def test_a_save_killed_before_its_commit_marker_is_skipped_and_redone(gcs):
  cfg = small_config()
  state = trained_state(small_config(), steps=1)
  where = storage.location(gs("torn", "checkpoints"))
  ckpt = Checkpointer(where, cfg.checkpoint)
  ckpt.save(5, state, {})
  ckpt.save(10, state, {}, force=True)
  ckpt.close()
  gcs.rm(f"{BUCKET}/torn/checkpoints/10/commit_success.txt")  # killed before the commit
  ckpt = Checkpointer(where, cfg.checkpoint)
  assert ckpt.incomplete() == ["10"] and ckpt.latest() == 5
  ckpt.save(10, state, {}, force=True)  # the resumed run saves step 10 again
  ckpt.wait()
  assert ckpt.latest() == 10
  assert_trees_equal(ckpt.restore(10, abstract(build(cfg)[1])), state)
  ckpt.close()


def write_corpus(root: Path):
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta", "return", "def", "import", "x", "(", ")", ":"]
  root.mkdir()
  (root / "docs.jsonl").write_text(
    "".join(
      json.dumps({"text": " ".join(rng.choice(words) for _ in range(300))}) + "\n"
      for _ in range(200)
    )
  )


def test_token_stores_and_tokenizer_on_gcs_give_the_same_run(gcs, tmp_path, capsys):
  write_corpus(tmp_path / "corpus")
  data = [
    f"data.paths={tmp_path / 'corpus'}",
    "data.eval_frac=0.1",
    "model.vocab_size=300",
    "train.stop_step=3",
    "run.log_every=1",
    "run.progress=true",
  ]  # says when it builds token stores

  def run(run_dir, *extra):
    argv = ["recipe=celerity_tiny", *SMALL, *data, f"run.dir={run_dir}", *extra]
    code = main([a for a in argv if a != "model.vocab_size=256"])
    return code, capsys.readouterr().err

  code, _ = run(tmp_path / "local", f"data.cache_dir={tmp_path / 'cache'}")
  assert code == 0
  code, err = run(gs("remote"), f"data.cache_dir={gs('cache')}")
  assert code == 0 and f"building token stores in {gs('cache')}" in err, err
  entry, tokenizer_dir = sorted(gcs.ls(f"{BUCKET}/cache", refresh=True), key=lambda p: "token" in p)
  assert gcs.exists(f"{entry}/meta.json") and gcs.exists(f"{entry}/shards/00000/done.json")
  for split in ("train", "eval"):
    assert gcs.exists(f"{entry}/shards/00000/{split}/meta.json")
  assert losses(gs("remote")) == losses(tmp_path / "local")
  # the same tokenizer read from gs://: the cached stores are reused, nothing is built again
  code, err = run(
    gs("again"),
    f"data.cache_dir={gs('cache')}",
    f"data.tokenizer=gs://{tokenizer_dir}/tokenizer.model",
  )
  assert code == 0 and "building" not in err, err


def test_a_missing_bucket_fails_at_once_and_is_not_created(gcs, capsys):
  code = main(["recipe=celerity_tiny", *SMALL, "run.dir=gs://no-such-bucket/run"])
  err = capsys.readouterr().err
  assert code == 2 and "run.dir=gs://no-such-bucket/run" in err and "does not exist" in err
  assert "Traceback" not in err
  assert not gcs.exists("no-such-bucket")


def test_cloud_storage_out_of_reach_fails_in_seconds_and_one_line(tmp_path):
  """No network (here: nothing listening where the service should be) is one line naming the
  setting, in seconds: gcsfs alone retried for about a minute and a half, with tracebacks."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed once the block ends: connections are refused
  env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
  start = time.monotonic()
  result = subprocess.run(
    [sys.executable, "-m", "celerity_jax.main", "recipe=celerity_tiny", *SMALL, "run.dir=gs://b/r"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert time.monotonic() - start < 30
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
  assert f"run.dir=gs://b/r: cannot reach Cloud Storage at 127.0.0.1:{port}" in result.stderr


def test_writing_without_credentials_is_one_line(monkeypatch):
  """A reachable service but no credentials: gcsfs would write anonymously and retry every
  refusal; the check says what to do instead."""
  import google.auth
  from google.auth.exceptions import DefaultCredentialsError

  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  monkeypatch.setattr(storage.socket, "create_connection", lambda *a, **k: io.BytesIO())

  def no_credentials():
    raise DefaultCredentialsError("none")

  monkeypatch.setattr(google.auth, "default", no_credentials)
  monkeypatch.setattr(storage, "_REACHED", set())
  with pytest.raises(storage.StorageError, match="run.dir=gs://b/r: no Google Cloud credentials"):
    storage.reachable("run.dir", "gs://b/r")
  storage.reachable("run.dir", "gs://b/r", write=False)  # reading a public bucket needs none


def test_a_corpus_on_gcs_reads_and_trains_as_its_local_copy(gcs, tmp_path, capsys):
  """Parquet and .zst sources under gs://: listed by a directory and by a glob, read the same
  documents, give the same corpus fingerprint, and train the same run as their local copy."""
  from test_sources import write_sources

  from celerity_jax.data import corpus

  write_sources(tmp_path / "corpus")
  for path in sorted((tmp_path / "corpus").iterdir()):
    gcs.pipe(f"{BUCKET}/corpus/{path.name}", path.read_bytes())
  local = corpus.resolve_paths(str(tmp_path / "corpus"))
  remote = corpus.resolve_paths(f"gs://{BUCKET}/corpus")
  assert [p.name for p in remote] == [p.name for p in local]
  assert corpus.resolve_paths(f"gs://{BUCKET}/corpus/*.parquet") == remote[:1]
  assert list(corpus.documents(remote, "content")) == list(corpus.documents(local, "content"))
  assert corpus.fingerprint(remote, "content") == corpus.fingerprint(local, "content")

  def run(paths, name):
    argv = ["recipe=celerity_tiny", *SMALL, "model.vocab_size=384", "data.text_field=content"]
    argv += [f"data.paths={paths}", "data.eval_frac=0.2", "train.stop_step=3", "run.log_every=1"]
    argv += [f"data.cache_dir={tmp_path / name / 'cache'}", f"run.dir={tmp_path / name / 'run'}"]
    assert main(argv) == 0, capsys.readouterr().err
    return losses(tmp_path / name / "run")

  assert run(f"gs://{BUCKET}/corpus", "remote") == run(tmp_path / "corpus", "local")
