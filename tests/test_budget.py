"""The data budget check (data/budget.py): a run's tokens against its corpus, from file sizes."""

import json

from celerity_jax.commands import tokenize
from celerity_jax.data import budget


def test_the_estimate_counts_compressed_files_at_their_expansion(tmp_path, capsys):
  (tmp_path / "a.txt").write_bytes(b"x" * 3000)
  (tmp_path / "b.jsonl.zst").write_bytes(b"y" * 1000)

  class Data:
    paths, corpus = str(tmp_path), "stdlib"

  found = budget.estimate(Data)
  assert found["files"] == 2 and found["bytes"] == 4000
  assert found["tokens_estimate"] == round(
    (3000 + budget.EXPANSION * 1000) / budget.BYTES_PER_TOKEN
  )
  # celerity_tiny's D (4.6M tokens) is 575 passes over 8k estimated tokens: refused, exit 1
  assert tokenize.main(["recipe=celerity_tiny", f"data.paths={tmp_path}", "--budget"]) == 1
  numbers = json.loads(capsys.readouterr().out)
  assert numbers["fits"] is False and numbers["passes"] > budget.MAX_PASSES
  assert numbers["run_tokens"] == 4_600_320
  assert tokenize.main(["recipe=celerity_tiny", "--budget"]) == 0  # the stdlib corpus holds it
  assert json.loads(capsys.readouterr().out)["passes"] < 1
