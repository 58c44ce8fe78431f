"""The jitted train step: loss, gradients (accumulated over microbatches), AdamW update, metrics.

Everything a log row needs is computed here, on device, and fetched by the loop one step late.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from celerity_jax import sharding
from celerity_jax.collapse import monitor
from celerity_jax.models.layers import Forward
from celerity_jax.resolve import Resolved
from celerity_jax.train import state as state_lib
from celerity_jax.train.state import Setup, TrainState


def cross_entropy(logits_BxLxV, targets_BxL, z_coef: float):
  """Mean token cross-entropy and the mean z-loss term z_coef * logsumexp^2 (float32)."""
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  # the target's logit by a one-hot select, not a gather: its gradient is then elementwise and
  # fuses with the softmax's (a gather's is a scatter), and a vocab split over devices only sums
  vocab_BxLxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, 2)
  target_logit_BxL = jnp.where(vocab_BxLxV == targets_BxL[..., None], logits_BxLxV, 0.0).sum(-1)
  return (lse_BxL - target_logit_BxL).mean(), z_coef * jnp.square(lse_BxL).mean()


def forward_on(resolved: Resolved, cfg, mesh: Mesh | None) -> Forward:
  """The plan's forward pass, sharded on `mesh` (None: one device's own rows, in shard_map)."""
  where = {"mesh": mesh, "constrain": sharding.make_constrain(mesh)} if mesh is not None else {}
  return Forward(resolved.attention, cfg.model.attention_block, resolved.scan_layers, **where)


def make_loss_fn(setup: Setup, cfg, forward: Forward):
  """loss_fn(params, batch) -> (objective, aux). The objective adds to the cross-entropy the logit
  z-loss and, for a mixture of experts, the weighted load-balancing and router z-losses; aux holds
  `ce`, `z` and the MoE statistics (models/moe.moe_summary). `forward` says how the model runs
  and on which mesh (forward_on)."""
  model_cfg = cfg.model

  def loss_fn(params, batch):
    model = nnx.merge(setup.graphdef, params)
    logits, extra = model(batch["inputs"], batch.get("segment_ids"), forward)
    ce, z = cross_entropy(logits, batch["targets"], model_cfg.z_loss)
    aux, objective = {"ce": ce, "z": z}, ce + z
    if "moe" in extra:
      aux.update({f"moe_{k}": v for k, v in extra["moe"].items()})
      objective = (
        objective
        + model_cfg.aux_loss * aux.get("moe_balance", 0.0)
        + (model_cfg.router_z_loss * aux.get("moe_router_z", 0.0))
      )
    return objective, aux

  return loss_fn


def split_microbatches(batch, micro: int, mesh: Mesh):
  """[micro, rows / micro, ...] per key: row i*micro + j goes to microbatch j, so each device keeps
  its own rows (no reshard)."""

  def split(x):
    x = x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)
    if mesh is None:  # one device's own rows (inside shard_map)
      return x
    spec = P(None, *sharding.logical_spec(("batch", "length")))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(split, batch)


def _accumulate(loss_fn, params, batch, micro: int, mesh: Mesh):
  """Mean gradient (and mean aux) over `micro` equal microbatches via lax.scan: equals the
  full-batch gradient. Returns (aux, grads)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro == 1:
    (_, aux), grads = grad_fn(params, batch)
    return aux, grads

  def body(carry, mb):
    (_, aux), grads = grad_fn(params, mb)
    return jax.tree.map(jnp.add, carry, (aux, grads)), None

  microbatches = split_microbatches(batch, micro, mesh)
  (_, aux_shapes), _ = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], microbatches))
  zeros = (
    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes),
    jax.tree.map(jnp.zeros_like, params),
  )
  total, _ = jax.lax.scan(body, zeros, microbatches)
  return jax.tree.map(lambda x: x / micro, total)


def _accumulate_per_device(local_loss_fn, params, batch, micro: int, mesh: Mesh):
  """_accumulate for a mesh that only splits the batch (Resolved.accumulate_per_device): inside
  shard_map each device sums its own rows' gradients over its microbatches and the devices average
  once. Under jit's sharding the accumulator is replicated, so XLA all-reduces every microbatch's
  gradient inside the loop (20% of the default CPU step's device time, over 83 microbatches). The
  same mean, summed in another order."""
  axes = sharding.RULES["batch"]

  def local(params, batch):
    return jax.lax.pmean(_accumulate(local_loss_fn, params, batch, micro, None), axes)

  rows = sharding.batch_sharding(mesh).spec
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), rows), out_specs=P(), check_vma=False)(
    params, batch
  )


