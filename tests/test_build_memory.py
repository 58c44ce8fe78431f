"""A token-store build's memory does not grow with the corpus: a 272 MB corpus builds under a
256 MB limit on each process's data segment (RLIMIT_DATA: heap and private mappings; the
address-space limit would instead count the tensorstore threads' reserved arenas)."""

import json
import subprocess
import sys

import numpy as np
from test_sources import DOCS

from celerity_jax.data import tokenizer

CAP_MB, FILES, FILE_MB = 256, 8, 34

BUILD = """
import json, resource, sys
if __name__ == "__main__":  # (the build's worker processes import this file again)
  cap = int(sys.argv[1]) << 20
  resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))  # inherited by the worker processes
  from celerity_jax.config import DataConfig
  from celerity_jax.data.prepare import prepare
  cfg = DataConfig(paths=sys.argv[2], tokenizer=sys.argv[3], cache_dir=sys.argv[4],
                   eval_frac=0.01, build_processes=2)
  built = prepare(cfg, 512, progress=False).sources[0]
  print(json.dumps({"train": built.train.n_tokens, "eval": built.eval.n_tokens}))
"""


def test_a_corpus_larger_than_the_memory_limit_builds(tmp_path):
  rng = np.random.default_rng(0)
  words = np.array(" ".join(DOCS[:50]).split())
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(FILES):
    lines, size = [], 0
    while size < FILE_MB << 20:
      text = " ".join(words[rng.integers(0, len(words), 600)].tolist())
      lines.append(json.dumps({"text": text}) + "\n")
      size += len(lines[-1])
    (corpus / f"part{i}.jsonl").write_text("".join(lines))
  total = sum(f.stat().st_size for f in corpus.iterdir())
  assert total > CAP_MB << 20
  tokenizer.train(lambda: DOCS, 512).save(tmp_path / "t.model")
  script = tmp_path / "build.py"
  script.write_text(BUILD)
  result = subprocess.run(
    [
      sys.executable,
      str(script),
      str(CAP_MB),
      str(corpus),
      str(tmp_path / "t.model"),
      str(tmp_path / "cache"),
    ],  # fmt: skip
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  counts = json.loads(result.stdout)
  assert counts["train"] > 4 * total // 10 and counts["eval"] > 0  # every byte was tokenized
