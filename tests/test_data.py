"""Data: tokenizer, token store, grain pipeline (determinism, exact resume, hosts), bad input."""

import gzip
import json
import shutil

import numpy as np
import pytest

from celerity_jax import recipes
from celerity_jax.config import DataConfig, apply_overrides
from celerity_jax.data import DataError, corpus, shards, store, tokenizer
from celerity_jax.data.pipeline import one_source, prefetch
from celerity_jax.data.prepare import prepare
from celerity_jax.main import main

TEXT = [
  "def add(a, b):\n    return a + b  # sum\n",
  "Ünïcödé text, tabs\tand  spaces.\n",
  "class Point:\n    x: int = 0\n    y: int = 0\n",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A corpus in every supported format: .txt, .jsonl, .txt.gz, .jsonl.gz."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "return", "def", "import", "x", "y", "(", ")", ":"]
  docs = [" ".join(rng.choice(words, 200)) + "\n" for _ in range(60)] + TEXT
  (root / "a.txt").write_text(docs[0])
  (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:30]))
  with gzip.open(root / "c.txt.gz", "wt") as f:
    f.write(docs[30])
  with gzip.open(root / "d.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[31:])
  return root, docs


def data_cfg(root, cache, **changes):
  base = DataConfig(paths=str(root), cache_dir=str(cache), eval_frac=0.1, threads=2)
  return DataConfig(**{**base.__dict__, **changes})


def test_tokenizer_round_trip_and_special_ids(files, tmp_path):
  root, docs = files
  tok = tokenizer.train(lambda: iter(docs), vocab_size=300)
  assert (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (0, 1, 2, 3)
  for text in TEXT + ["never seen: ∑ 🙂 \x00"]:  # byte fallback covers unseen characters
    assert tok.decode(tok.encode([text])[0]) == text
  tok.save(tmp_path / "t.model")
  again = tokenizer.load(tmp_path / "t.model")
  assert again.fingerprint == tok.fingerprint
  assert tokenizer.train(lambda: iter(docs), vocab_size=300).fingerprint == tok.fingerprint


def test_documents_from_every_format(files):
  root, docs = files
  read = list(corpus.documents(corpus.resolve_paths(str(root))))
  assert sorted(read) == sorted(docs)


def test_store_read_back_is_exact(files, tmp_path):
  root, docs = files
  prepared = prepare(data_cfg(root, tmp_path), vocab_size=300, progress=False)
  tok = prepared.tokenizer
  expected = {tuple(np.append(tok.encode([d])[0], tokenizer.EOS)) for d in docs}
  seen = set()
  built = prepared.sources[0]
  for split in (built.train, built.eval):
    offsets = split.doc_offsets()
    tokens = split.tokens.read().result()
    assert offsets[0] == 0 and offsets[-1] == split.n_tokens == len(tokens)
    seen |= {tuple(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)}
  assert seen == expected  # every document, exactly, in one split
  assert built.eval.meta["n_docs"] >= 1 and built.train.meta["n_docs"] >= 50


def test_cache_is_reused_and_a_changed_corpus_is_rebuilt(files, tmp_path):
  root, docs = files
  corpus_dir = tmp_path / "c"
  shutil.copytree(root, corpus_dir)
  first = prepare(data_cfg(corpus_dir, tmp_path / "cache"), 300, progress=False)
  again = prepare(data_cfg(corpus_dir, tmp_path / "cache"), 300, progress=False)
  assert again.sources[0].entry == first.sources[0].entry
  (corpus_dir / "a.txt").write_text("a different first document\n" * 20)
  changed = prepare(data_cfg(corpus_dir, tmp_path / "cache"), 300, progress=False)
  assert changed.sources[0].entry != first.sources[0].entry


@pytest.fixture(scope="module")
def prepared(files, tmp_path_factory):
  root, _ = files
  return prepare(data_cfg(root, tmp_path_factory.mktemp("cache")), 300, progress=False).sources[0]


def test_batches_are_a_pure_function_of_seed_and_step(prepared):
  a = one_source(prepared.train, 16, 8, seed=5)
  b = one_source(prepared.train, 16, 8, seed=5)
  c = one_source(prepared.train, 16, 8, seed=6)
  for step in (0, 3, 500):  # 500 is several epochs in
    np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
  assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])
  batch = a.batch(0)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_resume_at_step_k_is_bit_identical(prepared):
  source = one_source(prepared.train, 16, 8, seed=1)
  uninterrupted = list(prefetch(source.batch, 0, 12, threads=2))
  resumed = list(prefetch(one_source(prepared.train, 16, 8, seed=1).batch, 7, 12, threads=2))
  for before, after in zip(uninterrupted[7:], resumed, strict=True):
    for key in before:
      np.testing.assert_array_equal(before[key], after[key])


