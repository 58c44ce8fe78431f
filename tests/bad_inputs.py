"""Bad input as a user meets it: each row of a case table (tests/test_bad_inputs.py for the
training command, tests/test_bad_tool_inputs.py for the tools) runs a real entry point in its own
process and must exit with its status, print exactly one line on stderr naming the key or file
(besides the run's own `celerity_jax: N=...` summary when the failure comes after it), print no
traceback, leave every file that existed before exactly as it was, and leave no empty run.dir.

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

import numpy as np
from conftest import CACHE, SMALL

from celerity_jax.commands import tokenize
from celerity_jax.data import corpus as corpus_lib
from celerity_jax.main import main

REPO = Path(__file__).resolve().parent.parent

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
  entry = next((tmp / "cache").glob("data-*"))
  return sorted((entry / "shards" / "00000" / "train" / "tokens" / "c").iterdir())[0]


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


def parquet(name, columns: dict):
  def setup(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), tmp / name)

  return setup


def truncated_zst(tmp):
  import zstandard

  data = zstandard.ZstdCompressor().compress(b'{"text": "some text"}\n' * 2000)
  (tmp / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])


def drop_size_check(tmp):
  """Deletes a shard and its entry in meta.json: only the read-time fill check can catch it."""
  entry = next((tmp / "cache").glob("data-*")) / "shards" / "00000" / "train"
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
# SMALL less the model's shape, which init.from's weights fix
INIT = [
  "recipe=celerity_tiny",
  *[a for a in SMALL if not a.startswith("model.") or a.startswith("model.seq_len")],
  "run.dir={tmp}/fresh",
  "init.from={tmp}/hf",
]


def hf_llama(damage=None):
  """A setup writing a tiny Llama checkpoint in two safetensors shards with their index, then
  `damage(directory)`."""

  def setup(tmp):
    from safetensors.numpy import save_file

    out = tmp / "hf"
    out.mkdir()
    config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      **{"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "head_dim": 16},
      **{"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2},
      **{"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }
    (out / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (256, 32), "model.norm.weight": (32,)}
    shapes["lm_head.weight"] = (256, 32)
    for i in range(2):
      for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"model.layers.{i}.self_attn.{name}.weight"] = (32, 32)
      for name, shape in (("up_proj", (64, 32)), ("gate_proj", (64, 32)), ("down_proj", (32, 64))):
        shapes[f"model.layers.{i}.mlp.{name}.weight"] = shape
      for name in ("input_layernorm", "post_attention_layernorm"):
        shapes[f"model.layers.{i}.{name}.weight"] = (32,)
    names = sorted(shapes)
    files = {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
      file = f"model-0000{part}-of-00002.safetensors"
      save_file({n: np.full(shapes[n], 0.01, np.float32) for n in chunk}, str(out / file))
      files |= {n: file for n in chunk}
    index = {"metadata": {}, "weight_map": files}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    if damage is not None:
      damage(out)

  return setup


def edit_json(name, edit):
  def damage(directory):
    data = json.loads((directory / name).read_text())
    edit(data)
    (directory / name).write_text(json.dumps(data))

  return damage


def build_corpus(root: Path):
  """A small text corpus and its token cache under `root`: (corpus dir, cache dir)."""
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


def build_finished_run(run: Path) -> Path:
  """A run stopped at step 6 with checkpoints at 3 and 6."""
  args = ["recipe=celerity_tiny", *SMALL, f"run.dir={run}", "train.stop_step=6"]
  assert main([*args, "checkpoint.every_steps=3"]) == 0
  return run


def snapshot(root: Path) -> dict:
  return {
    p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def check(module, args, status, named, setup, tmp_path, corpus, finished_run):
  """Runs one case in tmp_path (with copies of the corpus's cache and the finished run)."""
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
  if module.startswith("tools."):  # tools/ runs from a checkout: the repository on the path
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
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
