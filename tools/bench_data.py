"""Data benchmark: tokenization MB/s, and loader tokens/s against the tokens/s training consumes.

  python -m tools.bench_data recipe=celerity_tiny [--steps 40] [--train-steps 4]

Tokenization is timed on a fresh build of the recipe's corpus (a temporary cache), then again with
that build's tokenizer given (a second empty cache: the store build alone, which is what grows with
the corpus), against the tokenizer library's own encode of the same documents held in memory, with
the same `data.threads` (the physical limit of this machine: goal >= 0.8 of it). The loader is the
run's pipeline (grain window batches, `data.threads` reader threads, tensorstore reads) timed over
--steps batches; training throughput is the recipe's jitted step timed in the same process on the
same batches, after compilation. Target: loader >= 20x training.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time

from celerity_jax.cli import ArgumentParser, run_cli


def main(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--train-steps", type=int, default=4)
  args, rest = parser.parse_known_args(argv)

  import jax

  from celerity_jax import sharding
  from celerity_jax.cli import parse
  from celerity_jax.data import corpus
  from celerity_jax.data.pipeline import WindowBatches, prefetch
  from celerity_jax.data.prepare import prepare
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  cfg, _ = parse(rest)
  files = corpus.stdlib_files() if not cfg.data.paths else corpus.resolve_paths(cfg.data.paths)
  megabytes = sum(corpus.size(f) for f in files) / 1e6
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as again:
    t0 = time.perf_counter()
    prepared = prepare(
      dataclasses.replace(cfg.data, cache_dir=cache), cfg.model.vocab_size, progress=False
    )
    build_s = time.perf_counter() - t0
    given = dataclasses.replace(
      cfg.data, cache_dir=again, tokenizer=str(prepared.entry / "tokenizer.model")
    )
    t0 = time.perf_counter()
    prepare(given, cfg.model.vocab_size, progress=False)
    stores_s = time.perf_counter() - t0
    docs = list(corpus.documents(files, cfg.data.text_field))
    text_mb = sum(len(d.encode("utf-8", "replace")) for d in docs) / 1e6
    t0 = time.perf_counter()
    for i in range(0, len(docs), 256):  # the build's batch (data/prepare.py ENCODE_BATCH)
      prepared.tokenizer.encode(docs[i : i + 256], threads=cfg.data.threads)
    encode_s = time.perf_counter() - t0
    resolved = resolve(cfg, len(jax.devices()))
    source = WindowBatches(
      prepared.train, cfg.model.seq_len, resolved.batch_seqs, 0, cfg.data.packing
    )
    t0 = time.perf_counter()
    batches = list(prefetch(source.batch, 0, args.steps, cfg.data.threads))
    loader_tps = args.steps * resolved.batch_tokens / (time.perf_counter() - t0)

    training = prepare_training(cfg, resolved)
    step, state = training.train_step, training.setup.init()
    put = [
      sharding.place_batch(b, training.mesh, resolved.batch_seqs)
      for b in batches[: args.train_steps + 1]
    ]
    state, metrics = step(state, put[0])
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for b in put[1:]:
      state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    train_tps = args.train_steps * resolved.batch_tokens / (time.perf_counter() - t0)
  return {
    "corpus_mb": round(megabytes, 1),
    "build_s": round(build_s, 1),
    "tokenize_mb_per_s": round(megabytes / build_s, 2),
    "stores_s": round(stores_s, 1),
    "encode_only_s": round(encode_s, 1),
    "stores_mb_per_s": round(text_mb / stores_s, 2),
    "encode_only_mb_per_s": round(text_mb / encode_s, 2),
    "stores_over_encode": round(encode_s / stores_s, 2),
    "train_tokens": prepared.train.n_tokens,
    "threads": cfg.data.threads,
    "loader_tokens_per_s": round(loader_tps),
    "train_tokens_per_s": round(train_tps),
    "loader_over_train": round(loader_tps / train_tps, 1),
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(main(sys.argv[1:])))))
