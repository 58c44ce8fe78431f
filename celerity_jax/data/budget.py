"""Whether a run's token budget fits its corpus (each source of a mixture, by its weight),
estimated from file sizes before anything is read or tokenized: a pod asks before it creates a
slice (tpu/pod), so that a recipe sized for billions of tokens never trains a thousand passes
over a small corpus by mistake.

The estimate errs towards more tokens, so a refusal is never a close call: text is taken at
BYTES_PER_TOKEN (this project's BPE tokenizers average about 1.9 bytes per token on the stdlib
corpus; English prose with a large vocabulary is nearer 4) and a compressed file (.gz, .zst,
.parquet) at EXPANSION times its size.
"""

from __future__ import annotations

from celerity_jax.data import corpus, mixture

BYTES_PER_TOKEN = 1.5
EXPANSION = 5.0  # text compresses 3-4x under gzip and zstd, and parquet pages likewise
MAX_PASSES = 4.0  # a run that would read its corpus more often than this is refused on a pod


def estimate(files: list) -> dict:
  """The files' count, bytes and estimated tokens (an upper estimate)."""
  plain = compressed = 0
  for path in files:
    size = corpus.size(path)
    if path.name.endswith((".gz", ".zst", ".parquet")):
      compressed += size
    else:
      plain += size
  tokens = (plain + EXPANSION * compressed) / BYTES_PER_TOKEN
  return {"files": len(files), "bytes": plain + compressed, "tokens_estimate": round(tokens)}


def check(cfg, run_tokens: float) -> tuple[bool, dict]:
  """(whether the run reads every source at most MAX_PASSES times, the numbers): a source's share
  of the run's tokens is its weight. `passes` is the most of any source."""
  sources = mixture.sources(cfg.data)
  total = sum(s.weight for s in sources)
  found = {}
  for s in sources:
    files = corpus.stdlib_files() if not s.paths else corpus.resolve_paths(s.paths)
    numbers = estimate(files)
    share = run_tokens * s.weight / total
    found[s.name] = {**numbers, "weight": s.weight / total,
                     "passes": share / max(numbers["tokens_estimate"], 1)}  # fmt: skip
  passes = max(f["passes"] for f in found.values())
  where = cfg.data.mixture or cfg.data.paths or f"the built-in {cfg.data.corpus} corpus"
  numbers = {"corpus": where, "run_tokens": round(run_tokens), "passes": passes}
  if len(found) == 1:
    numbers |= {k: v for k, v in next(iter(found.values())).items() if k != "weight"}
  else:
    numbers["sources"] = found
  return passes <= MAX_PASSES, numbers
