"""The data budget check (data/budget.py): a run's tokens against its corpus, from file sizes."""

import json

from celerity_jax.commands import tokenize
from celerity_jax.data import budget


def test_the_estimate_counts_compressed_files_at_their_expansion(tmp_path, capsys):
  (tmp_path / "a.txt").write_bytes(b"x" * 3000)
  (tmp_path / "b.jsonl.zst").write_bytes(b"y" * 1000)

  from celerity_jax.data import corpus

  found = budget.estimate(corpus.resolve_paths(str(tmp_path)))
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


def test_a_mixture_is_checked_source_by_source(tmp_path, capsys):
  """A source whose weight asks for more passes than MAX_PASSES is refused even when the mixture
  as a whole holds the run's tokens."""
  (tmp_path / "big").mkdir()
  (tmp_path / "big" / "a.txt").write_bytes(b"x " * 8_000_000)  # ~10.7M estimated tokens
  (tmp_path / "small.txt").write_bytes(b"y " * 20_000)  # ~27k
  mix = tmp_path / "mix.toml"
  mix.write_text(
    '[sources.big]\npaths = "big"\nweight = 9\n[sources.small]\npaths = "small.txt"\nweight = 1\n'
  )
  assert tokenize.main(["recipe=celerity_tiny", f"data.mixture={mix}", "--budget"]) == 1
  numbers = json.loads(capsys.readouterr().out)
  assert numbers["sources"]["big"]["passes"] < 1 < budget.MAX_PASSES < numbers["passes"]
  assert numbers["passes"] == numbers["sources"]["small"]["passes"]
  assert numbers["sources"]["small"]["weight"] == 0.1
