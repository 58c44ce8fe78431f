"""What a user brings besides files: a mixture file (the paper's own as an example), an exclusion
of records by a field, a Hugging Face tokenizer.json; and each mistake in them refused in one
line with the documented exit status, leaving nothing behind."""

import json
from pathlib import Path

import pytest
from conftest import SMALL
from test_sources import DOCS

from celerity_jax.config import ConfigError, DataConfig
from celerity_jax.data import corpus, mixture, shards, tokenizer
from celerity_jax.main import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_papers_mixture_example_holds_table_6():
  example = ROOT / "recipes" / "mixtures" / "celerity_paper.toml"
  found = mixture.sources(DataConfig(mixture=str(example)))
  assert {s.name: s.weight for s in found} == {
    "fineweb_edu": 64.75,
    "slimpajama": 17.49,
    "starcoder": 10.8,
    "cosmopedia": 4.66,
    "openwebmath": 1.88,
    "ultratextbooks": 0.42,
  }
  by_name = {s.name: s for s in found}
  assert by_name["starcoder"].text_field == "content"
  assert by_name["slimpajama"].exclude == {
    "meta.redpajama_set_name": ["RedPajamaC4", "RedPajamaCommonCrawl"]
  }
  assert all(s.paths.startswith("gs://YOUR-BUCKET/") for s in found)


