"""Score a trained run on lm-evaluation-harness tasks with the celerity backend.

  python -m celerity_jax.commands.evaluate RUN_DIR --tasks paper [--limit N] [--step N]
      [--include-path DIR] [--batch-size 16] [--out results.json] [--samples]
  python -m celerity_jax.commands.evaluate --download --tasks paper [--include-path DIR]

--tasks: comma-separated TASK or TASK:SHOTS; `paper` is the Celerity paper's seven with its shot
counts (downstream/tasks.py). The model runs jitted and sharded on the run's mesh where it fits
this machine's devices (downstream/scorer.py). The results (lm-eval's own dict: metrics, configs,
versions, n-shot) go to --out (default RUN_DIR/eval/step-N.json) and a table to stdout; --samples
keeps every request's inputs and scores in it. --download only fetches the tasks' data into the
Hugging Face datasets cache, for a machine without network (run there with HF_DATASETS_OFFLINE=1).
Needs the `eval` extra (lm-eval). Exit status: 0, 2 a bad argument, run or task, 3 task data that
cannot be loaded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError


def check_installed(where: str):
  if importlib.util.find_spec("lm_eval") is None:
    raise ConfigError(
      f"{where}: lm-evaluation-harness is not installed (pip install lm-eval, or the project's "
      f"eval extra: pip install -e '.[eval]')"
    )


def evaluate(args) -> dict:
  from celerity_jax import storage
  from celerity_jax.downstream import tasks as tasks_lib

  check_installed("evaluate")
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
  if args.limit is not None and args.limit < 1:
    raise ConfigError(f"--limit {args.limit}: must be at least 1")
  if args.download:
    loaded = tasks_lib.load(args.tasks, args.include_path, download=True)
    names = sorted({t.config.task for t in loaded})
    print(f"celerity_jax: the data of {', '.join(names)} is in the datasets cache")
    return {"downloaded": names}
  if args.run_dir is None:
    raise ConfigError("evaluate: give RUN_DIR (or --download)")
  if not (storage.location(args.run_dir) / "checkpoints").exists():
    raise ConfigError(f"evaluate: {args.run_dir} has no checkpoints directory (is it a run.dir?)")
  from celerity_jax.downstream.lm import CelerityLM

  tasks = tasks_lib.load(args.tasks, args.include_path)  # before the model: a typo fails at once
  lm = CelerityLM.from_run(args.run_dir, args.step, batch_size=args.batch_size)
  start = time.perf_counter()
  results = tasks_lib.evaluate(lm, tasks, args.limit, log_samples=args.samples)
  seconds = time.perf_counter() - start
  out = storage.location(args.out or f"{args.run_dir}/eval/step-{lm.step}.json")
  results = {**results, "celerity_jax": {"run_dir": str(args.run_dir), "step": lm.step}}
  storage.make_dir(out.parent)
  storage.write_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
  scores = tasks_lib.scores(results)
  for key, value in scores.items():
    print(f"{key:40s} {value:.4f}")
  print(
    f"celerity_jax: {lm.requests_done:,} requests in {seconds:.1f} s "
    f"({lm.requests_done / max(seconds, 1e-9):.1f}/s); results in {out}",
    file=sys.stderr,
  )
  return {"step": lm.step, "scores": scores, "out": str(out)}


def main(argv):
  parser = ArgumentParser(
    prog="python -m celerity_jax.commands.evaluate", description=__doc__.splitlines()[0]
  )
  parser.add_argument("run_dir", nargs="?")
  parser.add_argument("--tasks", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--limit", type=int, default=None, help="examples per task (default all)")
  parser.add_argument("--include-path", default="", help="a directory of your own task YAMLs")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--out", default=None)
  parser.add_argument("--samples", action="store_true", help="keep every request's scores")
  parser.add_argument("--download", action="store_true", help="only fetch the tasks' data")
  args = parser.parse_args(argv)
  evaluate(args)


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
