"""Downstream tasks scored during training (`downstream.tasks`, `downstream.every`): the live
params on the run's mesh, through the same lm-eval backend as the evaluate command, each task's
metrics logged in the step's row as `downstream/TASK/METRIC`.

The tasks (and their data) load before the run is accepted, so an unknown task or data missing
offline is refused before anything is written. Every process scores every request in step
(the mesh spans them all); process 0 alone logs.
"""

from __future__ import annotations

from celerity_jax.config import ConfigError


def make_downstream(cfg, training, tokenizer):
  """params -> {"downstream/TASK/METRIC": value}, or None when downstream.tasks is off."""
  d = cfg.downstream
  if not d.tasks:
    return None
  if not d.every:
    raise ConfigError(
      f"downstream.tasks={d.tasks}: set downstream.every (steps between evaluations)"
    )
  from celerity_jax.commands.evaluate import check_installed

  check_installed(f"downstream.tasks={d.tasks}")
  if tokenizer is None:
    raise ConfigError(
      f"downstream.tasks={d.tasks}: the run trains on synthetic tokens; there is no text to score"
    )
  from celerity_jax.downstream import tasks as tasks_lib
  from celerity_jax.downstream.lm import CelerityLM

  tasks = tasks_lib.load(d.tasks, d.include_path, "downstream.tasks")
  # the params are the live state's, given at each evaluation
  lm = CelerityLM(training.setup.graphdef, None, training.mesh, cfg.model, tokenizer, d.batch_size)

  def evaluate(params) -> dict:
    lm.scorer.params = params  # the jitted scorer takes them as an argument: no recompile
    results = tasks_lib.evaluate(lm, tasks, d.limit)
    return {f"downstream/{key}": value for key, value in tasks_lib.scores(results).items()}

  return evaluate
