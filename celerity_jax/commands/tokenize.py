"""Build (or find in the cache) the tokenizer and train/eval token stores of a recipe's data config.

  python -m celerity_jax.commands.tokenize recipe=celerity_tiny [data.paths=DIR,FILE,...] \
      [data.cache_dir=DIR]
  python -m celerity_jax.commands.tokenize recipe=celerity_1b data.paths=gs://... --budget

Prints the tokenizer file and each source's cache entry and token counts as JSON. Started as N
processes with the dist.* keys (dist.process_id=0..N-1, dist.num_processes=N,
dist.coordinator=HOST:PORT) on machines that share data.cache_dir (gs:// or a shared disk), the
processes split the build: each tokenizes its share of the shards with one process per core.
`--budget` reads and tokenizes nothing: it estimates the corpus's tokens from its files' sizes
(data/budget.py) and prints how many passes over it the run's D tokens would make; exit 1 when that
is more than
budget.MAX_PASSES (tpu/pod refuses such a run before it creates a slice). Exit 2 on a config
error, 3 on a data error (the message names the file).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
  from celerity_jax.cli import parse, run_cli

  def budget():
    from celerity_jax.data import budget as budget_lib
    from celerity_jax.resolve import resolve

    cfg, _ = parse([a for a in argv if a != "--budget"])
    if not cfg.data.paths and cfg.data.corpus == "synthetic":  # drawn fresh: never repeats
      print(json.dumps({"corpus": "synthetic", "passes": 0, "fits": True}, indent=2))
      return 0
    fits, numbers = budget_lib.check(cfg, resolve(cfg, 1, platform="cpu").tokens)
    print(json.dumps(numbers | {"max_passes": budget_lib.MAX_PASSES, "fits": fits}, indent=2))
    return 0 if fits else 1

  def build():
    from celerity_jax import distributed
    from celerity_jax.data.prepare import cache_root, prepare
    from celerity_jax.data.sources import builders

    cfg, _ = parse(argv)
    distributed.initialize(cfg.dist)  # N processes split the build (dist.* keys)
    primary = distributed.is_primary()
    process = builders(cache_root(cfg.data))
    prepared = prepare(cfg.data, cfg.model.vocab_size, cfg.run.progress and primary, None, process)
    if not primary:
      return
    out = {"tokenizer": prepared.tokenizer_path, "vocab_size": prepared.tokenizer.vocab_size}
    out["sources"] = {
      b.source.name: {
        "entry": str(b.entry),
        **{
          split: {k: s.meta[k] for k in ("n_tokens", "n_docs")}
          for split, s in (("train", b.train), ("eval", b.eval))
        },
      }
      for b in prepared.sources
    }
    print(json.dumps(out, indent=2))

  return run_cli(budget if "--budget" in argv else build)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
