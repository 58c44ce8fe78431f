"""Data benchmark: tokenization per core and over processes, and the loader against training.

  python -m tools.bench_data recipe=celerity_tiny [--copies 6] [--steps 40] [--train-steps 4] \
      [--pod-recipe celerity_1b]

Tokenization: the recipe's corpus, `--copies` times over (a larger corpus amortizes starting the
worker processes, as a real one does), with a tokenizer trained once on it. Timed in one run:
the tokenizer library's own encode of the documents held in memory on one thread (the physical
limit of one core); the token-store build (data/shards.py: reading, encoding, the held-out split,
writing checksummed shards) with 1 worker process (goal >= 0.8 of that limit) and with 2 (goal
>= 1.8x one); and, for scale, a whole `prepare` with its default processes (listing and
fingerprinting the files, the build, opening and checking the stores).

Loader: the run's pipeline (grain window batches, data.threads reader threads, tensorstore reads
from the built store) timed over --steps batches, against (a) the recipe's own jitted step on this
machine and (b) what `--pod-recipe`'s step consumes per host on its TPU slice at the roofline bound
of its compiled step (celerity_jax.commands.aot: needs libtpu; a lower bound on step time, so an
upper bound on the tokens a host must feed). The loader reads that recipe's rows per host and
sequence length. Goal: >= 10x.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli


def main(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--copies", type=int, default=6)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--train-steps", type=int, default=4)
  parser.add_argument("--pod-recipe", default="celerity_1b")
  args, rest = parser.parse_known_args(argv)

  from celerity_jax.cli import parse
  from celerity_jax.data import corpus, shards
  from celerity_jax.data.prepare import prepare

  cfg, _ = parse(rest)
  files = corpus.stdlib_files() if not cfg.data.paths else corpus.resolve_paths(cfg.data.paths)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for k in range(args.copies):  # the same documents, in files of other names
      for i, f in enumerate(files):
        target = tmp / "corpus" / f"copy{k}" / f"{i:05d}{''.join(f.suffixes)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    data = dataclasses.replace(cfg.data, paths=str(tmp / "corpus"))
    t0 = time.perf_counter()
    prepared = prepare(dataclasses.replace(data, cache_dir=str(tmp / "c0")), cfg.model.vocab_size,
                       progress=False)  # fmt: skip
    out["fresh_build_s"] = round(time.perf_counter() - t0, 1)
    given = dataclasses.replace(data, tokenizer=prepared.tokenizer_path)
    docs = list(corpus.documents(corpus.resolve_paths(given.paths), given.text_field))
    text_mb = sum(len(d.encode("utf-8", "replace")) for d in docs) / 1e6
    t0 = time.perf_counter()
    for i in range(0, len(docs), 256):  # the build's batch (data/shards.py ENCODE_BATCH)
      prepared.tokenizer.encode(docs[i : i + 256], threads=1)
    encode_s = time.perf_counter() - t0
    del docs
    # the build itself (data/shards.py), without listing the files, fingerprinting them and
    # opening the finished stores, which prepare() adds once per start
    plan = shards.plan(corpus.resolve_paths(given.paths))
    job = {"tokenizer": prepared.tokenizer_path, "text_field": given.text_field}
    job["eval_frac"] = given.eval_frac
    seconds = {}
    for n in (1, 2):
      t0 = time.perf_counter()
      shards.build(str(tmp / f"c{n}"), plan, job, workers=n, progress=False)
      seconds[n] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare(dataclasses.replace(given, cache_dir=str(tmp / "c3")), cfg.model.vocab_size,
            progress=False)  # fmt: skip
    out["prepare_s"] = round(time.perf_counter() - t0, 1)
    out |= {
      "corpus_mb": round(text_mb, 1),
      "encode_1_thread_mb_per_s": round(text_mb / encode_s, 2),
      "build_1_process_mb_per_s": round(text_mb / seconds[1], 2),
      "build_2_processes_mb_per_s": round(text_mb / seconds[2], 2),
      "build_1_over_encode": round(encode_s / seconds[1], 2),
      "build_2_over_1": round(seconds[1] / seconds[2], 2),
    }
    store = prepared.sources[0].train
    out |= local_loader(cfg, store, args)
    if args.pod_recipe:
      out |= pod_loader(args.pod_recipe, store, args, cfg.data.threads)
  return out


def _loader_tokens_per_s(store, seq_len, global_batch, rows, steps, threads) -> float:
  from celerity_jax.data.pipeline import one_source, prefetch

  source = one_source(store, seq_len, global_batch, 0, rows=rows)
  t0 = time.perf_counter()
  for _ in prefetch(source.batch, 0, steps, threads):
    pass
  return steps * len(source.rows) * seq_len / (time.perf_counter() - t0)


def local_loader(cfg, store, args) -> dict:
  """The loader against the recipe's own step on this machine, on the same batches."""
  import jax

  from celerity_jax import sharding
  from celerity_jax.data.pipeline import one_source
  from celerity_jax.resolve import resolve
  from celerity_jax.train.step import prepare_training

  r = resolve(cfg, len(jax.devices()))
  loader = _loader_tokens_per_s(store, cfg.model.seq_len, r.batch_seqs, None, args.steps,
                                cfg.data.threads)  # fmt: skip
  training = prepare_training(cfg, r)
  source = one_source(store, cfg.model.seq_len, r.batch_seqs, 0)
  put = [
    sharding.place_batch(source.batch(s), training.mesh, r.batch_seqs)
    for s in range(args.train_steps + 1)
  ]
  step, state = training.train_step, training.setup.init()
  state, metrics = step(state, put[0])
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for b in put[1:]:
    state, metrics = step(state, b)
  jax.block_until_ready(metrics)
  train = args.train_steps * r.batch_tokens / (time.perf_counter() - t0)
  return {
    "loader_tokens_per_s": round(loader),
    "train_tokens_per_s": round(train),
    "loader_over_train": round(loader / train, 1),
  }


def pod_loader(name: str, store, args, threads: int) -> dict:
  """One host's loader at `name`'s rows per host and sequence length, against the tokens per
  second per host its step consumes on its slice at the compiled roofline bound."""
  from celerity_jax import recipes
  from celerity_jax.commands import aot_compile, tpu_chips

  recipe = recipes.get(name)
  cfg = recipes.configure(name, [])
  topology = tpu_chips.resolve_topology(recipe.slice)
  chip, devices = aot_compile.topology_devices(topology)
  rep = aot_compile.report(cfg, topology, devices=(chip, devices))
  hosts = len({d.process_index for d in devices})
  batch, seq_len = rep["recipe_shape"]["batch_seqs"], rep["recipe_shape"]["seq_len"]
  step_s = rep["bound"]["step_s"]
  need = batch * seq_len / step_s / hosts
  rows = range(batch // hosts)  # one host's rows
  loader = _loader_tokens_per_s(store, seq_len, batch, rows, args.steps, threads)
  return {
    "pod": f"{name} on {recipe.slice}: {hosts} hosts, B={batch} x {seq_len}, bound {step_s:.3f} s",
    "pod_host_needs_tokens_per_s": round(need),
    "pod_host_loader_tokens_per_s": round(loader),
    "pod_loader_over_need": round(loader / need, 1),
  }


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(main(sys.argv[1:]), indent=2))))
