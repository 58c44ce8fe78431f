"""Validation of a Config: every key's own range (the Rule its field declares), every number
finite and int32-sized, then the rules that tie keys together (heads and kv heads, RoPE, mixtures
of experts, the mesh). Violations are ConfigError naming the keys (exit 2)."""

from __future__ import annotations

import dataclasses
import math

from celerity_jax import execution
from celerity_jax.config import Config, ConfigError, ModelConfig, key_name, rules

INT_MAX = 2**31 - 1  # every int setting is a count, size or seed that int32 code must hold


def _check_numbers(cfg: Config):
  """Every number is finite and every int fits int32, whether it came from a recipe or the CLI."""
  for section in dataclasses.fields(cfg):
    for f in dataclasses.fields(getattr(cfg, section.name)):
      value = getattr(getattr(cfg, section.name), f.name)
      key = f"{section.name}.{key_name(f.name)}"
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number")
      if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        raise ConfigError(f"{key}={value}: out of range (at most {INT_MAX:,} in size)")


def validate(cfg: Config) -> Config:
  """Every key's own range (its Rule), then the rules that tie keys together; returns cfg
  unchanged or raises ConfigError naming the keys."""
  _check_numbers(cfg)
  for name, rule in rules().items():
    section, field_name = name.split(".")
    values = getattr(cfg, section)
    value = getattr(values, field_name if hasattr(values, field_name) else field_name + "_")
    if rule.check is not None and value is not None and not rule.check.ok(value):
      raise ConfigError(f"{name}={value}: must be {rule.check.text}")
  m, t = cfg.model, cfg.train
  kv = m.n_kv_heads or m.n_heads
  if m.n_heads % kv:
    raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}")
  if m.rope_factor and not m.rope_low_freq_factor < m.rope_high_freq_factor:
    raise ConfigError(
      f"model.rope_low_freq_factor={m.rope_low_freq_factor} must be below "
      f"model.rope_high_freq_factor={m.rope_high_freq_factor} (Llama 3 RoPE scaling)"
    )
  if m.position == "rope" and rotary_dims(m) % 2:
    raise ConfigError(
      f"model.d_head={m.d_head} x model.rope_fraction={m.rope_fraction} must be even for rope "
      f"positions (the dimensions RoPE rotates come in pairs)"
    )
  if m.attention == "triton":
    execution.triton_shape_or_error(m.seq_len, m.d_head)
  if m.attention == "cudnn" and cfg.data.packing == "segments":
    raise ConfigError(
      "model.attention=cudnn with data.packing=segments: cuDNN's causal attention takes no "
      "document mask here (it would be a B x N x L x L bias); use data.packing=concat or "
      "model.attention=blockwise"
    )
  if t.microbatch_rows and t.microbatches != 1:
    raise ConfigError(
      f"train.microbatch_rows={t.microbatch_rows} with train.microbatches="
      f"{t.microbatches}: set one of them (microbatches follow from rows)"
    )
  k = cfg.collapse
  if not 0.0 < k.align_start < k.align_end < 1.0:
    raise ConfigError(
      f"collapse.align_start={k.align_start}, collapse.align_end={k.align_end}: "
      f"need 0 < align_start < align_end < 1"
    )
  _validate_moe(m)
  sizes = dataclasses.asdict(cfg.mesh)
  slices = sizes.pop("slices")
  if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ConfigError(f"mesh sizes {sizes}: each must be >= 1, at most one may be -1")
  if slices < 1:
    raise ConfigError(f"mesh.slices={slices}: must be >= 1")
  return cfg


def rotary_dims(m: ModelConfig) -> int:
  """How many of each head's dimensions RoPE rotates (transformers' int(d_head * fraction))."""
  return int(m.d_head * m.rope_fraction)


def _validate_moe(m: ModelConfig):
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
