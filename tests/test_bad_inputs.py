"""Bad input as a user meets it: each row of CASES runs a real entry point in its own process and
must exit with its status, print exactly one line on stderr naming the key or file (besides the
run's own `celerity_jax: N=...` summary when the failure comes after it), print no traceback, and
leave every file that existed before exactly as it was.

Adding a case is one line: (id, module, arguments, expected status, text the line must contain,
setup). Arguments may use {tmp} (the case's directory), {run} (a finished run, copied), {cache}
(a built token cache, copied) and {corpus} (its corpus); setup(tmp) damages or creates files first.
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CACHE, SMALL

from celerity_jax.data import corpus as corpus_lib
from celerity_jax.main import main
from celerity_jax.tools import tokenize

RUN = ["recipe=celerity_tiny", *SMALL, "run.dir={tmp}/fresh"]
FILES = [
  "recipe=celerity_tiny",
  *[a for a in SMALL if not a.startswith("data.corpus")],
  "model.vocab_size=384",
  "data.eval_frac=0.2",
  "data.cache_dir={cache}",
  "run.dir={tmp}/fresh",
]
CORPUS_FILES = ["data.paths={corpus}"]


def write(name, data):
  def setup(tmp):
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())

  return setup


def first_shard(tmp):
  """The first array file of the copied cache's train store."""
  entry = next((tmp / "cache").glob("files-*"))
  return sorted((entry / "train" / "tokens" / "c").iterdir())[0]


def edit_first_shard(edit):
  """A setup that opens the first shard for update and calls edit(file, size)."""

  def setup(tmp):
    path = first_shard(tmp)
    with open(path, "r+b") as f:
      edit(f, path.stat().st_size)

  return setup


def corrupt_gzip(tmp):
  data = bytearray(gzip.compress(b"some text " * 2000))
  data[20:60] = bytes(b ^ 0x55 for b in data[20:60])
  (tmp / "bad.txt.gz").write_bytes(bytes(data))


def drop_size_check(tmp):
  """Deletes a shard and its entry in meta.json: only the read-time fill check can catch it."""
  entry = next((tmp / "cache").glob("files-*")) / "train"
  meta = json.loads((entry / "meta.json").read_text())
  del meta["files"]["tokens/c/0"]
  (entry / "meta.json").write_text(json.dumps(meta))
  (entry / "tokens" / "c" / "0").unlink()


def a_file(name):
  return write(name, "not a directory")


def held_by_this_process(tmp):
  """run.dir/lock.json naming a live run of this machine: the test process itself."""
  from celerity_jax import run_lock

  owner = {**run_lock.RunLock(tmp / "run").owner, "heartbeat": time.time()}
  (tmp / "run" / run_lock.NAME).write_text(json.dumps(owner))