def make_train_step(
  setup: Setup, cfg, resolved: Resolved, mesh: Mesh, monitor_spec: monitor.MonitorSpec | None
):
  """Returns step(state, batch) -> (state, metrics), jitted with in/out shardings on `mesh` and the
  state donated; `monitor_spec` None leaves the collapse monitor out (for overhead benchmarks).
  As `resolved` plans: the batch's gradient is accumulated over its microbatches (per device or
  under jit's sharding), and the schedule and the monitor read step + its step_offset."""
  loss_fn = make_loss_fn(setup, cfg, forward_on(resolved, cfg, mesh))
  microbatches, step_offset = resolved.microbatches, resolved.step_offset
  per_device = resolved.accumulate_per_device
  local_loss_fn = make_loss_fn(setup, cfg, forward_on(resolved, cfg, None)) if per_device else None

  def train_step(state: TrainState, batch):
    if per_device:
      aux, grads = _accumulate_per_device(local_loss_fn, state.params, batch, microbatches, mesh)
    else:
      aux, grads = _accumulate(loss_fn, state.params, batch, microbatches, mesh)
    ce, z = aux.pop("ce"), aux.pop("z")
    at = state.step + step_offset if step_offset else state.step  # the schedule's step
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params, at)
    params = optax.apply_updates(state.params, updates)
    if cfg.optim.master_weights == "bfloat16":  # round as bf16 storage would (f32 arrays kept)
      params = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype), params)
    grad_norm = optax.tree.norm(grads)
    # a non-finite loss or gradient leaves params and optimizer state as they were (no host sync);
    # the loop reads the counters one step late and halts per train.on_nonfinite
    finite = jnp.isfinite(ce) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    bad = jnp.where(finite, 0, state.bad_steps + 1)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    collapse, collapse_metrics = state.collapse, {}
    if monitor_spec is not None:
      collapse, collapse_metrics = monitor.update(monitor_spec, state.collapse, ce, at + 1, finite)
    metrics = {
      "loss": ce,
      "z_loss": z,
      "grad_norm": grad_norm,
      "update_norm": optax.tree.norm(updates),
      "param_norm": optax.tree.norm(params),
      "lr": setup.optimizer.lr(at),
      "nonfinite": (~finite).astype(jnp.int32),
      "bad_steps": bad,
      "skipped_steps": skipped,
      **collapse_metrics,
      **aux,
    }
    return TrainState(state.step + 1, params, opt_state, bad, skipped, collapse), metrics

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    train_step,
    in_shardings=(setup.state_shardings, batch_sharding),
    out_shardings=(setup.state_shardings, replicated),
    donate_argnums=0,
  )


def make_eval_step(setup: Setup, cfg, resolved: Resolved, mesh: Mesh):
  """Returns eval(params, batch) -> mean token cross-entropy, jitted with the train shardings;
  the forward runs over the train step's microbatches (equal sizes: the mean of their means)."""
  loss_fn = make_loss_fn(setup, cfg, forward_on(resolved, cfg, mesh))
  microbatches = resolved.microbatches

  def eval_step(params, batch):
    if microbatches == 1:
      return loss_fn(params, batch)[1]["ce"]
    parts = split_microbatches(batch, microbatches, mesh)
    return jax.lax.map(lambda mb: loss_fn(params, mb)[1]["ce"], parts).mean()

  return jax.jit(
    eval_step,
    in_shardings=(setup.state_shardings.params, sharding.batch_sharding(mesh)),
    out_shardings=NamedSharding(mesh, P()),
  )


class Training(NamedTuple):
  mesh: Mesh
  resolved: Resolved
  setup: Setup
  train_step: Callable
  monitor: monitor.MonitorSpec


def prepare_training(
  cfg, resolved: Resolved, devices=None, with_monitor: bool = True, planned: dict | None = None
) -> Training:
  """Mesh over `devices` (default all; `resolved` was resolved for as many, of their platform),
  sharded setup, the collapse monitor and the jitted step (`with_monitor=False` compiles it
  without the monitor). Changes neither the config nor the plan."""
  devices = list(jax.devices() if devices is None else devices)
  platform = devices[0].platform  # (a TPU topology's devices when compiling ahead)
  if platform != resolved.platform:
    raise ValueError(f"resolved for {resolved.platform}, run on {platform}: resolve(platform=...)")
  mesh = sharding.make_mesh(cfg.mesh, devices)
  setup = state_lib.build(cfg, resolved, mesh)
  spec = monitor.build_spec(cfg, resolved, planned)
  step = make_train_step(setup, cfg, resolved, mesh, spec if with_monitor else None)
  return Training(mesh, resolved, setup, step, spec)
