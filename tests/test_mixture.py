"""Mixtures of sources and the sharded token-store build, as a team pretraining on hundreds of
billions of tokens uses them: a parquet, a .jsonl.zst and a text source with weights; the build
split over real processes (jax.distributed on 127.0.0.1) and resumed after a SIGKILL; each
source's share of the batches; per-source held-out losses; weights changed on resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL
from test_multiprocess import free_port
from test_sources import DOCS, write_sources

from celerity_jax.commands import tokenize
from celerity_jax.config import DataConfig
from celerity_jax.data import corpus, mixture, shards
from celerity_jax.data.prepare import prepare
from celerity_jax.main import main

WEIGHTS = {"web": 6.0, "code": 3.0, "books": 1.0}


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
  """A mixture file over a parquet source (5 row groups), a .jsonl.zst and plain text files."""
  root = tmp_path_factory.mktemp("mix")
  write_sources(root / "files")
  books = root / "books"
  books.mkdir()
  for i, doc in enumerate(DOCS[160:240]):
    (books / f"{i:03d}.txt").write_text(doc)
  (root / "mix.toml").write_text(
    "[sources.web]\n"
    'paths = "files/a.parquet"\n'
    "weight = 6\n"
    'text_field = "content"\n'
    "[sources.code]\n"
    'paths = ["files/b.jsonl.zst"]\n'
    "weight = 3\n"
    'text_field = "content"\n'
    "[sources.books]\n"
    'paths = "books"\n'
    "weight = 1\n"
  )
  return root / "mix.toml"


def build_args(mix, cache, *extra):
  return [
    "recipe=celerity_tiny",
    f"data.mixture={mix}",
    f"data.cache_dir={cache}",
    "model.vocab_size=512",
    "data.eval_frac=0.1",
    "run.progress=false",
    *extra,
  ]


def arrays(cache) -> dict:
  """{source/split: (tokens, document offsets, meta content)} of every source in a cache."""
  out = {}
  for meta_file in sorted(cache.glob("*/meta.json")):
    meta = json.loads(meta_file.read_text())
    entry = str(meta_file.parent)
    for split in ("train", "eval"):
      s = shards.SplitStore(entry, split, meta, None, 512)
      key = f"{meta_file.parent.name}/{split}"
      out[key] = (s.tokens.read().result(), s.doc_offsets(), s.content)
  return out


@pytest.fixture(scope="module")
def one_process_build(mix, tmp_path_factory):
  cache = tmp_path_factory.mktemp("one")
  assert tokenize.main(build_args(mix, cache, "data.build_processes=1")) == 0
  return cache


def test_the_plan_splits_a_large_parquet_file_by_row_groups(mix):
  files = [mix.parent / "files" / "a.parquet"]
  plan = shards.plan(files)
  assert len(plan) > 1  # 5 row groups of ~45 KB against 64 KB shards
  groups = [piece[1] for shard in plan for piece in shard["pieces"]]
  assert groups[0][0] == 0 and groups[-1][1] == 5
  assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))  # no gap, no overlap


def test_two_processes_build_the_same_bytes_as_one(mix, one_process_build, tmp_path):
  """Each of 2 real processes (jax.distributed) tokenizes its half of every source's shards with
  2 worker processes of its own; the token arrays equal a 1-process build's, byte for byte."""
  cache, port = tmp_path / "two", free_port()
  argv = build_args(mix, cache, "data.build_processes=2", f"dist.coordinator=127.0.0.1:{port}")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "celerity_jax.commands.tokenize",
        *argv,
        "dist.num_processes=2",
        f"dist.process_id={i}",
      ],  # fmt: skip
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  builders = {json.loads(f.read_text())["process"] for f in cache.glob("*/shards/*/done.json")}
  assert builders == {0, 1}  # both processes built shards
  one, two = arrays(one_process_build), arrays(cache)
  assert list(one) == list(two) and len(one) == 6  # three sources, two splits
  for key in one:
    for a, b in zip(one[key], two[key], strict=True):
      assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, key


def test_a_killed_build_resumes_from_its_finished_shards(tmp_path, stdlib_cache):
  """SIGKILL (process group: workers too) mid-build leaves no store a run could read; the same
  command then builds only the missing shards and ends byte-identical to an unbroken build."""
  reference = prepare(DataConfig(cache_dir=str(stdlib_cache)), 512, progress=False)
  tokenizer_dir = Path(reference.tokenizer_path).parent
  cache = tmp_path / "cache"
  cache.mkdir()
  os.symlink(tokenizer_dir, cache / tokenizer_dir.name)  # the same tokenizer: no retraining
  argv = ["recipe=celerity_tiny", f"data.cache_dir={cache}", "data.build_processes=2"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "celerity_jax.commands.tokenize", *argv],
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  deadline = time.time() + 120
  while len(list(cache.glob("stdlib-*/shards/*/done.json"))) < 4 and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  [entry] = cache.glob("stdlib-*")
  finished = sorted(entry.glob("shards/*/done.json"))
  n_shards = len(json.loads((entry / "plan.json").read_text()))
  assert 4 <= len(finished) < n_shards and not (entry / "meta.json").exists()
  times = {f: f.stat().st_mtime_ns for f in finished}
  resumed = prepare(DataConfig(cache_dir=str(cache), build_processes=2), 512, progress=False)
  assert all(f.stat().st_mtime_ns == t for f, t in times.items())  # kept, not rebuilt
  assert not list(entry.glob("shards/*.partial-*"))  # the killed workers' directories are gone
  for split in ("train", "eval"):
    a, b = (getattr(p.sources[0], split) for p in (reference, resumed))
    assert a.content == b.content
    np.testing.assert_array_equal(a.tokens.read().result(), b.tokens.read().result())


