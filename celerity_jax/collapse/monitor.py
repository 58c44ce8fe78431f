"""The collapse monitor, run inside the jitted train step (docs/method.md section 6).

Each step: smooth the loss (debiased EMA, time constant smooth_frac * T), flag a spike when the
smoothed loss exceeds spike_factor x its running minimum, and, with a reference curve l_ref(t):
accumulate the closed-form alignment sums S_LL = sum L^2, S_Ll = sum L l_ref over t in
[align_start, align_end], which fix L_hat(T) = S_LL / S_Ll once the window ends; from then on the
residual r = L / L_hat(T) - l_ref(t) and an alert after `patience` consecutive |r| > threshold.
The state is a few scalars in the train state (so it is checkpointed); nothing syncs with the host.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from celerity_jax.collapse import curves, surrogate
from celerity_jax.config import matched_keys


class MonitorSpec(NamedTuple):
  """Static settings and the reference curve (host arrays, baked into the jitted step)."""

  steps: int
  decay: float
  align_start: float
  align_end: float
  threshold: float
  patience: int
  spike_factor: float
  ref_t: np.ndarray | None  # None: no reference (spike checks only)
  ref_l: np.ndarray | None
  source: str  # "none", "surrogate" or the reference run's directory
  plan: tuple = ()  # the controls the surrogate's curve is for: the run's planned ones (plan_of)


def init_state() -> dict:
  f, i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  return {
    "ema_m": f,
    "ema_w": f,
    "min_smooth": jnp.full((), jnp.inf, jnp.float32),
    "s_ll": f,
    "s_lr": f,
    "over": i,
    "alert_steps": i,
    "spike_steps": i,
  }


def update(spec: MonitorSpec, state: dict, loss, step_done, finite) -> tuple[dict, dict]:
  """One step of the monitor: `loss` measured at the step that brings the count to `step_done`;
  a non-finite step leaves the state as it was."""
  loss = jnp.where(finite, loss, 0.0).astype(jnp.float32)
  m, w = curves.ema_step(state["ema_m"], state["ema_w"], loss, spec.decay)
  ema_m = jnp.where(finite, m, state["ema_m"])
  ema_w = jnp.where(finite, w, state["ema_w"])
  smooth = ema_m / jnp.maximum(ema_w, 1e-30)
  spike = finite & (smooth > spec.spike_factor * state["min_smooth"])
  new = dict(
    state,
    ema_m=ema_m,
    ema_w=ema_w,
    min_smooth=jnp.where(finite, jnp.minimum(state["min_smooth"], smooth), state["min_smooth"]),
    spike_steps=state["spike_steps"] + spike.astype(jnp.int32),
  )
  metrics = {"loss_smooth": smooth, "loss_spike": spike.astype(jnp.int32)}
  if spec.ref_t is None:
    return new, metrics

  t = jnp.asarray(step_done, jnp.float32) / spec.steps
  ref = jnp.interp(t, jnp.asarray(spec.ref_t, jnp.float32), jnp.asarray(spec.ref_l, jnp.float32))
  window = finite & (t >= spec.align_start) & (t <= spec.align_end)
  # S_LL and S_Ll of the alignment (stored as s_ll and s_lr: checkpoint keys, kept as they are)
  sum_smooth_sq = state["s_ll"] + jnp.where(window, smooth * smooth, 0.0)
  sum_smooth_ref = state["s_lr"] + jnp.where(window, smooth * ref, 0.0)
  active = (t > spec.align_end) & (sum_smooth_ref > 0)
  estimate = jnp.where(
    active, sum_smooth_sq / jnp.where(sum_smooth_ref > 0, sum_smooth_ref, 1.0), 0.0
  )
  residual = jnp.where(active, smooth / jnp.where(active, estimate, 1.0) - ref, 0.0)
  off = active & finite & (jnp.abs(residual) > spec.threshold)
  over = jnp.where(off, state["over"] + 1, jnp.where(finite, 0, state["over"]))
  alert = over >= spec.patience
  new.update(
    s_ll=sum_smooth_sq,
    s_lr=sum_smooth_ref,
    over=over,
    alert_steps=state["alert_steps"] + alert.astype(jnp.int32),
  )
  metrics.update(
    collapse_active=active.astype(jnp.int32),
    collapse_residual=residual,
    collapse_alert=alert.astype(jnp.int32),
    final_loss_estimate=estimate,
  )
  return new, metrics


def host_fields(values: dict) -> dict:
  """The metrics a log row carries: the reference-based ones only once alignment is done."""
  values = dict(values)
  if not values.pop("collapse_active", 0):
    for key in ("collapse_residual", "collapse_alert", "final_loss_estimate"):
      values.pop(key, None)
  return values


# Controls that must match for curves to collapse (docs/method.md section 5), with a relative
# tolerance; "tpp" is the effective TPP, so a mixture of experts compares as TPP * top_k / experts.
def _close(a, b, tol: float) -> bool:
  return a == b if isinstance(a, str) or isinstance(b, str) else math.isclose(a, b, rel_tol=tol)


def _show(value) -> str:
  return value if isinstance(value, str) else f"{value:.4g}"


def plan_of(cfg, resolved) -> dict:
  """The controls that shape a run's curve, as it is now (docs/method.md section 5)."""
  return {
    "steps": resolved.steps,
    "warmup_steps": resolved.warmup_steps,
    "schedule": cfg.optim.schedule,
    "tau": resolved.tau,
    "tpp": resolved.tpp_effective,
  }


