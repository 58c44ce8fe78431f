"""The held-out loss a run logs: fixed batches of each source, compiled before the first step."""

from __future__ import annotations

from celerity_jax import sharding
from celerity_jax.train.state import abstract_state
from celerity_jax.train.step import Training, make_eval_step


def make_evaluator(cfg, training: Training, held_out: dict | None, weights: dict):
  """params -> {"eval_loss": ...}: mean held-out cross-entropy over data.eval_batches fixed batches
  of each source, and with several sources each one's (eval_loss/NAME) and their mean by weight;
  None without held-out data (train.eval_every=0)."""
  if held_out is None or not cfg.data.eval_batches:
    return None
  n_rows = training.resolved.batch_seqs
  eval_step = make_eval_step(training.setup, cfg, training.resolved, training.mesh)
  batches = {
    name: [
      sharding.place_batch(source.batch(i), training.mesh, n_rows)
      for i in range(cfg.data.eval_batches)
    ]
    for name, source in held_out.items()
  }
  # compiled now, not at the first evaluation: that would stall training mid-run for the compile
  # (2-3% of the default run's loop) and surface an eval-only error only after steps were spent
  first = next(iter(batches.values()))[0]
  compiled = eval_step.lower(abstract_state(training.setup).params, first).compile()

  def evaluate(params) -> dict:
    losses = {
      name: sum(float(compiled(params, b)) for b in parts) / len(parts)
      for name, parts in batches.items()
    }
    if len(losses) == 1:
      return {"eval_loss": next(iter(losses.values()))}
    mean = sum(weights[name] * loss for name, loss in losses.items())
    return {"eval_loss": mean} | {f"eval_loss/{name}": loss for name, loss in losses.items()}

  return evaluate
