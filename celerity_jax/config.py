"""The typed, frozen config tree and the `section.key=value` override parser.

A recipe builds a `Config`; the CLI applies overrides with `apply_overrides`;
`config_checks.validate` checks every key's range and the rules that tie keys together. Derived
hyperparameters (N, D, B, T, eta, lambda, tau) live in `resolve.py`, so the config holds only what
a user chooses.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Literal

from celerity_jax.key_rules import (
  NONNEG,
  POSITIVE,
  Check,
  ConfigError,
  Rule,
  above,
  at_least,
  between,
  key,
  parse_value,
)


def key_name(field_name: str) -> str:
  """A field's key: its name, less the underscore a Python keyword needs (init.from)."""
  return field_name.removesuffix("_")


def rules() -> dict[str, Rule]:
  """Every key's Rule, by "section.name"."""
  return {
    f"{s.name}.{key_name(f.name)}": f.metadata["rule"]
    for s in dataclasses.fields(Config)
    for f in dataclasses.fields(s.default_factory)
  }


def free_keys() -> tuple[str, ...]:
  """The keys a resumed run may change (the rest are its trajectory)."""
  return tuple(k for k, rule in rules().items() if rule.free)


def matched_keys() -> dict[str, float]:
  """The keys a collapse reference run must share, with their relative tolerances."""
  return {k: rule.matched for k, rule in rules().items() if rule.matched is not None}


@dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = key(2048, POSITIVE, free=False)
  d_model: int = key(128, POSITIVE, free=False)
  n_layers: int = key(2, POSITIVE, free=False)
  n_heads: int = key(2, POSITIVE, free=False)
  # 0 = n_heads (multi-head); fewer = grouped-query attention
  n_kv_heads: int = key(0, NONNEG, free=False)
  d_head: int = key(64, POSITIVE, free=False)
  d_ff: int = key(1024, POSITIVE, free=False)
  seq_len: int = key(256, POSITIVE, free=False)
  norm: Literal["layernorm", "rmsnorm"] = key("layernorm", free=False)
  norm_eps: float = key(1e-5, free=False)
  position: Literal["alibi", "rope"] = key("alibi", free=False)
  rope_theta: float = key(10000.0, free=False)
  # the fraction of each head's dimensions that RoPE rotates (the first ones; Nemotron: 0.5)
  rope_fraction: float = key(1.0, between(0, 1, "(]"), free=False)
  # Llama 3's RoPE frequency scaling (rope_type "llama3": its factor, 8 for Llama 3.1); 0 = off
  rope_factor: float = key(0.0, NONNEG, free=False)
  rope_low_freq_factor: float = key(1.0, POSITIVE, free=False)
  rope_high_freq_factor: float = key(4.0, POSITIVE, free=False)
  rope_original_context: int = key(8192, POSITIVE, free=False)
  mlp: Literal["squared_relu", "swiglu"] = key("squared_relu", free=False)
  # compute dtype; params are always float32
  dtype: Literal["float32", "bfloat16"] = key("float32", free=False)
  z_loss: float = key(0.0, NONNEG, free=False)  # coefficient of logsumexp(logits)^2, 0 = off
  remat: Literal["none", "full", "dots"] = key("none", free=True)
  # None: scan above SCAN_ABOVE layer groups (execution.py)
  scan_layers: bool | None = key(None, free=True)
  # training attention: materialized scores ("reference"), XLA tiles that never hold the L x L
  # scores ("blockwise"), the same as Pallas TPU kernels ("pallas"; interpreted off TPU, slowly),
  # cuDNN's fused kernel ("cudnn"; GPU, bf16/fp16), Pallas GPU kernels ("triton"; the same), or
  # "auto": blockwise on CPU; above attention_block pallas on TPU, else blockwise (execution.py)
  attention: Literal["auto", "reference", "blockwise", "pallas", "cudnn", "triton"] = key(
    "auto", free=True
  )
  # query and key tile of the blockwise and Pallas attention
  attention_block: int = key(512, POSITIVE, free=True)
  # mixture of experts (models/moe.py, docs/collapse.md); experts = 0 is a dense model
  experts: int = key(0, NONNEG, free=False)  # routed experts per MoE layer
  top_k: int = key(1, free=False)  # experts per token
  # learned softmax top-k | fixed token-id hash (top-1)
  router: Literal["topk", "hash"] = key("topk", free=False)
  # grouped matmul | capacity + dropping
  dispatch: Literal["dropless", "capacity"] = key("dropless", free=False)
  # per-sequence capacity per expert = ceil(cf * seq_len * k / E)
  capacity_factor: float = key(1.25, free=False)
  moe_every: int = key(1, free=False)  # the last layer of every group of this many layers is MoE
  expert_d_ff: int = key(0, NONNEG, free=False)  # hidden width of each expert; 0 = d_ff
  shared_expert: bool = key(False, free=False)  # plus one always-on expert of width expert_d_ff
  # load-balancing loss coefficient (Switch), topk router only
  aux_loss: float = key(0.01, NONNEG, free=False)
  # router z-loss coefficient (ST-MoE), topk router only
  router_z_loss: float = key(0.001, NONNEG, free=False)


