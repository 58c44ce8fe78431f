"""Build (or find in the cache) the tokenizer and train/eval token stores of a recipe's data config.

  python -m celerity_jax.commands.tokenize recipe=celerity_tiny [data.paths=DIR,FILE,...] \
      [data.cache_dir=DIR]

Prints the cache entry, the tokenizer file and the token counts as JSON. Exit 2 on a config error,
3 on a data error (the message names the file).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
  from celerity_jax.cli import parse, run_cli
  from celerity_jax.data.prepare import prepare

  def build():
    cfg, _ = parse(argv)
    prepared = prepare(cfg.data, cfg.model.vocab_size, cfg.run.progress)
    print(
      json.dumps(
        {
          "entry": str(prepared.entry),
          "tokenizer": cfg.data.tokenizer or str(prepared.entry / "tokenizer.model"),
          "vocab_size": prepared.tokenizer.vocab_size,
          "train": {k: prepared.train.meta[k] for k in ("n_tokens", "n_docs")},
          "eval": {k: prepared.eval.meta[k] for k in ("n_tokens", "n_docs")},
        },
        indent=2,
      )
    )

  return run_cli(build)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
