"""A resume never changes a run without saying so: other data is refused (the corpus, the tokenizer,
the token stores a run pinned) unless allowed, a changed batch continues the schedule and the data
in tokens, and each checkpoint keeps decoding with the tokenizer it trained with."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import SMALL, write_store

from celerity_jax import trained
from celerity_jax.data import DataError, corpus, store
from celerity_jax.main import main


def rows(run_dir):
  return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(root):
  return {
    p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


@pytest.fixture
def text_run(tmp_path):
  """A corpus of 30 stdlib files and `go(*extra)`, which trains on it in tmp_path/run."""
  docs = tmp_path / "docs"
  docs.mkdir()
  for i, source in enumerate(corpus.stdlib_files()[:30]):
    (docs / f"d{i}.txt").write_bytes(source.read_bytes())
  args = [
    "recipe=celerity_tiny",
    *[a for a in SMALL if not a.startswith("data.corpus")],
    "model.vocab_size=384",
    "data.eval_frac=0.2",
    f"data.cache_dir={tmp_path / 'cache'}",
    f"data.paths={docs}",
    f"run.dir={tmp_path / 'run'}",
    "checkpoint.every_steps=5",
  ]
  return docs, tmp_path / "run", lambda *extra: main([*args, *extra])


def test_a_changed_corpus_is_refused_before_it_is_tokenized(text_run, capsys):
  docs, run_dir, go = text_run
  assert go("train.stop_step=5") == 0
  entries = sorted(p.name for p in (run_dir.parent / "cache").iterdir())
  before = snapshot(run_dir)
  with (docs / "d3.txt").open("a") as f:
    f.write("\n# one more line\n")
  capsys.readouterr()
  assert go() == 2
  err = capsys.readouterr().err
  assert "(step 5)" in err and "the corpus's content (data_fingerprint.sources.data.corpus" in err
  assert "allow_config_change" in err
  assert snapshot(run_dir) == before  # tokenizer.model, config.json: untouched
  assert sorted(p.name for p in (run_dir.parent / "cache").iterdir()) == entries  # not tokenized

  # told to, it continues on the new corpus and says so
  assert go("train.stop_step=8", "checkpoint.allow_config_change=true") == 0
  assert "resumed from step 5 (restart 1); changed settings: the corpus's content" in (
    capsys.readouterr().err
  )
  restart = [r for r in rows(run_dir) if r.get("event") == "restart"][-1]
  assert "data_fingerprint.sources.data.corpus" in restart["config_changes"]
  pinned = json.loads((run_dir / "config.json").read_text())["data_fingerprint"]
  assert set(pinned) == {"sources", "tokenizer", "mixture"}
  assert set(pinned["sources"]["data"]) == {"corpus", "train_tokens", "eval_tokens"}
  assert go("train.stop_step=10") == 0  # the new data is now the run's: no refusal


def test_a_resume_with_another_tokenizer_keeps_the_old_one_for_its_checkpoints(text_run, capsys):
  _, run_dir, go = text_run
  assert go("train.stop_step=5") == 0
  first = trained.load(run_dir).tokenizer.fingerprint
  assert go("train.stop_step=10", "data.tokenizer_type=unigram") == 2  # a setting: refused
  assert (
    go("train.stop_step=10", "data.tokenizer_type=unigram", "checkpoint.allow_config_change=true")
    == 0
  )
  second = trained.load(run_dir).tokenizer.fingerprint
  assert second != first
  assert (run_dir / f"tokenizer-{first}.model").exists()
  assert trained.load(run_dir, step=5).tokenizer.fingerprint == first  # each step its own
  (run_dir / f"tokenizer-{first}.model").unlink()
  with pytest.raises(Exception, match=f"trained with tokenizer {first}"):
    trained.load(run_dir, step=5)


def test_swapped_or_overwritten_store_shards_are_refused(tmp_path, monkeypatch):
  """Shard files of equal size swapped, or one copied over another, pass every size and checksum
  check; the samples of each shard that meta.json holds catch them when the store is opened."""
  monkeypatch.setattr(store, "WRITE_CHUNK", 1024)
  monkeypatch.setattr(store, "READ_CHUNK", 256)
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, 300, rng.integers(20, 200)) for _ in range(60)]
  meta = write_store(str(tmp_path / "s"), docs, 3, {"tokenizer": "t"})
  assert store.TokenStore(str(tmp_path / "s")).content == meta["content"]
  shards = tmp_path / "s" / "tokens" / "c"
  assert len(list(shards.iterdir())) >= 3
  a, b = shards / "0", shards / "1"
  assert a.stat().st_size == b.stat().st_size
  saved = a.read_bytes()
  a.write_bytes(b.read_bytes())  # overwritten with an intact shard of the same size
  with pytest.raises(DataError, match="tokens/c/0 holds other data than was written"):
    store.TokenStore(str(tmp_path / "s"))
  b.write_bytes(saved)  # now swapped
  with pytest.raises(DataError, match="tokens/c/0 holds other data"):
    store.TokenStore(str(tmp_path / "s"))


def batch_run(run_dir, *extra):
  return main(
    [
      "recipe=celerity_tiny",
      *SMALL,
      f"run.dir={run_dir}",
      "run.log_every=1",
      "checkpoint.every_steps=5",
      *extra,
    ]
  )


def test_a_changed_batch_continues_the_schedule_and_the_data_in_tokens(tmp_path, capsys):
  """B 16 -> 32 at step 20 of T = 40: the run goes on at t = 0.5 with the tokens it had seen, the
  LR goes on from where it was, and the run ends when D tokens are seen (step 30, T' = 20); a
  further resume keeps the new batch and position."""
  run_dir = tmp_path / "run"
  assert batch_run(run_dir, "train.stop_step=20") == 0
  capsys.readouterr()
  assert batch_run(run_dir, "train.batch_size=32", "train.stop_step=25") == 2  # refused...
  assert "train.batch_size" in capsys.readouterr().err
  allowed = ["train.batch_size=32", "checkpoint.allow_config_change=true"]
  assert batch_run(run_dir, *allowed, "train.stop_frac=0.75") == 0  # ...or told: to t = 0.75
  err = capsys.readouterr().err
  assert "10,240 tokens seen, t 0.500 kept, T 40 -> 20 steps of 32 sequences" in err, err
  assert batch_run(run_dir, "train.batch_size=32") == 0  # the new batch is the run's now
  steps = {r["step"]: r for r in rows(run_dir) if "event" not in r}
  assert sorted(steps) == list(range(1, 31))
  tokens = [steps[s]["tokens"] for s in range(1, 31)]
  assert np.diff(tokens).tolist() == [16 * 32] * 19 + [32 * 32] * 10
  assert tokens[-1] == 40 * 16 * 32  # D, as the uninterrupted run reads it
  frac = [steps[s]["frac"] for s in range(1, 31)]
  assert frac[19] == 0.5 and frac[24] == 0.75 and frac[-1] == 1.0
  assert np.all(np.diff(frac) > 0)
  lr = [steps[s]["lr"] for s in range(1, 31)]
  assert np.all(np.diff(lr[5:]) < 0) and abs(lr[20] - lr[19]) < 2 * abs(lr[19] - lr[18])
  assert lr[-1] < 0.1 * max(lr)  # the last update of a decay to zero at D, not halfway
  meta = json.loads((run_dir / "config.json").read_text())["derived"]
  assert (meta["steps"], meta["step_offset"], meta["row_offset"]) == (20, -10.0, -320)


def test_the_data_after_a_batch_change_is_the_continuation_of_the_rows(tmp_path):
  """With B changed on resume, the global rows read are those the run had not read yet, in order:
  the windows of the resumed run's first step are the uninterrupted run's next ones."""
  from celerity_jax.data.pipeline import one_source

  rng = np.random.default_rng(1)
  meta = write_store(str(tmp_path / "s"), [rng.integers(4, 300, 500) for _ in range(40)], 3, {})
  tokens = store.TokenStore(str(tmp_path / "s"))
  assert tokens.content == meta["content"]
  before = one_source(tokens, 16, 8, seed=3)
  after = one_source(tokens, 16, 12, seed=3, row_offset=6 * 8 - 4 * 12)  # 6 steps of 8 done
  continued = np.concatenate([before.batch(s)["inputs"] for s in (6, 7, 8)])
  resumed = np.concatenate([after.batch(s)["inputs"] for s in (4, 5)])
  np.testing.assert_array_equal(resumed, continued[: len(resumed)])


def test_shutil_copied_cache_is_still_valid(tmp_path):
  """The checks are on content, not on file times: a cache copied elsewhere opens as it was."""
  rng = np.random.default_rng(2)
  meta = write_store(str(tmp_path / "s"), [rng.integers(4, 300, 100) for _ in range(20)], 3, {})
  shutil.copytree(tmp_path / "s", tmp_path / "copy")
  assert store.TokenStore(str(tmp_path / "copy")).content == meta["content"]