def planned_by(described: dict) -> dict:
  """The planned controls a checkpoint's described config carries; one made before they were
  recorded (collapse_plan) planned what it was trained with."""
  if "collapse_plan" in described:
    return described["collapse_plan"]
  d = described["derived"]
  return {
    "steps": d["steps"],
    "warmup_steps": d["warmup_steps"],
    "schedule": described["config"]["optim"]["schedule"],
    "tau": d["tau"],
    "tpp": d.get("tpp_effective", d["tpp"]),
  }


def plan_note(spec: MonitorSpec, cfg, resolved) -> str:
  """The line a resume prints when the surrogate's curve is the planned run's, not that of the
  changed settings ("" when they agree or there is no surrogate reference)."""
  plan, now = dict(spec.plan), plan_of(cfg, resolved)
  if spec.source != "surrogate" or plan == now:
    return ""
  off = [k for k in plan if plan[k] != now[k]]
  return (
    "celerity_jax: the collapse monitor keeps the planned run's reference curve ("
    + ", ".join(f"{k} {_show(plan[k])}" for k in off)
    + "), not that of these settings ("
    + ", ".join(f"{k} {_show(now[k])}" for k in off)
    + ")"
  )


def build_spec(cfg, resolved, planned: dict | None = None) -> MonitorSpec:
  """The monitor for a run: reference curve per collapse.reference; warns on mismatched controls.
  `planned`: the controls the run started with (a resumed run's config.json, collapse_plan). The
  surrogate's curve stays theirs when a resume changed tau or B: the run is judged against the
  run that was planned (a restart at another B with lambda kept, the paper's incident, would
  otherwise move the reference with the fault)."""
  col = cfg.collapse
  steps = resolved.steps
  plan = planned or plan_of(cfg, resolved)
  t, ell, source = None, None, col.reference
  if col.reference == "surrogate":
    constants = surrogate.load_constants(col.surrogate)
    t, ell = surrogate.normalized_curve(
      plan["steps"],
      plan["warmup_steps"],
      plan["schedule"],
      plan["tau"],
      plan["tpp"],
      constants,
      col.smooth_frac,
    )
  elif col.reference != "none":
    ref = curves.load_run(col.reference, require_finished=True)
    t, ell = ref.t_hat, ref.normalized()
    # the keys whose Rule says a reference must share them (config.matched_keys), as run
    mine = {
      "optim.tau": resolved.tau,
      "scaling.tpp": resolved.tpp_effective,
      "scaling.warmup_frac": resolved.warmup_steps / steps,
      "collapse.smooth_frac": col.smooth_frac,
      "optim.schedule": cfg.optim.schedule,
    }
    theirs = {
      "optim.tau": ref.tau,
      "scaling.tpp": ref.tpp,
      "scaling.warmup_frac": ref.warmup / ref.steps,
      "collapse.smooth_frac": ref.smooth_frac,
      "optim.schedule": ref.schedule,
    }
    off = [
      f"{key.split('.')[1]} {_show(mine[key])} vs {_show(theirs[key])}"
      for key, tol in matched_keys().items()
      if not _close(mine[key], theirs[key], tol)
    ]
    if off:
      print(
        f"celerity_jax: warning: collapse.reference {col.reference} was trained with other "
        f"controls ({'; '.join(off)}); curves collapse only when they match",
        file=sys.stderr,
      )
  if t is not None and not ((t >= col.align_start) & (t <= col.align_end)).any():
    print(
      f"celerity_jax: warning: no reference point in the alignment window "
      f"[{col.align_start}, {col.align_end}]",
      file=sys.stderr,
    )
  return MonitorSpec(
    steps,
    curves.ema_decay(col.smooth_frac, 1.0 / steps),
    col.align_start,
    col.align_end,
    col.threshold,
    col.patience,
    col.spike_factor,
    None if t is None else np.asarray(t, np.float64),
    None if ell is None else np.asarray(ell, np.float64),
    source,
    tuple(plan.items()),
  )