@dataclass(frozen=True)
class InitConfig:
  """Start from existing weights (celerity_jax/init_weights.py): the key `init.from` (a Python
  keyword, so the field is `from_`) names a Hugging Face directory, an .npz export or a run.dir;
  its model shape and tokenizer replace the recipe's, the optimizer and schedule start fresh."""

  from_: str = key("", free=True)  # "" = random initialization (the recipe's seed)
  step: int = key(-1, at_least(-1), free=True)  # a run.dir's checkpoint step; -1 = its newest


@dataclass(frozen=True)
class ParamConfig:
  """CompleteP (alpha = 1) or standard parameterization; base values: docs/method.md section 4."""

  kind: Literal["completep", "sp"] = key("completep", free=False)
  d_base: int = key(256, POSITIVE, free=False)
  l_base: int = key(2, POSITIVE, free=False)
  sigma_base: float = key(8.67e-2, free=False)
  alpha_in: float = key(9.17, free=False)
  alpha_out: float = key(1.095, free=False)


@dataclass(frozen=True)
class ScalingConfig:
  """Laws that turn (N, TPP) into D, B, warmup and tau (docs/method.md section 2)."""

  tpp: float = key(20.0, POSITIVE, free=False, matched=0.02)
  # tau_opt = tau_c * TPP ** tau_m: log-space least squares on the Celerity bands (0.175, 0.087,
  # 0.051 at 20, 80, 234), within 0.3%
  tau_c: float = key(0.785, free=False)
  tau_m: float = key(-0.501, free=False)
  # B_tokens = batch_coef * D ** 0.5 at batch_exp 0.5 (Celerity; fit to its five 20-TPP batch
  # sizes, all within 2.8%); another exponent (Power Lines: 0.383) rotates the law about
  # D = batch_anchor
  batch_coef: float = key(19.87, free=False)
  batch_exp: float = key(0.5, free=False)
  batch_anchor: float = key(5.41e9, POSITIVE, free=False)
  # warmup = min(warmup_frac * D, warmup_max_tokens)
  warmup_frac: float = key(0.10, between(0, 1, "[)"), free=False, matched=0.1)
  warmup_max_tokens: float = key(375e6, free=False)


@dataclass(frozen=True)
class OptimConfig:
  # eta_base; the hidden-matrix LR is lr_base / m_N under CompleteP
  lr_base: float = key(1.62e-2, POSITIVE, free=False)
  b1: float = key(0.9, free=False)
  b2: float = key(0.95, free=False)
  eps: float = key(1e-8, free=False)
  tau: float = key(0.0, NONNEG, free=False, matched=0.02)  # 0 = tau_opt(TPP); else this timescale
  # None = derived from tau; a value overrides tau
  weight_decay: float | None = key(None, NONNEG, free=False)
  # whose timescale tau is: "hidden" = the paper's (lambda from the hidden LR; the embedding and
  # unembedding, whose LRs CompleteP does not scale with width, get tau x eta_hidden / eta_group),
  # "every" = each decayed group's own lambda, so every group's timescale is tau
  tau_groups: Literal["hidden", "every"] = key("hidden", free=False)
  schedule: Literal["linear", "cosine", "constant"] = key("linear", free=False, matched=0.0)
  clip_norm: float = key(0.0, NONNEG, free=False)  # global-norm clipping threshold, 0 = off
  # the precision params are kept at after each update: bfloat16 rounds them (bf16 master weights,
  # as a framework with no float32 copy does; they are stored as float32)
  master_weights: Literal["float32", "bfloat16"] = key("float32", free=False)