def test_each_source_gets_its_weight_of_the_rows(mix, one_process_build):
  """Over 2,000 steps of 16 rows the rows of each source are within a binomial 3-sigma band of
  its weight (in fact within ceil(log2 3) = 2 rows in every prefix), and each row holds a window
  of the source it was assigned to."""
  from celerity_jax.data.pipeline import MixtureBatches, Windows

  cfg = DataConfig(mixture=str(mix), cache_dir=str(one_process_build), eval_frac=0.1)
  prepared = prepare(cfg, 512, progress=False)
  names = [b.source.name for b in prepared.sources]
  segments = mixture.Segments(names, [[0, WEIGHTS]])
  n = 2000 * 16
  source, rank = segments.assign(np.arange(n))
  p = np.array([WEIGHTS[k] for k in names]) / sum(WEIGHTS.values())
  counts = np.bincount(source, minlength=3)
  assert (np.abs(counts - n * p) <= 3 * np.sqrt(n * p * (1 - p))).all()
  prefix = np.cumsum(np.eye(3)[source], axis=0) - np.outer(np.arange(1, n + 1), p)
  assert np.abs(prefix).max() <= 2
  windows = [Windows(b.train, 16, 7, "concat", b.source.name) for b in prepared.sources]
  batches = MixtureBatches(windows, segments, 16)
  batch = batches.batch(5)
  at, ranks = segments.assign(np.arange(5 * 16, 6 * 16))
  for row in range(16):
    want = windows[at[row]].rows([ranks[row]])["inputs"][0]
    np.testing.assert_array_equal(batch["inputs"][row], want)


def run_args(mix, cache, run_dir, *extra):
  small = [a for a in SMALL if not a.startswith(("data.corpus", "model.vocab_size"))]
  return [
    "recipe=celerity_tiny",
    *small,
    "model.vocab_size=512",
    f"data.mixture={mix}",
    f"data.cache_dir={cache}",
    "data.eval_frac=0.1",
    "model.seq_len=16",
    "train.eval_every=3",
    "checkpoint.every_steps=3",
    f"run.dir={run_dir}",
    *extra,
  ]


def rows(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_run_logs_each_source_and_resumes_exactly(
  mix, one_process_build, tmp_path, capsys
):
  whole, split = tmp_path / "whole", tmp_path / "split"
  assert main(run_args(mix, one_process_build, whole, "train.stop_step=6")) == 0
  assert main(run_args(mix, one_process_build, split, "train.stop_step=3")) == 0
  assert main(run_args(mix, one_process_build, split, "train.stop_step=6")) == 0
  err = capsys.readouterr().err
  assert "source books: reads" in err and "epochs)" in err  # what each source supplies
  losses = {d: [r["loss"] for r in rows(d) if "loss" in r] for d in (whole, split)}
  assert losses[whole] == losses[split]  # bit-exact across the resume
  evals = [r for r in rows(whole) if "eval_loss" in r]
  assert len(evals) == 2
  for r in evals:
    parts = {k.split("/")[1]: v for k, v in r.items() if k.startswith("eval_loss/")}
    assert set(parts) == set(WEIGHTS)
    mean = sum(WEIGHTS[k] * v for k, v in parts.items()) / sum(WEIGHTS.values())
    assert r["eval_loss"] == pytest.approx(mean, rel=1e-6)


def test_weights_changed_on_resume_are_a_logged_event(mix, one_process_build, tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert main(run_args(mix, one_process_build, run_dir, "train.stop_step=3")) == 0
  capsys.readouterr()
  extra = ("train.stop_step=6", "data.weights=web:1,books:1")
  assert main(run_args(mix, one_process_build, run_dir, *extra)) == 0
  err = capsys.readouterr().err
  assert "mixture weights change at row 48: web 0.6000 -> 0.2000" in err
  [event] = [r for r in rows(run_dir) if r.get("event") == "mixture"]
  assert event["step"] == 3 and event["weights"]["code"] == pytest.approx(0.6)
  history = json.loads((run_dir / "config.json").read_text())["data_fingerprint"]["mixture"]
  assert [start for start, _ in history] == [0, 48]
  # the rows before the change keep their sources; each source continues where it was
  segments = mixture.Segments(list(WEIGHTS), history)
  before = mixture.Segments(list(WEIGHTS), history[:1]).assign(np.arange(48))
  np.testing.assert_array_equal(segments.assign(np.arange(48))[0], before[0])
  source, rank = segments.assign(np.arange(96))
  for i in range(3):
    assert (rank[source == i] == np.arange((source == i).sum())).all()


def test_a_large_plain_jsonl_file_is_split_by_lines(tmp_path):
  """The shards of one .jsonl file read its documents exactly once, in order, whatever the line a
  byte boundary falls in (lines of every length, CRLF endings, blank lines, non-ASCII text)."""
  rng = np.random.default_rng(3)
  docs = [("é" * int(rng.integers(0, 50))) + DOCS[i % len(DOCS)][: int(rng.integers(1, 3000))]
          for i in range(400)]  # fmt: skip
  lines = [json.dumps({"text": d}) + ("\r\n" if i % 7 == 0 else "\n") for i, d in enumerate(docs)]
  lines.insert(100, "\n")
  path = tmp_path / "big.jsonl"
  path.write_text("".join(lines))
  plan = shards.plan([path])
  assert len(plan) > 8 and all(s["pieces"][0][1] for s in plan)  # byte ranges of one file
  read = [d for shard in plan for d in corpus.documents(shards.shard_inputs(shard))]
  assert read == [d for d in docs if d.strip()] == list(corpus.documents([path]))
