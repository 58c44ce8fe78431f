"""A token-store build's memory does not grow with the corpus: a 544 MB corpus builds, and its
stores open, under a 512 MB limit on each process's data segment (RLIMIT_DATA: heap and private
mappings). Most of that limit is address space reserved, not used: the worker processes peak near
160 MB and the process that opens the stores near 410 MB, of which its I/O threads' reservations
are most, with the thread stacks limited to 2 MB (RLIMIT_STACK sets their default size; at 8 MB
each the threads alone would pass the limit); their resident memory stays near 100 MB. The
tokenizer is a word-level tokenizer.json, fast to encode: the memory, not the encoding, is under
test."""

import json
import subprocess
import sys

import numpy as np
from test_sources import DOCS

CAP_MB, FILES, FILE_MB = 512, 16, 34

BUILD = """
import json, resource, sys
if __name__ == "__main__":  # (the build's worker processes import this file again)
  cap = int(sys.argv[1]) << 20
  resource.setrlimit(resource.RLIMIT_STACK, (2 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))
  resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))  # both inherited by the worker processes
  from celerity_jax.config import DataConfig
  from celerity_jax.data.prepare import prepare
  cfg = DataConfig(paths=sys.argv[2], tokenizer=sys.argv[3], cache_dir=sys.argv[4],
                   eval_frac=0.01, build_processes=2)
  built = prepare(cfg, 1 << 16, progress=False).sources[0]
  print(json.dumps({"train": built.train.n_tokens, "eval": built.eval.n_tokens}))
"""


def test_a_corpus_larger_than_the_memory_limit_builds(tmp_path):
  rng = np.random.default_rng(0)
  words = np.array(" ".join(DOCS[:50]).split())
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  lines, size = [], 0
  while size < FILE_MB << 20:
    text = " ".join(words[rng.integers(0, len(words), 600)].tolist())
    lines.append(json.dumps({"text": text}) + "\n")
    size += len(lines[-1])
  block = "".join(lines)
  for i in range(FILES):  # (the same documents in every file: the bytes are what count)
    (corpus / f"part{i}.jsonl").write_text(block)
  total = sum(f.stat().st_size for f in corpus.iterdir())
  assert total > CAP_MB << 20
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(sorted(set(words)))}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.save(str(tmp_path / "tokenizer.json"))
  script = tmp_path / "build.py"
  script.write_text(BUILD)
  result = subprocess.run(
    [
      sys.executable,
      str(script),
      str(CAP_MB),
      str(corpus),
      str(tmp_path / "tokenizer.json"),
      str(tmp_path / "cache"),
    ],  # fmt: skip
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  counts = json.loads(result.stdout)
  words_in = total // (len(" ".join(words)) / len(words) + 1)  # about one token per word
  assert counts["train"] > 0.9 * words_in and counts["eval"] > 0  # every document was tokenized