def test_a_process_reads_exactly_its_rows_of_the_global_batch(prepared):
  whole = one_source(prepared.train, 16, 8, seed=2).batch(4)["inputs"]
  halves = [
    one_source(prepared.train, 16, 8, seed=2, rows=rows).batch(4)["inputs"]
    for rows in (range(0, 4), range(4, 8))
  ]
  assert all(h.shape == (4, 16) for h in halves)
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  strided = one_source(prepared.train, 16, 8, seed=2, rows=[1, 5, 6]).batch(4)["inputs"]
  np.testing.assert_array_equal(strided, whole[[1, 5, 6]])


def test_every_window_appears_once_per_epoch(prepared):
  source = one_source(prepared.train, 16, 8, seed=3)
  rows = source.sources[0].n_windows // 8 * 8
  windows = [source.sources[0].order[g] for g in range(rows)]
  assert len(set(windows)) == rows


def test_segment_ids_start_a_new_document_after_each_eos(prepared):
  batch = one_source(prepared.train, 64, 8, seed=0, packing="segments").batch(0)
  inputs, segments = batch["inputs"], batch["segment_ids"]
  assert (segments[:, 0] == 0).all()
  after_eos = np.zeros_like(inputs, bool)
  after_eos[:, 1:] = inputs[:, :-1] == tokenizer.EOS
  np.testing.assert_array_equal(np.diff(segments, axis=1) == 1, after_eos[:, 1:])
  assert after_eos.any()


def test_store_errors(prepared, tmp_path):
  path = prepared.train.parts[0].path
  with pytest.raises(DataError, match="not the configured one"):
    store.TokenStore(path, "0123456789abcdef")
  with pytest.raises(DataError, match=r"token id \d+ >= model.vocab_size=100"):
    store.TokenStore(path, prepared.train.parts[0].meta["tokenizer"], vocab_size=100)
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  (broken / "meta.json").unlink()  # as if killed before the last write
  with pytest.raises(DataError, match="incomplete"):
    store.TokenStore(str(broken))
  shutil.copytree(path, tmp_path / "truncated")
  m = json.loads((tmp_path / "truncated" / "meta.json").read_text())
  m["n_tokens"] += 5
  (tmp_path / "truncated" / "meta.json").write_text(json.dumps(m))
  with pytest.raises(DataError, match="do not match"):
    store.TokenStore(str(tmp_path / "truncated"))
  with pytest.raises(DataError, match="fewer than one batch"):
    one_source(prepared.eval, 64, 10_000, seed=0)


def test_a_failed_shard_build_leaves_nothing_and_keeps_a_built_shard(files, tmp_path):
  root, docs = files
  tokenizer.train(lambda: iter(docs), vocab_size=300).save(tmp_path / "t.model")
  job = {"tokenizer": str(tmp_path / "t.model"), "text_field": "text", "eval_frac": 0.1}
  entry = tmp_path / "entry"
  shards.build_shard(str(entry), 0, shards.plan(corpus.resolve_paths(str(root)))[0], job)
  built = (entry / "shards" / "00000" / "done.json").read_text()
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
  bad = {"pieces": [[str(tmp_path / "bad.jsonl"), None]], "bytes": 30}
  for index in (0, 1):  # over the built shard, and as a new one
    with pytest.raises(DataError, match="bad.jsonl:2"):
      shards.build_shard(str(entry), index, bad, job)
  assert (entry / "shards" / "00000" / "done.json").read_text() == built
  assert sorted(p.name for p in (entry / "shards").iterdir()) == ["00000"]  # no partial left


def run_main(capsys, *argv):
  code = main(["recipe=celerity_tiny", "run.progress=false", "run.tensorboard=false", *argv])
  return code, capsys.readouterr().err