LONG = "x" * 300
CASES = [
  # configuration: exit 2, the key named
  ("unknown key", "celerity_jax.main", [*RUN, "model.d_modle=64"], 2, "model.d_modle", None),
  (
    "negative n_kv_heads",
    "celerity_jax.main",
    [*RUN, "model.n_kv_heads=-2"],
    2,
    "model.n_kv_heads",
    None,
  ),
  ("negative seed", "celerity_jax.main", [*RUN, "train.seed=-1"], 2, "train.seed", None),
  (
    "untileable pallas sequence",
    "celerity_jax.main",
    [*RUN, "model.attention=pallas", "model.seq_len=1000"],
    2,
    "model.seq_len=1000",
    None,
  ),
  ("huge seed", "celerity_jax.main", [*RUN, "train.seed=1e20"], 2, "train.seed", None),
  ("huge vocab", "celerity_jax.main", [*RUN, "model.vocab_size=1e12"], 2, "model.vocab_size", None),
  ("nan tau", "celerity_jax.main", [*RUN, "optim.tau=nan"], 2, "optim.tau", None),
  ("nan tpp", "celerity_jax.main", [*RUN, "scaling.tpp=nan"], 2, "scaling.tpp", None),
  ("inf lr", "celerity_jax.main", [*RUN, "optim.lr_base=inf"], 2, "optim.lr_base", None),
  ("unknown recipe", "celerity_jax.main", ["recipe=celerity_nope"], 2, "celerity_nope", None),
  ("unknown flag", "celerity_jax.main", [*RUN, "--resume"], 2, "--resume", None),
  # run directories: exit 2 naming run.dir / data.cache_dir
  (
    "run.dir is a file",
    "celerity_jax.main",
    [*RUN, "run.dir={tmp}/afile"],
    2,
    "run.dir",
    a_file("afile"),
  ),
  (
    "run.dir under a file",
    "celerity_jax.main",
    [*RUN, "run.dir={tmp}/afile/run"],
    2,
    "run.dir",
    a_file("afile"),
  ),
  (
    "run.dir name too long",
    "celerity_jax.main",
    [*RUN, f"run.dir={{tmp}}/{LONG}"],
    2,
    "run.dir",
    None,
  ),
  (
    "run.dir unwritable",
    "celerity_jax.main",
    [*RUN, "run.dir=/proc/celerity_run"],
    2,
    "run.dir",
    None,
  ),
  (
    "cache_dir is a file",
    "celerity_jax.main",
    [*FILES, *CORPUS_FILES, "data.cache_dir={tmp}/afile"],
    2,
    "data.cache_dir",
    a_file("afile"),
  ),
  (
    "refused resume",
    "celerity_jax.main",
    ["recipe=celerity_tiny", *SMALL, "run.dir={run}", "model.d_model=64"],
    2,
    "model.d_model",
    None,
  ),
  (
    "run.dir in use by a live run",
    "celerity_jax.main",
    [*RUN, "run.dir={run}"],
    2,
    "is in use by another run (host",
    held_by_this_process,
  ),
  # data: exit 3 naming the file or store
  (
    "missing data file",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/nope.txt"],
    3,
    "nope.txt",
    None,
  ),
  (
    "jsonl text not a string",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/n.jsonl"],
    3,
    "n.jsonl:2",
    write("n.jsonl", '{"text": "fine"}\n{"text": 5}\n'),
  ),
  (
    "jsonl not json",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/j.jsonl"],
    3,
    "j.jsonl:1",
    write("j.jsonl", "text: plain\n"),
  ),
  (
    "corrupt gzip",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/bad.txt.gz"],
    3,
    "bad.txt.gz",
    corrupt_gzip,
  ),
  (
    "binary txt",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/bin.txt"],
    3,
    "bin.txt",
    write("bin.txt", bytes(range(256)) * 40),
  ),
  (
    "binary jsonl.gz",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/b.jsonl.gz"],
    3,
    "b.jsonl.gz",
    write("b.jsonl.gz", bytes(range(256)) * 40),
  ),
  (
    "whitespace txt",
    "celerity_jax.main",
    [*FILES, "data.paths={tmp}/ws.txt"],
    3,
    "ws.txt",
    write("ws.txt", "  \n\t\n   \n"),
  ),
  (
    "store shard deleted",
    "celerity_jax.main",
    [*FILES, *CORPUS_FILES],
    3,
    "tokens/c/0",
    lambda tmp: first_shard(tmp).unlink(),
  ),
  (
    "store shard truncated",
    "celerity_jax.main",
    [*FILES, *CORPUS_FILES],
    3,
    "tokens/c/0",
    edit_first_shard(lambda f, size: f.truncate(size // 2)),
  ),
  (
    "store bytes corrupted",
    "celerity_jax.main",
    [*FILES, *CORPUS_FILES],
    3,
    "token store",
    edit_first_shard(lambda f, size: (f.seek(size // 3), f.write(b"\x5a" * 64))),
  ),
  (
    "store chunk missing",
    "celerity_jax.main",
    [*FILES, *CORPUS_FILES],
    3,
    "token store",
    drop_size_check,
  ),
  # tools: the same contract
  (
    "export missing step",
    "celerity_jax.tools.export",
    ["{run}", "--step", "7", "--out", "{tmp}/p.npz"],
    2,
    "--step 7",
    None,
  ),
  (
    "export unwritable out",
    "celerity_jax.tools.export",
    ["{run}", "--out", "/proc/celerity/p.npz"],
    2,
    "/proc/celerity/p.npz",
    None,
  ),
  ("export not a run", "celerity_jax.tools.export", ["{tmp}"], 2, "checkpoints", None),
  ("export bad flag", "celerity_jax.tools.export", ["{run}", "--stpe", "3"], 2, "--stpe", None),
  (
    "plan zero chips",
    "celerity_jax.tools.plan",
    ["recipe=celerity_1b", "--chips", "0"],
    2,
    "--chips",
    None,
  ),
  (
    "plan zero mfu",
    "celerity_jax.tools.plan",
    ["recipe=celerity_1b", "--mfu", "0"],
    2,
    "--mfu",
    None,
  ),
  (
    "bench_step bad key",
    "celerity_jax.tools.bench_step",
    ["model.d_modle=3"],
    2,
    "model.d_modle",
    None,
  ),
  (
    "bench_data bad key",
    "celerity_jax.tools.bench_data",
    ["data.thread=3"],
    2,
    "data.thread",
    None,
  ),
  (
    "bench_checkpoint bad key",
    "celerity_jax.tools.bench_checkpoint",
    ["optim.lr=3"],
    2,
    "optim.lr",
    None,
  ),
  (
    "bench_moe bad key",
    "celerity_jax.tools.bench_moe",
    ["model.expert=3"],
    2,
    "model.expert",
    None,
  ),
  (
    "coord_check bad flag",
    "celerity_jax.tools.coord_check",
    ["--widths", "x"],
    2,
    "--widths",
    None,
  ),
  ("tokenize bad key", "celerity_jax.tools.tokenize", ["data.pth=x"], 2, "data.pth", None),
  ("predict missing run", "celerity_jax.tools.predict", ["{tmp}/nope"], 2, "nope", None),
  ("aot bad topology", "celerity_jax.tools.aot", ["--topology", "v9z:2x2"], 2, "v9z", None),
  (
    "critical_batch bad batches",
    "celerity_jax.tools.critical_batch",
    ["recipe=celerity_nano_1", "--batches", "8,x", "--out", "{tmp}/cb"],
    2,
    "--batches",
    None,
  ),
  (
    "sweep bad grid",
    "celerity_jax.tools.sweep",
    ["recipe=celerity_nano_1", "--grid", "optim.lr_base=0.1", "--out", "{tmp}/sw"],
    2,
    "optim.lr_base=0.1",
    None,
  ),
  (
    "sweep one setting",
    "celerity_jax.tools.sweep",
    ["recipe=celerity_nano_1", "--set", "optim.tau=0.1", "--out", "{tmp}/sw"],
    2,
    "at least two settings",
    None,
  ),
  (
    "collapse_experiment corpus too small",
    "celerity_jax.tools.collapse_experiment",
    ["--family", "gpu", "--out", "{tmp}/ce", *FILES[-4:-1], *CORPUS_FILES],
    3,
    "training tokens; the largest run needs 2,140,441,600",
    None,
  ),
  # nothing replaced without a word (exports), nothing generated from a NaN (sample)
  (
    "export hf into its own run dir",
    "celerity_jax.tools.export",
    ["{run}", "--format", "hf", "--out", "{run}", "--overwrite"],
    2,
    "is a run directory",
    None,
  ),
  (
    "export hf into a non-empty dir",
    "celerity_jax.tools.export",
    ["{run}", "--format", "hf", "--out", "{tmp}/hf"],
    2,
    "the directory is not empty (notes.txt)",
    write("hf/notes.txt", "mine"),
  ),
  (
    "export hf overwrite a foreign dir",
    "celerity_jax.tools.export",
    ["{run}", "--format", "hf", "--out", "{tmp}/hf", "--overwrite"],
    2,
    "not a Hugging Face export",
    write("hf/notes.txt", "mine"),
  ),
  (
    "export npz over a file",
    "celerity_jax.tools.export",
    ["{run}", "--out", "{tmp}/p.npz"],
    2,
    "exists; pass --overwrite",
    write("p.npz", "mine"),
  ),
  (
    "sample nan temperature",
    "celerity_jax.tools.sample",
    ["{run}", "--prompt-ids", "5,6", "--temperature", "nan"],
    2,
    "--temperature nan",
    None,
  ),
  (
    "sample seed past 64 bits",
    "celerity_jax.tools.sample",
    ["{run}", "--prompt-ids", "5", "--seed", str(2**64)],
    2,
    "--seed 18446744073709551616",
    None,
  ),
  # readers of a run: what a crash leaves, and values no run can have
  ("predict nan stop", "celerity_jax.tools.predict", ["{run}", "--stop", "nan"], 2, "--stop", None),
  (
    "predict torn config.json",
    "celerity_jax.tools.predict",
    ["{run}"],
    2,
    "run/config.json: not a run's config.json",
    lambda tmp: (tmp / "run" / "config.json").write_text('{"config": {"model": {'),
  ),
  (
    "predict before any logged point",
    "celerity_jax.tools.predict",
    ["{run}", "--stop", "0.02"],
    2,
    "no logged points in t = [0.01, 0.02]",
    None,
  ),
  (
    "reference run with torn config.json",
    "celerity_jax.main",
    [*RUN, "collapse.reference={run}"],
    2,
    "run/config.json: not a run's config.json",
    lambda tmp: (tmp / "run" / "config.json").write_text("{"),
  ),
  (
    "critical_batch nan tolerance",
    "celerity_jax.tools.critical_batch",
    ["recipe=celerity_nano_1", "--tolerance", "nan", "--out", "{tmp}/cb"],
    2,
    "--tolerance nan",
    None,
  ),
  (
    "critical_batch bad key",
    "celerity_jax.tools.critical_batch",
    ["recipe=celerity_nano_1", "optim.taw=1", "--out", "{tmp}/cb"],
    2,
    "optim.taw",
    None,
  ),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small text corpus and its token cache, built once."""
  root = tmp_path_factory.mktemp("inputs")
  docs = root / "docs"
  docs.mkdir()
  for i, source in enumerate(corpus_lib.stdlib_files()[:40]):  # varied text, no download
    (docs / f"d{i}.txt").write_bytes(source.read_bytes())
  args = [
    a.format(cache=root / "cache", corpus=docs, tmp=root)
    for a in [*FILES, *CORPUS_FILES]
    if not a.startswith("run.dir")
  ]
  assert tokenize.main(args) == 0
  return docs, root / "cache"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("finished") / "run"
  assert (
    main(
      [
        "recipe=celerity_tiny",
        *SMALL,
        f"run.dir={run}",
        "train.stop_step=6",
        "checkpoint.every_steps=3",
      ]
    )
    == 0
  )
  return run


def snapshot(root: Path) -> dict:
  return {
    p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


@pytest.mark.parametrize("name,module,args,status,named,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, module, args, status, named, setup, tmp_path, corpus, finished_run):
  docs, cache = corpus
  shutil.copytree(cache, tmp_path / "cache")
  shutil.copytree(finished_run, tmp_path / "run")
  if setup:
    setup(tmp_path)
  argv = [
    a.format(tmp=tmp_path, run=tmp_path / "run", cache=tmp_path / "cache", corpus=docs)
    for a in args
  ]
  before = snapshot(tmp_path)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
  proc = subprocess.run(
    [sys.executable, "-m", module, *argv],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = [line for line in proc.stderr.splitlines() if not line.startswith("celerity_jax: N=")]
  assert proc.returncode == status, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert named in lines[0], lines[0]
  assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
  after = snapshot(tmp_path)
  assert {k: after.get(k) for k in before} == before  # nothing there changed or went away
  fresh = tmp_path / "fresh"  # a refused run leaves no empty run.dir behind (one that failed
  assert not fresh.exists() or any(p.is_file() for p in fresh.rglob("*"))  # mid-run has files)