@dataclass(frozen=True)
class DataConfig:
  # built-in corpus, used when `paths` is empty
  corpus: Literal["stdlib", "synthetic"] = key("stdlib", free=False)
  # comma-separated files (.txt, .py, .jsonl, their .gz/.zst forms, .parquet), directories or
  # globs, local or gs:// (data/corpus.py)
  paths: str = key("", free=True)
  # a TOML file of named sources with paths and weights, instead of paths (data/mixture.py)
  mixture: str = key("", free=True)
  # NAME:WEIGHT,... overrides the mixture's weights; a change on resume is logged, not refused
  weights: str = key("", free=True)
  # the JSONL field or parquet column that holds a document's text
  text_field: str = key("text", Check("a field name", bool), free=False)
  # an existing sentencepiece .model; "" = train one on the corpus
  tokenizer: str = key("", free=True)
  tokenizer_type: Literal["bpe", "unigram"] = key("bpe", free=False)
  cache_dir: str = key("", free=True)  # "" = $CELERITY_JAX_CACHE or ~/.cache/celerity_jax
  packing: Literal["concat", "segments"] = key("concat", free=False)
  # fraction of documents held out (chosen by a hash of their text)
  eval_frac: float = key(0.02, between(0, 1, "()"), free=False)
  eval_batches: int = key(2, at_least(1), free=True)  # held-out batches per evaluation
  threads: int = key(2, NONNEG, free=True)  # grain reader threads
  # processes that tokenize shards on each host; 0 = one per core
  build_processes: int = key(0, NONNEG, free=True)


@dataclass(frozen=True)
class TrainConfig:
  batch_size: int = key(0, NONNEG, free=False)  # sequences per step; 0 = from the batch law
  microbatches: int = key(1, POSITIVE, free=False)  # gradient accumulation steps per optimizer step
  # or: sequences per device per microbatch (microbatches follow from B); 0 = off. Memory per
  # device is then the same on any slice
  microbatch_rows: int = key(0, NONNEG, free=False)
  # on CPU, dense models also split each device's rows into microbatches of at most this many
  # tokens (B unchanged; activations stay in cache: 2.6x faster); 0 = off (execution.cache_split)
  cpu_microbatch_tokens: int = key(2048, NONNEG, free=True)
  seed: int = key(0, NONNEG, free=False)  # changes initialization and data order, nothing else
  # end early at this fraction of T without changing T
  stop_frac: float = key(1.0, between(0, 1, "(]"), free=True)
  # end early at this step (0 = off); the earlier stop wins
  stop_step: int = key(0, NONNEG, free=True)
  # held-out loss every this many steps and at the end (0 = off)
  eval_every: int = key(0, NONNEG, free=True)
  # skip: leave params/optimizer untouched
  on_nonfinite: Literal["skip", "halt"] = key("skip", free=False)
  # consecutive skipped steps before halting anyway
  max_bad_steps: int = key(8, at_least(1), free=False)


