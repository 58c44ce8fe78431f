"""optax AdamW with per-group LR multipliers, a weight-decay mask, lambda from tau, and schedules.

The update of a parameter in group g at step t is
    theta <- theta - s(t) * eta_g * (adam(grad) + lambda * mask_g * theta)
which is `optax.adamw(eta_g * s(t), weight_decay=lambda, mask=mask_g)` per group (coupled decay,
docs/method.md section 1), built from the same optax pieces so one Adam state covers every group;
s(t) is applied at the train state's step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from celerity_jax.parametrization import DECAYED_GROUPS


def schedule(kind: str, warmup: int, steps: int) -> Callable[[jax.Array], jax.Array]:
  """LR factor in [0, 1] at step t: linear warmup to 1 over `warmup` steps, then `kind` decay that
  reaches exactly 0 at t = steps (linear = D2Z, cosine) or stays at 1 (constant)."""

  def factor(t):
    t = jnp.asarray(t, jnp.float32)
    warm = (t + 1.0) / max(warmup, 1)
    progress = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
    if kind == "linear":
      after = 1.0 - progress
    elif kind == "cosine":
      after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == "constant":
      after = jnp.ones_like(progress)
    else:
      raise ValueError(f"unknown schedule {kind!r}")
    return jnp.where(t < warmup, warm, after)

  return factor


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf float (the group's peak LR)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


@dataclass(frozen=True)
class ScheduledAdamW:
  """AdamW whose schedule is read at the train state's step, not an optimizer counter, so a
  skipped (non-finite) step leaves the optimizer state untouched while data and schedule move on
  together."""

  tx: optax.GradientTransformation  # clipped adam -> decay -> group peak LRs (no schedule)
  factor: Callable  # step -> schedule factor in [0, 1]
  eta_hidden: float

  def init(self, params):
    return self.tx.init(params)

  def update(self, grads, opt_state, params, step):
    direction, opt_state = self.tx.update(grads, opt_state, params)
    scale = -self.factor(step)
    return jax.tree.map(lambda d: scale * d, direction), opt_state

  def lr(self, step):
    """The hidden-matrix LR at `step`: the one tau is defined by."""
    return self.eta_hidden * self.factor(step)


def clipped_adam(optim_cfg) -> optax.GradientTransformation:
  """Adam on the gradient clipped to optim.clip_norm (0 = off). One transform whose state is
  Adam's alone, so turning the clip on or off on resume restores the same optimizer state."""
  adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  clip = optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else None

  def update(grads, state, params=None):
    if clip is not None:
      grads, _ = clip.update(grads, clip.init(grads))
    return adam.update(grads, state, params)

  return optax.GradientTransformation(adam.init, update)


def decay_by_tree(lam_tree) -> optax.GradientTransformation:
  """updates + lambda_leaf * params with a lambda per leaf (0 = not decayed); its state is
  optax.add_decayed_weights' (empty), so a checkpoint fits either."""

  def update(updates, state, params=None):
    out = jax.tree.map(lambda u, p, lam: u + lam * p if lam else u, updates, params, lam_tree)
    return out, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, resolved, groups) -> ScheduledAdamW:
  """`groups` is a pure-dict tree of group names matching the params."""
  peak_tree = jax.tree.map(lambda g: resolved.lr_peak[g], groups)
  decay_mask = jax.tree.map(lambda g: g in DECAYED_GROUPS, groups)
  lam = resolved.weight_decay_groups
  if len({lam[g] for g in DECAYED_GROUPS if g in lam}) <= 1:  # one lambda (optim.tau_groups=hidden)
    decay = optax.add_decayed_weights(resolved.weight_decay, mask=decay_mask)
  else:
    decay = decay_by_tree(jax.tree.map(lambda g: lam.get(g, 0.0), groups))
  parts = [clipped_adam(optim_cfg), decay, scale_by_tree(peak_tree)]
  return ScheduledAdamW(
    optax.chain(*parts),
    schedule(optim_cfg.schedule, resolved.warmup_steps, resolved.steps),
    resolved.eta_hidden,
  )
