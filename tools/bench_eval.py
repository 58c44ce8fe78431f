"""Downstream evaluation benchmark: the celerity lm-eval backend against lm-eval's own Hugging Face
backend, on the same exported model and task, in one run.

  python -m tools.bench_eval RUN_DIR [--questions 200] [--choices 4] [--batch-size 16]

RUN_DIR: a trained text run (README command 1 writes runs/celerity_tiny). The task is a local
multiple-choice task built from the Python standard library's source (the default corpus): each
question is 48 words of a file, its right answer the next 6 words, the wrong ones 6 words from
elsewhere; lm-eval turns each question into `--choices` log-likelihood requests. Both backends
answer every request once to compile or warm up, then once timed, at the same batch size;
reported: requests/s of each end to end (lm-eval's own work included) and in the model's scoring
alone, their ratios, the largest per-request difference, and the accuracies (which must agree).
Needs the test extra (lm-eval, torch, transformers, accelerate).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from celerity_jax.cli import ArgumentParser, run_cli


def write_task(root: Path, questions: int, choices: int, seed: int = 0) -> Path:
  from celerity_jax.data import corpus

  rng = random.Random(seed)
  words = []
  for path in corpus.stdlib_files()[:400]:
    words += path.read_text(errors="replace").split()
  rows = []
  for _ in range(questions):
    at = rng.randrange(0, len(words) - 60)
    right = " " + " ".join(words[at + 48 : at + 54])
    wrong = []
    for _ in range(choices - 1):
      other = rng.randrange(0, len(words) - 10)
      wrong.append(" " + " ".join(words[other : other + 6]))
    answer = rng.randrange(choices)
    options = wrong[:answer] + [right] + wrong[answer:]
    rows.append({"question": " ".join(words[at : at + 48]), "choices": options, "answer": answer})
  data = root / "bench_mc.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "bench_mc.yaml").write_text(
    "task: bench_mc\ndataset_path: json\n"
    f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    "test_split: test\noutput_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
    "metric_list:\n  - metric: acc\n"
  )
  return root


def timed(lm, include: str) -> tuple[float, float, dict]:
  """(seconds end to end, seconds in the model's scoring, results) of the timed pass."""
  from celerity_jax.downstream import tasks as tasks_lib

  tasks_lib.evaluate(lm, tasks_lib.load("bench_mc", include))  # compiles (ours) / warms up
  tasks = tasks_lib.load("bench_mc", include)
  scoring, inner = [0.0], lm._loglikelihood_tokens

  def clocked(*args, **kwargs):
    start = time.perf_counter()
    try:
      return inner(*args, **kwargs)
    finally:
      scoring[0] += time.perf_counter() - start

  lm._loglikelihood_tokens = clocked
  start = time.perf_counter()
  results = tasks_lib.evaluate(lm, tasks, log_samples=True)
  return time.perf_counter() - start, scoring[0], results


def main(argv: list[str]) -> dict:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir")
  parser.add_argument("--questions", type=int, default=200)
  parser.add_argument("--choices", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=16)
  args = parser.parse_args(argv)

  from lm_eval.models.huggingface import HFLM

  from celerity_jax.commands.export import export
  from celerity_jax.downstream.lm import CelerityLM

  with tempfile.TemporaryDirectory() as tmp:
    include = str(write_task(Path(tmp), args.questions, args.choices))
    export(args.run_dir, None, Path(tmp) / "hf", "hf")
    ours = CelerityLM.from_run(args.run_dir, batch_size=args.batch_size)
    ours_s, ours_scoring, ours_results = timed(ours, include)
    theirs = HFLM(
      pretrained=str(Path(tmp) / "hf"),
      trust_remote_code=True,
      dtype="float32",
      batch_size=args.batch_size,
      device="cpu",
    )
    theirs_s, theirs_scoring, theirs_results = timed(theirs, include)

  def resps(results):
    samples = sorted(results["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in samples for r in s["resps"]]

  a, b = resps(ours_results), resps(theirs_results)
  requests = len(a)
  out = {
    "requests": requests,
    "batch_size": args.batch_size,
    "celerity_requests_per_s": requests / ours_s,
    "hf_requests_per_s": requests / theirs_s,
    "ratio": theirs_s / ours_s,
    "celerity_scoring_requests_per_s": requests / ours_scoring,
    "hf_scoring_requests_per_s": requests / theirs_scoring,
    "scoring_ratio": theirs_scoring / ours_scoring,
    "max_abs_loglik_diff": max(abs(x - y) for x, y in zip(a, b, strict=True)),
    "acc_celerity": ours_results["results"]["bench_mc"]["acc,none"],
    "acc_hf": theirs_results["results"]["bench_mc"]["acc,none"],
  }
  return out


if __name__ == "__main__":
  sys.exit(run_cli(lambda: print(json.dumps(main(sys.argv[1:]), indent=2))))