@dataclass(frozen=True)
class DownstreamConfig:
  """lm-evaluation-harness tasks scored during training (celerity_jax/downstream/tasks.py)."""

  tasks: str = key("", free=True)  # TASK[:SHOTS],... or "paper"; "" = off
  every: int = key(0, NONNEG, free=True)  # steps between evaluations (and at the end); 0 = off
  include_path: str = key("", free=True)  # a directory of task YAMLs of your own
  limit: int = key(0, NONNEG, free=True)  # examples per task; 0 = all
  batch_size: int = key(16, POSITIVE, free=True)  # sequences per scoring batch


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes within one slice; one axis may be -1 to take the slice's remaining devices.
  With several slices (TPU multislice, or several GPU/CPU processes) the data axis also spans the
  slices over the data-center network: its total size is slices x data."""

  data: int = key(-1, free=True)
  fsdp: int = key(1, free=True)
  tensor: int = key(1, free=True)
  expert: int = key(1, free=True)
  slices: int = key(1, free=True)


@dataclass(frozen=True)
class DistConfig:
  """Multi-process runs (jax.distributed). Unset values come from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, then from a SLURM step or Open MPI launch of several
  processes (jax's cluster detection); on a Cloud TPU VM with none of them set, from the TPU
  metadata; otherwise the run is one process (distributed.py)."""

  coordinator: str = key("", free=True)  # host:port of process 0
  num_processes: int = key(0, NONNEG, free=True)  # 0 = from the environment
  process_id: int = key(-1, at_least(-1), free=True)  # -1 = from the environment
  # how long processes wait for each other at start
  init_timeout_s: int = key(300, at_least(1), free=True)
  # a process silent this long is dead, and every other one exits
  heartbeat_timeout_s: int = key(100, at_least(1), free=True)


@dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints in run.dir/checkpoints; the same command with the same run.dir resumes."""

  every_steps: int = key(500, NONNEG, free=True)  # save every this many steps (0 = off)
  # and at least this often in wall time (0 = off)
  every_minutes: float = key(15.0, NONNEG, free=True)
  keep: int = key(3, at_least(1), free=True)  # latest checkpoints kept
  # also keep every checkpoint whose step is a multiple (0 = off)
  keep_every: int = key(0, NONNEG, free=True)
  async_save: bool = key(True, free=True)
  # resume even if trajectory settings differ (logged)
  allow_config_change: bool = key(False, free=True)
  # false: a resume restores params, step and data position but starts Adam's moments afresh
  restore_optimizer: bool = key(True, free=True)


@dataclass(frozen=True)
class CollapseConfig:
  """The in-step collapse monitor (docs/method.md section 6), computed inside the jitted step."""

  # "surrogate" | "none" (spike checks only) | a finished run's dir
  reference: str = key("surrogate", free=False)
  # surrogate constants JSON; "" = the fit shipped in the package
  surrogate: str = key("", free=False)
  # window of t = step/T over which L(T) is estimated by alignment
  align_start: float = key(0.25, free=False)
  align_end: float = key(0.5, free=False)
  # loss EMA time constant as a fraction of T
  smooth_frac: float = key(0.02, between(0, 0.5, "[)"), free=False, matched=1e-6)
  # |residual| that counts as off the reference: the fault campaign's operating point (1 false
  # alarm in 40 clean runs; docs/faults.md)
  threshold: float = key(0.04, POSITIVE, free=True)
  # consecutive steps over the threshold before an alert
  patience: int = key(5, at_least(1), free=True)
  policy: Literal["warn", "halt"] = key("warn", free=True)  # halt: checkpoint, then exit 5
  # smoothed loss above this x its running minimum = a loss spike
  spike_factor: float = key(1.2, above(1), free=True)


@dataclass(frozen=True)
class RunConfig:
  dir: str = key("runs/default", free=True)
  log_every: int = key(10, POSITIVE, free=True)  # steps between metrics.jsonl rows
  progress: bool = key(True, free=True)  # tqdm progress bar on stderr
  tensorboard: bool = key(True, free=True)
  # a wandb project ("PROJECT" or "ENTITY/PROJECT") that mirrors metrics.jsonl; "" = off. WANDB_MODE
  # (offline, ...) and WANDB_API_KEY are wandb's own; a resumed run continues the same wandb run
  wandb: str = key("", free=True)


@dataclass(frozen=True)
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  init: InitConfig = field(default_factory=InitConfig)
  param: ParamConfig = field(default_factory=ParamConfig)
  scaling: ScalingConfig = field(default_factory=ScalingConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  dist: DistConfig = field(default_factory=DistConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  collapse: CollapseConfig = field(default_factory=CollapseConfig)
  run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- overrides


def all_keys(cfg: Config) -> list[str]:
  return [
    f"{s.name}.{key_name(f.name)}"
    for s in dataclasses.fields(cfg)
    for f in dataclasses.fields(getattr(cfg, s.name))
  ]


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
    name = name if name in hints else name + "_"
    value = parse_value(key, text, hints[name])
    cfg = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{name: value})})
  return cfg


def to_dict(cfg: Config) -> dict:
  """{section: {key: value}}, by key name (init.from), as config.json holds it."""
  return {
    section: {key_name(name): value for name, value in values.items()}
    for section, values in dataclasses.asdict(cfg).items()
  }


def from_dict(saved: dict, where: str = "config") -> Config:
  """The Config that `to_dict` wrote (a run's config.json holds it under "config"). Keys this
  version does not know are refused by name; keys it added since take their defaults."""
  sections = {}
  for section in dataclasses.fields(Config):
    known = {key_name(f.name): f.name for f in dataclasses.fields(section.default_factory)}
    values = {known.get(k, k): v for k, v in saved.get(section.name, {}).items()}
    unknown = sorted(set(values) - set(known.values()))
    if unknown:
      raise ConfigError(
        f"{where}: unknown keys {', '.join(f'{section.name}.{k}' for k in unknown)}"
      )
    sections[section.name] = section.default_factory(**values)
  unknown = sorted(set(saved) - set(sections))
  if unknown:
    raise ConfigError(f"{where}: unknown sections {', '.join(unknown)}")
  return Config(**sections)
