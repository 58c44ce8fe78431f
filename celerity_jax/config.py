"""The typed, frozen config tree and the `section.key=value` override parser.

A recipe builds a `Config`; the CLI applies overrides with `apply_overrides`; `validate` checks
cross-field rules. Derived hyperparameters (N, D, B, T, eta, lambda, tau) live in `resolve.py`, so
the
config holds only what a user chooses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
  """A bad key, value or combination; the CLI prints it and exits with status 2."""


@dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 2048
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 2
  n_kv_heads: int = 0  # 0 = n_heads (multi-head); fewer = grouped-query attention
  d_head: int = 64
  d_ff: int = 1024
  seq_len: int = 256
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  position: Literal["alibi", "rope"] = "alibi"
  rope_theta: float = 10000.0
  mlp: Literal["squared_relu", "swiglu"] = "squared_relu"
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params are always float32
  z_loss: float = 0.0  # coefficient of logsumexp(logits)^2, 0 = off
  remat: Literal["none", "full", "dots"] = "none"
  scan_layers: bool | None = None  # None: scan above SCAN_ABOVE layer groups (execution.py)
  # training attention: materialized scores ("reference"), XLA tiles that never hold the L x L
  # scores ("blockwise"), the same as Pallas TPU kernels ("pallas"; interpreted off TPU, slowly),
  # or "auto": blockwise on CPU; above attention_block pallas on TPU, else blockwise (attention.py)
  attention: Literal["auto", "reference", "blockwise", "pallas"] = "auto"
  attention_block: int = 512  # query and key tile of the blockwise and Pallas attention
  # mixture of experts (models/moe.py, docs/collapse.md); experts = 0 is a dense model
  experts: int = 0  # routed experts per MoE layer
  top_k: int = 1  # experts per token
  router: Literal["topk", "hash"] = "topk"  # learned softmax top-k | fixed token-id hash (top-1)
  dispatch: Literal["dropless", "capacity"] = "dropless"  # grouped matmul | capacity + dropping
  capacity_factor: float = 1.25  # per-sequence capacity per expert = ceil(cf * seq_len * k / E)
  moe_every: int = 1  # the last layer of every group of this many layers is MoE
  expert_d_ff: int = 0  # hidden width of each expert; 0 = d_ff
  shared_expert: bool = False  # plus one always-on expert of width expert_d_ff
  aux_loss: float = 0.01  # load-balancing loss coefficient (Switch), topk router only
  router_z_loss: float = 0.001  # router z-loss coefficient (ST-MoE), topk router only


@dataclass(frozen=True)
class ParamConfig:
  """CompleteP (alpha = 1) or standard parameterization; base values: docs/method.md section 4."""

  kind: Literal["completep", "sp"] = "completep"
  d_base: int = 256
  l_base: int = 2
  sigma_base: float = 8.67e-2
  alpha_in: float = 9.17
  alpha_out: float = 1.095


@dataclass(frozen=True)
class ScalingConfig:
  """Laws that turn (N, TPP) into D, B, warmup and tau (docs/method.md section 2)."""

  tpp: float = 20.0
  tau_c: float = 0.785  # tau_opt = tau_c * TPP ** tau_m: log-space least squares on the
  tau_m: float = -0.501  #   Celerity bands (0.175, 0.087, 0.051 at 20, 80, 234), within 0.3%
  batch_coef: float = 19.87  # B_tokens = batch_coef * D ** 0.5 at batch_exp 0.5 (Celerity; fit to
  batch_exp: float = 0.5  #   its five 20-TPP batch sizes, all within 2.8%); another exponent
  batch_anchor: float = 5.41e9  #   (Power Lines: 0.383) rotates the law about D = batch_anchor
  warmup_frac: float = 0.10  # warmup = min(warmup_frac * D, warmup_max_tokens)
  warmup_max_tokens: float = 375e6


@dataclass(frozen=True)
class OptimConfig:
  lr_base: float = 1.62e-2  # eta_base; the hidden-matrix LR is lr_base / m_N under CompleteP
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  tau: float = 0.0  # 0 = tau_opt(TPP); else this timescale
  weight_decay: float | None = None  # None = derived from tau; a value overrides tau
  schedule: Literal["linear", "cosine", "constant"] = "linear"
  clip_norm: float = 0.0  # global-norm clipping threshold, 0 = off


@dataclass(frozen=True)
class DataConfig:
  corpus: Literal["stdlib", "synthetic"] = "stdlib"  # built-in corpus, used when `paths` is empty
  paths: str = ""  # comma-separated .txt / .jsonl (+ .gz) files, directories or globs
  tokenizer: str = ""  # an existing sentencepiece .model; "" = train one on the corpus
  tokenizer_type: Literal["bpe", "unigram"] = "bpe"
  cache_dir: str = ""  # "" = $CELERITY_JAX_CACHE or ~/.cache/celerity_jax
  packing: Literal["concat", "segments"] = "concat"
  eval_frac: float = 0.02  # fraction of documents held out (chosen by a hash of their text)
  eval_batches: int = 2  # held-out batches per evaluation
  threads: int = 2  # grain reader threads


@dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 0  # sequences per step; 0 = from the batch law
  microbatches: int = 1  # gradient accumulation steps per optimizer step
  microbatch_rows: int = 0  # or: sequences per device per microbatch (microbatches follow from
  #   B); 0 = off. Memory per device is then the same on any slice
  cpu_microbatch_tokens: int = 2048  # on CPU, dense models also split each device's rows into the
  #   fewest microbatches of at most this many tokens (B unchanged): activations that stay in the
  #   CPU's cache make the step 1.2-1.4x faster; 0 = off (execution.cache_split)
  seed: int = 0  # changes initialization and data order, nothing else
  stop_frac: float = 1.0  # end early at this fraction of T without changing T
  stop_step: int = 0  # end early at this step (0 = off); the earlier stop wins
  eval_every: int = 0  # held-out loss every this many steps and at the end (0 = off)
  on_nonfinite: Literal["skip", "halt"] = "skip"  # skip: leave params/optimizer untouched
  max_bad_steps: int = 8  # consecutive skipped steps before halting anyway


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes within one slice; one axis may be -1 to take the slice's remaining devices.
  With several slices (TPU multislice, or several GPU/CPU processes) the data axis also spans the
  slices over the data-center network: its total size is slices x data."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  slices: int = 1


@dataclass(frozen=True)
class DistConfig:
  """Multi-process runs (jax.distributed). Unset values come from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; on a Cloud TPU VM with none of them set, from the TPU
  metadata; otherwise the run is one process."""

  coordinator: str = ""  # host:port of process 0
  num_processes: int = 0  # 0 = from the environment
  process_id: int = -1  # -1 = from the environment
  init_timeout_s: int = 300  # how long processes wait for each other at start
  heartbeat_timeout_s: int = 100  # a process silent this long is dead, and every other one exits


@dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints in run.dir/checkpoints; the same command with the same run.dir resumes."""

  every_steps: int = 500  # save every this many steps (0 = off)
  every_minutes: float = 15.0  # and at least this often in wall time (0 = off)
  keep: int = 3  # latest checkpoints kept
  keep_every: int = 0  # also keep every checkpoint whose step is a multiple (0 = off)
  async_save: bool = True
  allow_config_change: bool = False  # resume even if trajectory settings differ (logged)


