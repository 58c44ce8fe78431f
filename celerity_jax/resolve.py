"""Derives every run quantity from a config once: N, D, TPP, B, T, warmup, eta per group, lambda,
tau, and how the step executes on the run's platform (execution.py: the attention path, scanned
layers, microbatches and where they are summed).

These are printed by `--print-config`, written to `run.dir/config.json` and used by the trainer;
nothing downstream recomputes them. Each entry point resolves once and passes the result on.

The batch B is part of a run's trajectory: a resumed run keeps its checkpoint's B (`Position`)
rather than rounding the batch law again for another data-parallel size, so a checkpoint restores
onto any mesh whose data-parallel size divides it.

A run's progress is counted in sequences, not steps: where a resume changes B (allowed with
checkpoint.allow_config_change), the schedule, the data and the tokens seen continue from the
sequences the checkpoint consumed, so t = tokens / D moves on without a jump and the run still ends
after D tokens. `step_offset` and `row_offset` carry that: step k of the resumed run sits at
schedule step k + step_offset and reads global rows from k * B + row_offset on. Both are 0 for a
run that kept its batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from celerity_jax import execution, scaling
from celerity_jax.config import Config, ConfigError, to_dict
from celerity_jax.parametrization import DECAYED_GROUPS, Multipliers, multipliers


@dataclass(frozen=True)
class Position:
  """Where a checkpoint left off: steps taken, sequences consumed, and its batch in sequences."""

  step: int
  rows: int
  batch_seqs: int


# Derived values a resumed run may change: they follow from free keys (the mesh, stops, the
# platform's execution choices) or from the checkpoint's position (Position), never the trajectory.
FREE_DERIVED = (
  "stop_step",
  "data_parallel",
  "microbatches",
  "batch_seqs_law",
  "step_offset",
  "row_offset",
  "platform",
  "attention",
  "scan_layers",
  "accumulate_per_device",
)


# Derived values that restate others the trajectory compares (optim.tau_groups, lambda, the LRs):
# left out of it, so checkpoints made before they existed still resume
RESTATED_DERIVED = ("weight_decay_groups",)


@dataclass(frozen=True)
class Resolved:
  n_params: int  # every parameter
  n_active: int  # parameters one token uses (= n_params for a dense model)
  n_embedding: int
  n_non_embedding: int
  tpp: float  # tokens per active parameter
  tpp_effective: float  # what sets tau_opt and the collapse shape (scaling.effective_tpp)
  tokens: float  # D = TPP * N_active
  data_parallel: int
  microbatches: int  # gradient accumulation steps (train.microbatches or from rows; on CPU split
  #   further so each fits the cache: execution.cache_split)
  batch_seqs_law: float  # B in sequences before rounding (train.batch_size when fixed)
  batch_seqs: int
  batch_tokens: int  # B
  steps: int  # T = D / B: the schedule horizon
  warmup_steps: int
  stop_step: int  # where this run ends (stop_frac / stop_step)
  step_offset: float  # schedule step minus steps taken (a resume that changed B; else 0)
  row_offset: int  # global rows read before step 0 at this B (rows = step * B + row_offset)
  lr_peak: dict  # group -> peak LR (eta_base x group multiplier)
  eta_hidden: float  # the LR that defines tau
  weight_decay: float  # lambda (coupled, as optax.adamw) of the hidden matrices
  weight_decay_groups: dict  # group -> lambda; 0 = not decayed (optim.tau_groups)
  tau: float  # B / (eta_hidden * lambda * D)
  tau_opt: float  # c * TPP_effective**m
  tau_groups: dict  # group -> 1 / (eta_group * lambda * T); None = not decayed
  flops_per_token: float  # 6N + causal attention (MaxText convention)
  flops_per_token_full_attn: float
  multipliers: Multipliers
  platform: str  # what the plan below is for: cpu, gpu or tpu
  attention: str  # the attention path (execution.attention_path)
  scan_layers: bool  # layers under lax.scan, else unrolled (execution.scan_layers)
  accumulate_per_device: bool  # microbatch gradients summed per device (execution)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def describe(cfg: Config, resolved: Resolved, data_fingerprint: dict | None = None) -> dict:
  """The resolved config: what a user chose plus every derived quantity (config.json, checkpoint
  metadata and `--print-config` all hold this), and, for a run, the fingerprint of its data."""
  described = {"config": to_dict(cfg), "derived": resolved.as_dict()}
  if data_fingerprint is not None:
    described["data_fingerprint"] = data_fingerprint
  return described


def _cpu_hint(n_devices: int) -> str:
  import jax

  if n_devices > 1 and jax.default_backend() == "cpu":
    return f" ({n_devices} CPU devices: one per core; JAX_NUM_CPU_DEVICES=N sets N)"
  return ""


def resolve(
  cfg: Config, n_devices: int = 1, resume: Position | None = None, platform: str = ""
) -> Resolved:
  """Every derived quantity for `cfg` on `n_devices` devices of `platform` ("": jax's default
  backend; the aot command plans for a TPU topology from a CPU machine). `resume`, the checkpoint
  a run resumes from: its B replaces the batch law's rounding (a fixed `train.batch_size` takes
  precedence), and its sequences consumed place the schedule and the data."""
  if not platform:
    import jax

    platform = jax.default_backend()
  kept_batch = resume.batch_seqs if resume is not None else None
  from celerity_jax.sharding import data_parallel_size, mesh_shape

  sc, tr, opt, model = cfg.scaling, cfg.train, cfg.optim, cfg.model
  counts = scaling.param_counts(model)
  n = counts["active"]
  d_tokens = sc.tpp * n
  mesh_sizes = mesh_shape(cfg.mesh, n_devices)
  dp = data_parallel_size(mesh_sizes)
  # every device gets whole sequences in every microbatch
  granule = dp * (tr.microbatch_rows or tr.microbatches)
  per = (
    f"train.microbatch_rows {tr.microbatch_rows}"
    if tr.microbatch_rows
    else f"train.microbatches {tr.microbatches}"
  )
  law = (
    tr.batch_size
    or scaling.batch_tokens(d_tokens, sc.batch_coef, sc.batch_exp, sc.batch_anchor) / model.seq_len
  )
  if tr.batch_size:
    if tr.batch_size % granule:
      raise ConfigError(
        f"train.batch_size={tr.batch_size} must be a multiple of data-parallel size "
        f"{dp} x {per} = {granule}{_cpu_hint(n_devices)}"
      )
    batch_seqs = tr.batch_size
  elif kept_batch:
    if kept_batch % granule:
      raise ConfigError(
        f"the checkpoint's batch of {kept_batch} sequences does not split over "
        f"data-parallel size {dp} x {per} = {granule}; resume on a mesh whose "
        f"data-parallel size (mesh data x fsdp x expert) divides it{_cpu_hint(n_devices)}"
      )
    batch_seqs = kept_batch
  else:
    batch_seqs = scaling.round_batch(law, granule)
  microbatches = batch_seqs // granule if tr.microbatch_rows else tr.microbatches
  rows = batch_seqs // (dp * microbatches)  # per device per microbatch
  microbatches *= execution.cache_split(model, tr.cpu_microbatch_tokens, rows, platform)
  b_tokens = batch_seqs * model.seq_len
  steps = scaling.total_steps(d_tokens, b_tokens)
  warmup = scaling.warmup_steps(d_tokens, b_tokens, sc.warmup_frac, sc.warmup_max_tokens)
  if warmup >= steps:
    raise ConfigError(
      f"warmup of {warmup} steps is not shorter than T={steps} steps; "
      f"lower scaling.warmup_frac or raise scaling.tpp"
    )
  row_offset, step_offset = 0, 0.0
  if resume is not None and resume.rows != resume.step * batch_seqs:
    row_offset = resume.rows - resume.step * batch_seqs
    step_offset = resume.rows / batch_seqs - resume.step
  stop = math.ceil(tr.stop_frac * steps - step_offset)
  if tr.stop_step:
    stop = min(stop, tr.stop_step)

  mult = multipliers(cfg.param, model)
  lr_peak = {g: opt.lr_base * factor for g, factor in mult.lr.items()}
  eta_hidden = lr_peak["hidden"]  # the paper's eta: the LR that tau is defined by
  tpp_effective = scaling.effective_tpp(sc.tpp, model)
  tau_opt = scaling.tau_opt(tpp_effective, sc.tau_c, sc.tau_m)
  if opt.weight_decay is not None:
    lam = opt.weight_decay
    tau = 1.0 / (eta_hidden * lam * steps) if lam > 0 else math.inf
  else:
    tau = opt.tau or tau_opt
    lam = scaling.weight_decay(eta_hidden, tau, steps)
  same_tau = opt.tau_groups == "every"  # lambda_g = lambda eta_hidden / eta_g: tau_g = tau
  lam_groups = {
    g: (lam * eta_hidden / lr_peak[g] if same_tau else lam) if g in DECAYED_GROUPS else 0.0
    for g in lr_peak
  }
  tau_groups = {
    g: (1.0 / (lr_peak[g] * lam_groups[g] * steps) if lam_groups[g] > 0 else None) for g in lr_peak
  }
  return Resolved(
    n_params=counts["total"],
    n_active=n,
    n_embedding=counts["embedding"],
    n_non_embedding=counts["non_embedding"],
    tpp=sc.tpp,
    tpp_effective=tpp_effective,
    tokens=d_tokens,
    data_parallel=dp,
    microbatches=microbatches,
    batch_seqs_law=float(law),
    batch_seqs=batch_seqs,
    batch_tokens=b_tokens,
    steps=steps,
    warmup_steps=warmup,
    stop_step=stop,
    step_offset=step_offset,
    row_offset=row_offset,
    lr_peak=lr_peak,
    eta_hidden=eta_hidden,
    weight_decay=lam,
    weight_decay_groups=lam_groups,
    tau=tau,
    tau_opt=tau_opt,
    tau_groups=tau_groups,
    flops_per_token=scaling.flops_per_token(model, causal=True),
    flops_per_token_full_attn=scaling.flops_per_token(model, causal=False),
    multipliers=mult,
    platform=platform,
    attention=execution.attention_path(
      model.attention, model.seq_len, model.attention_block, platform, model.dtype
    ),
    scan_layers=execution.scan_layers(model),
    accumulate_per_device=execution.accumulates_per_device(microbatches, mesh_sizes),
  )
