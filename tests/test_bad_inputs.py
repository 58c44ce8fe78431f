"""Bad input to the training command (tests/bad_inputs.py states the contract each row checks):
configuration, run directories, data."""

import pytest
from bad_inputs import (
  CORPUS_FILES,
  FILES,
  LONG,
  RUN,
  a_file,
  check,
  corrupt_gzip,
  drop_size_check,
  edit_first_shard,
  first_shard,
  held_by_this_process,
  write,
)
from conftest import SMALL

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
]


@pytest.mark.parametrize("name,module,args,status,named,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input(
  name, module, args, status, named, setup, tmp_path, bad_input_corpus, bad_input_run
):
  check(module, args, status, named, setup, tmp_path, bad_input_corpus, bad_input_run)