@dataclass(frozen=True)
class CollapseConfig:
  """The in-step collapse monitor (docs/method.md section 6), computed inside the jitted step."""

  reference: str = "surrogate"  # "surrogate" | "none" (spike checks only) | a finished run's dir
  surrogate: str = ""  # surrogate constants JSON; "" = the fit shipped in the package
  align_start: float = 0.25  # window of t = step/T over which L(T) is estimated by alignment
  align_end: float = 0.5
  smooth_frac: float = 0.02  # loss EMA time constant as a fraction of T
  threshold: float = 0.05  # |residual| that counts as off the reference (docs/results.md)
  patience: int = 5  # consecutive steps over the threshold before an alert
  policy: Literal["warn", "halt"] = "warn"  # halt: checkpoint, then exit 5
  spike_factor: float = 1.2  # smoothed loss above this x its running minimum = a loss spike


@dataclass(frozen=True)
class RunConfig:
  dir: str = "runs/default"
  log_every: int = 10  # steps between metrics.jsonl rows
  progress: bool = True  # tqdm progress bar on stderr
  tensorboard: bool = True


@dataclass(frozen=True)
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  param: ParamConfig = field(default_factory=ParamConfig)
  scaling: ScalingConfig = field(default_factory=ScalingConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  dist: DistConfig = field(default_factory=DistConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  collapse: CollapseConfig = field(default_factory=CollapseConfig)
  run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- overrides


def all_keys(cfg: Config) -> list[str]:
  return [
    f"{s.name}.{f.name}"
    for s in dataclasses.fields(cfg)
    for f in dataclasses.fields(getattr(cfg, s.name))
  ]


def _parse_value(key: str, text: str, tp) -> object:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):  # X | None
    if text.lower() in ("none", "null"):
      return None
    inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return _parse_value(key, text, inner)
  if origin is Literal:
    choices = typing.get_args(tp)
    if text not in choices:
      raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, choices))}")
    return text
  if tp is bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"{key}={text!r}: expected a bool (true/false)")
  if tp is int:
    try:
      number = float(text.replace("_", ""))
    except ValueError:
      number = None
    if number is None or not number.is_integer():
      raise ConfigError(f"{key}={text!r}: expected an int")
    return int(number)
  if tp is float:
    try:
      number = float(text.replace("_", ""))
    except ValueError:
      number = None
    if number is None or not math.isfinite(number):  # nan/inf would only surface as a NaN loss
      raise ConfigError(f"{key}={text!r}: expected a finite float")
    return number
  return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
  """Applies `section.key=value` strings; raises ConfigError naming the bad key or value."""
  keys = all_keys(cfg)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config key {key!r}{hint}")
    section_name, name = key.split(".")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    value = _parse_value(key, text, hints[name])
    cfg = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{name: value})})
  return cfg


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(saved: dict, where: str = "config") -> Config:
  """The Config that `to_dict` wrote (a run's config.json holds it under "config"). Keys this
  version does not know are refused by name; keys it added since take their defaults."""
  sections = {}
  for section in dataclasses.fields(Config):
    values = dict(saved.get(section.name, {}))
    known = {f.name for f in dataclasses.fields(section.default_factory)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(
        f"{where}: unknown keys {', '.join(f'{section.name}.{k}' for k in unknown)}"
      )
    sections[section.name] = section.default_factory(**values)
  unknown = sorted(set(saved) - set(sections))
  if unknown:
    raise ConfigError(f"{where}: unknown sections {', '.join(unknown)}")
  return Config(**sections)


# ---------------------------------------------------------------- validation

INT_MAX = 2**31 - 1  # every int setting is a count, size or seed that int32 code must hold


def _check_numbers(cfg: Config):
  """Every number is finite and every int fits int32, whether it came from a recipe or the CLI."""
  for section in dataclasses.fields(cfg):
    for f in dataclasses.fields(getattr(cfg, section.name)):
      value = getattr(getattr(cfg, section.name), f.name)
      key = f"{section.name}.{f.name}"
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number")
      if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        raise ConfigError(f"{key}={value}: out of range (at most {INT_MAX:,} in size)")


def validate(cfg: Config) -> Config:
  """Cross-field checks; returns cfg unchanged or raises ConfigError naming the keys."""
  _check_numbers(cfg)
  m, t, o, s = cfg.model, cfg.train, cfg.optim, cfg.scaling
  positive = {
    "model.vocab_size": m.vocab_size,
    "model.d_model": m.d_model,
    "model.n_layers": m.n_layers,
    "model.n_heads": m.n_heads,
    "model.d_head": m.d_head,
    "model.d_ff": m.d_ff,
    "model.seq_len": m.seq_len,
    "model.attention_block": m.attention_block,
    "param.d_base": cfg.param.d_base,
    "param.l_base": cfg.param.l_base,
    "scaling.tpp": s.tpp,
    "scaling.batch_anchor": s.batch_anchor,
    "optim.lr_base": o.lr_base,
    "train.microbatches": t.microbatches,
    "run.log_every": cfg.run.log_every,
  }
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key}={value}: must be > 0")
  if m.n_kv_heads < 0:
    raise ConfigError(f"model.n_kv_heads={m.n_kv_heads}: must be >= 0 (0 = model.n_heads)")
  if t.seed < 0:
    raise ConfigError(f"train.seed={t.seed}: must be >= 0")
  kv = m.n_kv_heads or m.n_heads
  if m.n_heads % kv:
    raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}")
  if m.position == "rope" and m.d_head % 2:
    raise ConfigError(f"model.d_head={m.d_head} must be even for rope positions")
  if not 0.0 < t.stop_frac <= 1.0:
    raise ConfigError(f"train.stop_frac={t.stop_frac}: must be in (0, 1]")
  if t.stop_step < 0 or t.batch_size < 0 or o.tau < 0 or o.clip_norm < 0 or m.z_loss < 0:
    raise ConfigError(
      "train.stop_step, train.batch_size, optim.tau, optim.clip_norm and model.z_loss must be >= 0"
    )
  if o.weight_decay is not None and o.weight_decay < 0:
    raise ConfigError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
  c = cfg.checkpoint
  if c.every_steps < 0 or c.every_minutes < 0 or c.keep < 1 or c.keep_every < 0:
    raise ConfigError(
      "checkpoint.every_steps, every_minutes, keep_every must be >= 0 and checkpoint.keep >= 1"
    )
  if t.cpu_microbatch_tokens < 0:
    raise ConfigError(f"train.cpu_microbatch_tokens={t.cpu_microbatch_tokens}: must be >= 0")
  if t.microbatch_rows < 0 or (t.microbatch_rows and t.microbatches != 1):
    raise ConfigError(
      f"train.microbatch_rows={t.microbatch_rows} with train.microbatches="
      f"{t.microbatches}: set one of them (rows >= 0; microbatches follow from rows)"
    )
  if t.max_bad_steps < 1:
    raise ConfigError(f"train.max_bad_steps={t.max_bad_steps}: must be >= 1")
  if not 0.0 < cfg.data.eval_frac < 1.0:
    raise ConfigError(f"data.eval_frac={cfg.data.eval_frac}: must be in (0, 1)")
  if cfg.data.eval_batches < 1 or cfg.data.threads < 0 or t.eval_every < 0:
    raise ConfigError("data.eval_batches must be >= 1; data.threads, train.eval_every >= 0")
  if not 0.0 <= s.warmup_frac < 1.0:
    raise ConfigError(f"scaling.warmup_frac={s.warmup_frac}: must be in [0, 1)")
  k = cfg.collapse
  if not 0.0 < k.align_start < k.align_end < 1.0:
    raise ConfigError(
      f"collapse.align_start={k.align_start}, collapse.align_end={k.align_end}: "
      f"need 0 < align_start < align_end < 1"
    )
  if not 0.0 <= k.smooth_frac < 0.5:
    raise ConfigError(f"collapse.smooth_frac={k.smooth_frac}: must be in [0, 0.5)")
  if k.threshold <= 0 or k.patience < 1 or k.spike_factor <= 1.0:
    raise ConfigError(
      f"collapse.threshold={k.threshold} must be > 0, collapse.patience="
      f"{k.patience} >= 1 and collapse.spike_factor={k.spike_factor} > 1"
    )
  _validate_moe(m)
  sizes = dataclasses.asdict(cfg.mesh)
  slices = sizes.pop("slices")
  if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ConfigError(f"mesh sizes {sizes}: each must be >= 1, at most one may be -1")
  if slices < 1:
    raise ConfigError(f"mesh.slices={slices}: must be >= 1")
  g = cfg.dist
  if g.num_processes < 0 or g.process_id < -1 or g.init_timeout_s < 1 or g.heartbeat_timeout_s < 1:
    raise ConfigError(
      "dist.num_processes must be >= 0, dist.process_id >= -1 (-1 = from the "
      "environment), dist.init_timeout_s and dist.heartbeat_timeout_s >= 1"
    )
  return cfg


def _validate_moe(m: ModelConfig):
  if m.experts < 0 or m.expert_d_ff < 0 or m.aux_loss < 0 or m.router_z_loss < 0:
    raise ConfigError(
      "model.experts, model.expert_d_ff, model.aux_loss and model.router_z_loss must be >= 0"
    )
  if not m.experts:
    return
  if not 1 <= m.top_k <= m.experts:
    raise ConfigError(f"model.top_k={m.top_k}: must be in [1, model.experts={m.experts}]")
  if m.router == "hash" and m.top_k != 1:
    raise ConfigError(
      f"model.router=hash routes each token to one expert; got model.top_k={m.top_k}"
    )
  if m.moe_every < 1 or m.n_layers % m.moe_every:
    raise ConfigError(
      f"model.moe_every={m.moe_every}: must be >= 1 and divide model.n_layers={m.n_layers}"
    )
  if m.capacity_factor <= 0:
    raise ConfigError(f"model.capacity_factor={m.capacity_factor}: must be > 0")