def test_bad_input_exits_3_naming_the_file(capsys, files, tmp_path):
  root, _ = files
  code, err = run_main(capsys, f"data.paths={tmp_path}/missing.txt", f"run.dir={tmp_path}/r")
  assert code == 3 and "missing.txt" in err
  (tmp_path / "empty.txt").write_text("")
  code, err = run_main(
    capsys,
    f"data.paths={tmp_path}/empty.txt",
    f"data.cache_dir={tmp_path}/c",
    f"run.dir={tmp_path}/r",
  )
  assert code == 3 and "no non-empty documents" in err
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
  code, err = run_main(capsys, f"data.paths={tmp_path}/bad.jsonl", f"run.dir={tmp_path}/r")
  assert code == 3 and "bad.jsonl:2" in err
  (tmp_path / "notes.md").write_text("x")
  code, err = run_main(capsys, f"data.paths={tmp_path}/notes.md", f"run.dir={tmp_path}/r")
  assert code == 3 and "notes.md" in err and "unsupported" in err
  small = tmp_path / "small.jsonl"  # 40 short documents: far below one batch
  small.write_text(
    "".join(
      json.dumps({"text": f"print('hello world number {i}')\n" * 3}) + "\n" for i in range(40)
    )
  )
  code, err = run_main(
    capsys,
    f"data.paths={small}",
    f"data.cache_dir={tmp_path}/c",
    "data.eval_frac=0.2",
    f"run.dir={tmp_path}/r",
    "model.vocab_size=300",
  )
  assert code == 3, err
  assert "fewer than one batch" in err and "/train" in err


def test_tokenizer_larger_than_the_model_vocab_exits_3(capsys, files, tmp_path):
  root, docs = files
  tokenizer.train(lambda: iter(docs), vocab_size=300).save(tmp_path / "t.model")
  code, err = run_main(
    capsys,
    f"data.tokenizer={tmp_path}/t.model",
    "model.vocab_size=256",
    f"data.cache_dir={tmp_path}/c",
    f"run.dir={tmp_path}/r",
  )
  assert code == 3 and "model.vocab_size=256" in err


def test_celerity_tiny_trains_on_stdlib_and_held_out_loss_falls(tmp_path, stdlib_cache):
  from celerity_jax.train import loop

  cfg = apply_overrides(
    recipes.load("celerity_tiny"),
    [
      f"run.dir={tmp_path / 'run'}",
      f"data.cache_dir={stdlib_cache}",
      "run.progress=false",
      "run.tensorboard=false",
      "train.stop_step=20",
      "train.eval_every=10",
    ],
  )
  loop.run(cfg)
  rows = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  assert len(evals) == 2 and evals[1] < evals[0] - 0.5
  assert rows[-1]["loss"] < rows[1]["loss"] - 3.0


def test_pipeline_segment_ids_stop_attention_across_documents(prepared):
  import jax.numpy as jnp
  from flax import nnx

  from celerity_jax.config import ModelConfig, ParamConfig
  from celerity_jax.models.decoder import Decoder
  from celerity_jax.parametrization import multipliers

  batch = one_source(prepared.train, 64, 8, seed=0, packing="segments").batch(0)
  row = int(np.argmax(batch["segment_ids"].max(axis=1) >= 1))  # a row with two documents
  tokens, segments = batch["inputs"][row : row + 1], batch["segment_ids"][row : row + 1]
  boundary = int(np.argmax(segments[0] == 1))
  cfg = ModelConfig(
    vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_head=16, d_ff=64, seq_len=64
  )
  model = Decoder(cfg, multipliers(ParamConfig(d_base=32), cfg), nnx.Rngs(params=0))
  changed = tokens.copy()
  changed[0, :boundary] = (changed[0, :boundary] + 7) % 300  # rewrite the first document
  a = model(jnp.asarray(tokens), jnp.asarray(segments))[0]
  b = model(jnp.asarray(changed), jnp.asarray(segments))[0]
  second = segments[0] == 1
  np.testing.assert_allclose(np.asarray(a)[0, second], np.asarray(b)[0, second], atol=1e-5)
  assert np.abs(np.asarray(a - b)[0, :boundary]).max() > 1e-3