def test_exclude_skips_records_by_a_nested_field(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [("web page", "RedPajamaC4"), ("a paper", "RedPajamaArXiv"), ("code", "RedPajamaGithub")]
  (tmp_path / "a.jsonl").write_text(
    "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) + "\n" for t, s in rows)
  )
  meta = [{"redpajama_set_name": s} for _, s in rows]
  pq.write_table(pa.table({"text": [t for t, _ in rows], "meta": meta}), tmp_path / "b.parquet")
  skip = {"meta.redpajama_set_name": ["RedPajamaC4"]}
  for name in ("a.jsonl", "b.parquet"):
    assert list(corpus.documents([tmp_path / name], "text", skip)) == ["a paper", "code"]
  files = [tmp_path / "a.jsonl"]
  assert corpus.fingerprint(files, "text", skip) != corpus.fingerprint(files, "text")
  # and the shard builder applies it
  tokenizer.train(lambda: DOCS, 512).save(tmp_path / "t.model")
  job = {"tokenizer": str(tmp_path / "t.model"), "text_field": "text", "exclude": skip}
  job["eval_frac"] = 0.0
  shard = shards.plan([tmp_path / "b.parquet"])[0]
  shards.build_shard(str(tmp_path / "entry"), 0, shard, job)
  done = json.loads((tmp_path / "entry" / "shards" / "00000" / "done.json").read_text())
  assert done["train"]["n_docs"] == 2


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """A byte-level BPE tokenizer.json (as GPT-2 and Llama 3 ship), trained on DOCS."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tk.train_from_iterator(DOCS, trainer)
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tk.save(str(path))
  return path


def test_a_tokenizer_json_round_trips_text_exactly(tokenizer_json):
  tok = tokenizer.load(tokenizer_json)
  assert tok.eos_id == 0 and tok.vocab_size == 400
  for text in [*DOCS[:20], "Ünïcödé, tabs\tand  spaces\n", "never seen: ∑ 🙂"]:
    assert tok.decode(tok.encode([text])[0]) == text


def test_a_run_trains_with_a_tokenizer_json(tokenizer_json, tmp_path, capsys):
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i, doc in enumerate(DOCS[:120]):
    (corpus_dir / f"{i}.txt").write_text(doc)
  small = [a for a in SMALL if not a.startswith(("data.corpus", "model.vocab_size"))]
  run_dir = tmp_path / "run"
  args = [
    "recipe=celerity_tiny",
    *small,
    "model.vocab_size=512",
    f"data.paths={corpus_dir}",
    f"data.tokenizer={tokenizer_json}",
    f"data.cache_dir={tmp_path / 'cache'}",
    "data.eval_frac=0.1",
    f"run.dir={run_dir}",
    "train.stop_step=3",
  ]
  assert main(args) == 0, capsys.readouterr().err
  assert (run_dir / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
  pinned = json.loads((run_dir / "config.json").read_text())["data_fingerprint"]
  assert pinned["tokenizer"] == tokenizer.load(tokenizer_json).fingerprint
  from celerity_jax import trained
  from celerity_jax.hf import convert

  run = trained.load(run_dir)
  assert run.tokenizer.eos_id == 0  # what sampling starts prompts with and stops at
  # the Hugging Face export carries the tokenizer.json, which transformers reads as is
  import transformers

  files = convert.write(run, tmp_path / "hf")["files"]
  assert "tokenizer.json" in files and "tokenizer.model" not in files
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  for text in DOCS[:5]:
    assert hf(text)["input_ids"] == run.tokenizer.encode([text])[0].tolist()
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["eos_token_id"] == config["bos_token_id"] == 0


def write_mix(root: Path, web_weight="6", extra="") -> Path:
  (root / "web").mkdir(parents=True, exist_ok=True)
  for i, doc in enumerate(DOCS[:40]):
    (root / "web" / f"{i}.txt").write_text(doc)
  (root / "empty").mkdir(exist_ok=True)
  (root / "empty" / "blank.txt").write_text("   \n\n")
  path = root / "mix.toml"
  path.write_text(
    f'[sources.web]\npaths = "web"\nweight = {web_weight}\n'
    '[sources.more]\npaths = "web/1.txt,web/2.txt"\nweight = 1\n' + extra
  )
  return path


def refused(capsys, tmp_path, *args):
  run_dir, cache = tmp_path / "run", tmp_path / "cache"
  code = main(
    [
      "recipe=celerity_tiny",
      "run.progress=false",
      f"run.dir={run_dir}",
      f"data.cache_dir={cache}",
      *args,
    ]  # fmt: skip
  )
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert not run_dir.exists()  # nothing left behind
  assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith("tok")]
  return code, err


@pytest.mark.parametrize(
  "setup,args,status,named",
  [
    ({"web_weight": "0"}, [], 2, "[sources.web]: weight 0 must be a number above 0"),
    ({"web_weight": "-2"}, [], 2, "[sources.web]: weight -2 must be a number above 0"),
    ({}, ["data.weights=web:-1"], 2, "data.weights: web: weight -1.0 must be a number above 0"),
    ({}, ["data.weights=web:0"], 2, "data.weights: web: weight 0.0 must be a number above 0"),
    ({}, ["data.weights=nosuch:1"], 2, "data.weights: unknown source nosuch"),
    ({}, ["data.weights=web"], 2, "data.weights: 'web' is not NAME:WEIGHT"),
    ({"extra": '[sources.gone]\npaths = "empty"\nweight = 1\n'}, [], 3, "source gone:"),
    ({"extra": '[sources.x]\npaths = "web"\nweight = 1\nbatch = 3\n'}, [], 2, "unknown key batch"),
    ({"extra": "[sources.y]\nweight = 1\n"}, [], 2, "[sources.y]: no paths"),
    ({"extra": "[sources.z\n"}, [], 2, "is not valid TOML"),
    ({}, ["data.paths=elsewhere"], 2, "data.paths and data.mixture are both set"),
  ],
  ids=[
    "zero",
    "negative",
    "negative override",
    "zero override",
    "unknown name",
    "no weight",
    "empty source",
    "unknown key",
    "no paths",
    "bad toml",
    "paths too",
  ],  # fmt: skip
)
def test_a_bad_mixture_is_refused_in_one_line(setup, args, status, named, tmp_path, capsys):
  mix = write_mix(tmp_path / "data", **setup)
  code, err = refused(capsys, tmp_path, f"data.mixture={mix}", *args)
  assert code == status and named in err, err


def test_a_missing_mixture_file_and_a_missing_column_name_the_file(tmp_path, capsys):
  code, err = refused(capsys, tmp_path, f"data.mixture={tmp_path}/nope.toml")
  assert code == 2 and "nope.toml" in err
  import pyarrow as pa
  import pyarrow.parquet as pq

  (tmp_path / "d").mkdir()
  pq.write_table(pa.table({"body": DOCS[:10]}), tmp_path / "d" / "a.parquet")
  (tmp_path / "m.toml").write_text('[sources.p]\npaths = "d/a.parquet"\nweight = 1\n')
  code, err = refused(capsys, tmp_path, f"data.mixture={tmp_path}/m.toml")
  assert code == 3 and "a.parquet: no column 'text'" in err


def test_weights_are_relative_and_overridable():
  assert mixture.quantize([64.75, 17.49]) == mixture.quantize([0.6475, 0.1749])
  with pytest.raises(ConfigError, match="unknown source"):
    mixture.sources(DataConfig(weights="a:1"))
