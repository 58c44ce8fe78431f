"""Corpus sources a pretraining team brings: parquet (read a row group at a time), JSONL and text
in .gz and .zst (several frames), the text field named by data.text_field; and a run on them."""

import gzip
import json

import pytest

from celerity_jax.data import DataError, corpus
from celerity_jax.main import main

# real text (the standard library's first modules, up to 3k characters each): enough variety for
# a BPE vocabulary
DOCS = [p.read_text(errors="replace")[:3000] for p in corpus.stdlib_files()[:240]]
DOCS = [d for d in DOCS if d.strip()][:240]


def write_sources(root, field="content"):
  """DOCS over four files: a parquet file of several row groups (with another column), a
  .jsonl.zst of two frames, a .jsonl.gz and a .txt.zst; returns the documents in file order."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  root.mkdir(parents=True, exist_ok=True)
  pq.write_table(
    pa.table({"id": list(range(80)), field: DOCS[:80]}), root / "a.parquet", row_group_size=16
  )
  lines = "".join(json.dumps({field: d, "meta": 1}) + "\n" for d in DOCS[80:160]).encode()
  half = len(lines) // 2
  z = zstandard.ZstdCompressor()
  (root / "b.jsonl.zst").write_bytes(z.compress(lines[:half]) + z.compress(lines[half:]))
  with gzip.open(root / "c.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps({field: d}) + "\n" for d in DOCS[160:239]))
  (root / "d.txt.zst").write_bytes(z.compress(DOCS[239].encode()))
  return DOCS


def test_every_source_kind_reads_its_documents_in_order(tmp_path):
  want = write_sources(tmp_path / "corpus")
  files = corpus.resolve_paths(str(tmp_path / "corpus"))
  assert [f.name for f in files] == ["a.parquet", "b.jsonl.zst", "c.jsonl.gz", "d.txt.zst"]
  assert list(corpus.documents(files, "content")) == want
  assert corpus.resolve_paths(f"{tmp_path}/corpus/*.jsonl.*") == files[1:3]
  with pytest.raises(DataError, match="a.parquet: no column 'text'"):
    list(corpus.documents(files, "text"))
  # the field is part of the corpus's identity (the same bytes give other documents); the
  # default keeps the fingerprint that runs pinned before the key existed
  assert corpus.fingerprint(files, "content") != corpus.fingerprint(files)
  (tmp_path / "corpus" / "e.parquet.gz").write_bytes(b"x")
  with pytest.raises(DataError, match="unsupported file type"):
    corpus.resolve_paths(str(tmp_path / "corpus" / "e.parquet.gz"))


@pytest.mark.slow
def test_a_run_trains_on_parquet_and_zst_sources(tmp_path):
  from conftest import SMALL

  write_sources(tmp_path / "corpus")
  args = [
    "recipe=celerity_tiny",
    *[a for a in SMALL if not a.startswith("data.corpus")],
    "model.vocab_size=384",
    f"data.paths={tmp_path / 'corpus'}",
    "data.text_field=content",
    "data.eval_frac=0.2",
    f"data.cache_dir={tmp_path / 'cache'}",
    f"run.dir={tmp_path / 'run'}",
    "train.stop_step=3",
  ]
  assert main(args) == 0
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["config"]["data"]["text_field"] == "content"
  assert saved["data_fingerprint"]["sources"]["data"]["corpus"] == corpus.fingerprint(
    corpus.resolve_paths(str(tmp_path / "corpus")), "content"
  )
  # another field is other data: a resume compares it like every trajectory key
  from celerity_jax.checkpoint import FREE_KEYS, config_changes

  assert "data.text_field" not in FREE_KEYS
  other = json.loads(json.dumps(saved))
  other["config"]["data"]["text_field"] = "body"
  assert "data.text_field" in config_changes(saved, other)


def test_any_fsspec_url_is_a_source(tmp_path):
  """A corpus at another fsspec URL (memory:// here; s3://, hf://, https:// alike) reads and
  tokenizes to the same stores as the same files on local disk."""
  import fsspec

  from celerity_jax.config import DataConfig
  from celerity_jax.data.prepare import prepare

  write_sources(tmp_path / "corpus")
  fs = fsspec.filesystem("memory")
  for path in sorted((tmp_path / "corpus").iterdir()):
    fs.pipe(f"/fsspec-corpus/{path.name}", path.read_bytes())
  found = corpus.resolve_paths("memory://fsspec-corpus")
  assert [f.name for f in found] == sorted(p.name for p in (tmp_path / "corpus").iterdir())
  assert [f.name for f in corpus.resolve_paths("memory://fsspec-corpus/*.parquet")] == ["a.parquet"]
  built = {}
  for name, paths in (("local", tmp_path / "corpus"), ("url", "memory://fsspec-corpus")):
    # one build process: a memory:// file system is this process's own
    cfg = DataConfig(paths=str(paths), text_field="content", cache_dir=str(tmp_path / name),
                     eval_frac=0.1, build_processes=1)  # fmt: skip
    built[name] = prepare(cfg, 512, progress=False).sources[0]
  assert built["url"].train.content == built["local"].train.content
  assert built["url"].corpus == built["local"].corpus
  with pytest.raises(DataError, match="nosuch://x"):
    corpus.resolve_paths("nosuch://x")
