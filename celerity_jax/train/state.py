"""The train state (a pytree of plain dicts) and its sharded initialization."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from celerity_jax import sharding
from celerity_jax.collapse import monitor
from celerity_jax.models.decoder import Decoder
from celerity_jax.models.layers import map_variables
from celerity_jax.optim import ScheduledAdamW, make_optimizer


class TrainState(NamedTuple):
  step: jax.Array  # steps taken (batches consumed), skipped ones included
  params: dict  # pure-dict tree of float32 arrays (nnx.merge accepts it directly)
  opt_state: Any
  bad_steps: jax.Array  # consecutive non-finite steps so far
  skipped: jax.Array  # non-finite steps skipped in the whole run
  collapse: dict  # the collapse monitor's scalars (celerity_jax.collapse.monitor)


@dataclass(frozen=True)
class Setup:
  """Everything the step and loop need, derived once from (config, resolved, mesh)."""

  graphdef: Any
  optimizer: ScheduledAdamW
  state_shardings: TrainState
  init: Callable[[], TrainState]  # jitted; returns the state already sharded on the mesh
  start: Callable[[dict], TrainState]  # jitted; the state holding given (sharded) params

  def from_params(self, params: dict) -> TrainState:
    """A fresh state (step 0, a new optimizer) holding `params`: jax arrays (restored in their
    shards), or host arrays whole on every process, each placed in its shards here."""

    def place(a, sharding):
      if isinstance(a, jax.Array):
        return a
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return self.start(jax.tree.map(place, params, self.state_shardings.params))


def build(cfg, resolved, mesh: Mesh) -> Setup:
  def new_model():
    return Decoder(cfg.model, resolved.multipliers, nnx.Rngs(params=cfg.train.seed))

  graphdef, abstract = nnx.split(nnx.eval_shape(new_model))
  groups = map_variables(abstract, lambda v: v.get_metadata()["group"])
  optimizer = make_optimizer(cfg.optim, resolved, groups)

  def start_fn(params) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, optimizer.init(params), zero, zero, monitor.init_state())

  def init_fn() -> TrainState:
    return start_fn(nnx.to_pure_dict(nnx.state(new_model())))

  abstract_state = jax.eval_shape(init_fn)
  param_specs = sharding.param_specs(abstract, mesh)
  specs = TrainState(
    P(),
    param_specs,
    sharding.opt_state_specs(optimizer.tx, abstract_state.opt_state, param_specs),
    P(),
    P(),
    jax.tree.map(lambda _: P(), abstract_state.collapse),
  )
  shardings = sharding.named(mesh, specs)
  init = jax.jit(init_fn, out_shardings=shardings)
  start = jax.jit(start_fn, in_shardings=(shardings.params,), out_shardings=shardings)
  return Setup(graphdef, optimizer, shardings, init, start)


def abstract_state(setup: Setup) -> TrainState:
  """The state as sharded ShapeDtypeStructs: what restores and ahead-of-time compiles start from,
  with nothing allocated."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(setup.init),
    setup.state_shardings,
  )
