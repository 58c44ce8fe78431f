"""Build (or find in the cache) the tokenizer and train/eval token stores of a recipe's data config.

  python -m tools.tokenize recipe=celerity_tiny [data.paths=DIR,FILE,...] [data.cache_dir=DIR]

Prints the cache entry, the tokenizer file and the token counts as JSON. Exit 2 on a config error,
3 on a data error (the message names the file).
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
  from celerity_jax.config import ConfigError
  from celerity_jax.data import DataError
  from celerity_jax.data.prepare import prepare
  from celerity_jax.main import parse
  try:
    cfg, _ = parse(argv)
    prepared = prepare(cfg.data, cfg.model.vocab_size, cfg.run.progress)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    return 3
  print(json.dumps({"entry": str(prepared.entry),
                    "tokenizer": str(prepared.entry / "tokenizer.model")
                    if not cfg.data.tokenizer else cfg.data.tokenizer,
                    "vocab_size": prepared.tokenizer.vocab_size,
                    "train": {k: prepared.train.meta[k] for k in ("n_tokens", "n_docs")},
                    "eval": {k: prepared.eval.meta[k] for k in ("n_tokens", "n_docs")}}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
