"""Which lm-evaluation-harness tasks a model is scored on, and the scoring itself.

`--tasks` (and `downstream.tasks`) is a comma-separated list of TASK or TASK:SHOTS; `paper` is the
Celerity paper's seven, with its shot counts (arc-challenge 25-shot, arc-easy, boolq, hellaswag
10-shot, piqa, siqa, winogrande 5-shot). Task data comes through Hugging Face `datasets`, which
caches it (HF_HOME); on a machine without network, download it ahead with
`python -m celerity_jax.commands.evaluate --download --tasks paper` and run with
HF_DATASETS_OFFLINE=1 (docs/evaluation.md). Tasks of your own are YAML files in --include-path.
"""

from __future__ import annotations

import difflib
import functools
import logging

from celerity_jax.config import ConfigError
from celerity_jax.data import DataError

PAPER = (
  ("arc_challenge", 25),
  ("arc_easy", 0),
  ("boolq", 0),
  ("hellaswag", 10),
  ("piqa", 0),
  ("siqa", 0),
  ("winogrande", 5),
)
FEWSHOT_SEED = 1234  # lm-eval's own default: the same few-shot examples as its CLI picks


def parse(spec: str, where: str) -> dict[str, int | None]:
  """{task: shots (None: the task's own default)} from "paper" or "TASK[:SHOTS],..."."""
  out: dict[str, int | None] = {}
  for item in (s.strip() for s in spec.split(",")):
    if item == "paper":
      out |= dict(PAPER)
      continue
    name, _, shots = item.partition(":")
    if not name:
      raise ConfigError(f"{where}={spec!r}: an empty task name")
    if shots and not (shots.isdigit()):
      raise ConfigError(f"{where}={spec!r}: {item!r}: shots must be a whole number (TASK:SHOTS)")
    out[name] = int(shots) if shots else None
  if not out:
    raise ConfigError(f"{where}: name at least one task (or 'paper')")
  return out


@functools.cache
def manager(include_path: str = ""):
  """lm-eval's task index (built once per process: it reads every task YAML it ships)."""
  import datasets
  from lm_eval.tasks import TaskManager

  for name in ("lm_eval", "huggingface_hub"):  # their chatter and retries; errors still raise
    logging.getLogger(name).setLevel(logging.ERROR)
  datasets.disable_progress_bars()
  return TaskManager(include_path=include_path or None)


def load(spec: str, include_path: str = "", where: str = "--tasks", download: bool = False) -> list:
  """The lm-eval Task objects, their few-shot counts set; ConfigError naming an unknown task,
  DataError when a task's data cannot be loaded (offline and not downloaded)."""
  wanted = parse(spec, where)
  tm = manager(include_path)
  for name in wanted:
    if name not in tm.all_tasks:
      close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.6)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      where_more = f" or in {include_path}" if include_path else " (add --include-path DIR)"
      raise ConfigError(f"{where}: unknown task {name!r}: not an lm-eval task{where_more}{hint}")
  tasks = []
  for name, shots in wanted.items():
    try:
      found = tm.load([name])["tasks"]
    except Exception as e:  # datasets' own errors: offline, missing files, a bad data file
      message = " ".join(str(e).split())[:300]
      hint = (
        "is the Hugging Face Hub reachable from here?"
        if download
        else "without network, download it first: python -m celerity_jax.commands.evaluate "
        f"--download --tasks {name}"
      )
      raise DataError(
        f"task {name}: its data could not be loaded ({type(e).__name__}: {message}); {hint}"
      ) from None
    for task in found.values():
      if shots is not None:
        task.set_config(key="num_fewshot", value=shots)
      task.set_fewshot_seed(seed=FEWSHOT_SEED)
      tasks.append(task)
  return tasks


def evaluate(lm, tasks: list, limit: int | None = None, log_samples: bool = False) -> dict:
  """lm-eval's results dict for `lm` on `tasks` (each task's metrics under results[TASK])."""
  from lm_eval import simple_evaluate

  return simple_evaluate(
    model=lm,
    tasks=tasks,
    limit=limit or None,
    log_samples=log_samples,
    task_manager=manager(),
    fewshot_random_seed=FEWSHOT_SEED,
    verbosity="ERROR",
  )


def scores(results: dict) -> dict[str, float]:
  """{"TASK/METRIC": value} of a results dict: each task's metrics, without their stderr."""
  out = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      metric = key.split(",")[0]
      if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "alias":
        out[f"{task}/{metric}"] = float(value)
  return out
