"""A celerity_jax decoder for Hugging Face `transformers` (PyTorch), shipped inside every export
whose architecture no stock class reproduces (ALiBi, or a norm and MLP pairing no stock model
has). Load it with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

The model is a pre-norm decoder with untied embeddings: ALiBi or RoPE (rotate-half) positions,
LayerNorm or RMSNorm, squared-ReLU or SwiGLU MLP, grouped-query attention. The weights are the
run's own and CompleteP's multipliers (config `multipliers`; celerity_jax/hf/convert.py) apply at
run time, as in training: the embedding times input_scale, attention logits q.k * attn_scale plus
the ALiBi bias -slope_h * (i - j) (in float32 like the JAX model), each residual branch times
residual_scale, the logits times logit_scale. Without `multipliers` (or for any missing one) the
model is the plain architecture: 1, and 1/sqrt(head_dim) for the attention logits. This file
imports only torch and transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class CelerityConfig(PretrainedConfig):
  model_type = "celerity"
  keys_to_ignore_at_inference = ["past_key_values"]

  def __init__(
    self,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    intermediate_size: int = 1024,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int | None = None,
    head_dim: int = 64,
    norm: str = "layernorm",
    norm_eps: float = 1e-5,
    position: str = "alibi",
    rope_theta: float = 10000.0,
    rope_fraction: float = 1.0,
    rope_factor: float = 0.0,
    rope_low_freq_factor: float = 1.0,
    rope_high_freq_factor: float = 4.0,
    rope_original_context: int = 8192,
    mlp: str = "squared_relu",
    multipliers: dict | None = None,
    max_position_embeddings: int = 256,
    use_cache: bool = True,
    **kwargs,
  ):
    self.vocab_size, self.hidden_size = vocab_size, hidden_size
    self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = num_key_value_heads or num_attention_heads
    self.head_dim, self.norm, self.norm_eps = head_dim, norm, norm_eps
    self.position, self.rope_theta, self.mlp = position, rope_theta, mlp
    self.rope_fraction, self.multipliers = rope_fraction, dict(multipliers or {})
    self.rope_factor, self.rope_original_context = rope_factor, rope_original_context
    self.rope_low_freq_factor, self.rope_high_freq_factor = (
      rope_low_freq_factor,
      rope_high_freq_factor,
    )
    self.max_position_embeddings, self.use_cache = max_position_embeddings, use_cache
    kwargs.setdefault("tie_word_embeddings", False)
    super().__init__(**kwargs)


def alibi_slopes(n_heads: int) -> torch.Tensor:
  """Press et al.'s slopes, with their rule for head counts that are not powers of 2."""

  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(n_heads).is_integer():
    slopes = powers(n_heads)
  else:
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest) + powers(2 * closest)[0::2][: n_heads - closest]
  return torch.tensor(slopes, dtype=torch.float32)


class Norm(nn.Module):
  def __init__(self, config: CelerityConfig):
    super().__init__()
    self.kind, self.eps = config.norm, config.norm_eps
    self.weight = nn.Parameter(torch.ones(config.hidden_size))
    self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if self.kind == "layernorm" else None

  def forward(self, x):
    h = x.float()
    if self.kind == "layernorm":
      h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
    if self.bias is not None:
      h = h + self.bias.float()
    return h.to(x.dtype)


def multiplier(config: CelerityConfig, name: str) -> float:
  plain = {"attn_scale": 1.0 / math.sqrt(config.head_dim)}.get(name, 1.0)
  return float(config.multipliers.get(name, plain))


def rope_frequencies(h, theta, config, device):
  """theta^(-2i/h), with Llama 3's scaling when config.rope_factor (its factor) is set."""
  freqs = theta ** (-torch.arange(0, h // 2, dtype=torch.float32, device=device) * 2.0 / h)
  factor = config.rope_factor
  if not factor:
    return freqs
  low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
  context = config.rope_original_context
  wavelength = 2 * math.pi / freqs
  slowed = torch.where(wavelength > context / low, freqs / factor, freqs)
  smooth = (context / wavelength - low) / (high - low)
  between = (1 - smooth) * slowed / factor + smooth * slowed
  middle = (wavelength >= context / high) & (wavelength <= context / low)
  return torch.where(middle, between, slowed)


def rope(x, positions, freqs):
  """x: B x heads x S x H at `positions` (S,), rotate-half convention, on the first 2 * len(freqs)
  dimensions of H."""
  h = 2 * freqs.shape[0]
  angles = positions.float()[:, None] * freqs[None, :]
  cos, sin = angles.cos()[None, None], angles.sin()[None, None]
  x1, x2, passed = x.float()[..., : h // 2], x.float()[..., h // 2 : h], x.float()[..., h:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, passed], dim=-1).to(x.dtype)


class Attention(nn.Module):
  def __init__(self, config: CelerityConfig, layer_idx: int):
    super().__init__()
    d, n, kv, h = (
      config.hidden_size,
      config.num_attention_heads,
      config.num_key_value_heads,
      config.head_dim,
    )
    self.layer_idx, self.n, self.kv, self.h = layer_idx, n, kv, h
    self.position, self.theta = config.position, config.rope_theta
    self.rotary_dims, self.config = int(h * config.rope_fraction), config
    self.scale = multiplier(config, "attn_scale")
    self.q_proj = nn.Linear(d, n * h, bias=False)
    self.k_proj = nn.Linear(d, kv * h, bias=False)
    self.v_proj = nn.Linear(d, kv * h, bias=False)
    self.o_proj = nn.Linear(n * h, d, bias=False)

  def forward(self, x, positions, bias, cache):
    b, s, _ = x.shape
    q = self.q_proj(x).view(b, s, self.n, self.h).transpose(1, 2)
    k = self.k_proj(x).view(b, s, self.kv, self.h).transpose(1, 2)
    v = self.v_proj(x).view(b, s, self.kv, self.h).transpose(1, 2)
    if self.position == "rope":
      freqs = rope_frequencies(self.rotary_dims, self.theta, self.config, x.device)
      q, k = rope(q, positions, freqs), rope(k, positions, freqs)
    if cache is not None:
      k, v = cache.update(k, v, self.layer_idx)
    if self.kv != self.n:
      k = k.repeat_interleave(self.n // self.kv, dim=1)
      v = v.repeat_interleave(self.n // self.kv, dim=1)
    scores = torch.einsum("bnsh,bnch->bnsc", q.float(), k.float()) * self.scale + bias
    out = torch.einsum("bnsc,bnch->bnsh", scores.softmax(-1), v.float()).to(x.dtype)
    return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n * self.h))


class Mlp(nn.Module):
  def __init__(self, config: CelerityConfig):
    super().__init__()
    d, f = config.hidden_size, config.intermediate_size
    self.kind = config.mlp
    self.up_proj = nn.Linear(d, f, bias=False)
    self.gate_proj = nn.Linear(d, f, bias=False) if self.kind == "swiglu" else None
    self.down_proj = nn.Linear(f, d, bias=False)

  def forward(self, x):
    h = self.up_proj(x)
    h = F.silu(self.gate_proj(x)) * h if self.kind == "swiglu" else F.relu(h).square()
    return self.down_proj(h)


class Layer(nn.Module):
  def __init__(self, config: CelerityConfig, layer_idx: int):
    super().__init__()
    self.input_layernorm = Norm(config)
    self.self_attn = Attention(config, layer_idx)
    self.post_attention_layernorm = Norm(config)
    self.mlp = Mlp(config)
    self.residual_scale = multiplier(config, "residual_scale")

  def forward(self, x, positions, bias, cache):
    x = x + self.residual_scale * self.self_attn(self.input_layernorm(x), positions, bias, cache)
    return x + self.residual_scale * self.mlp(self.post_attention_layernorm(x))


class CelerityPreTrainedModel(PreTrainedModel):
  config_class = CelerityConfig
  base_model_prefix = "model"
  _no_split_modules = ["Layer"]

  def _init_weights(self, module):  # weights always come from the export
    pass


class CelerityModel(CelerityPreTrainedModel):
  def __init__(self, config: CelerityConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
    self.norm = Norm(config)
    self.post_init()

  def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
    b, s = input_ids.shape
    if use_cache and past_key_values is None:
      past_key_values = DynamicCache(config=self.config)
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    positions = torch.arange(past, past + s, device=input_ids.device)
    keys = torch.arange(past + s, device=input_ids.device)
    visible = keys[None, :] <= positions[:, None]  # S x C, causal
    visible = visible[None, None]
    if attention_mask is not None:  # B x C, 0 = padding
      visible = visible & attention_mask[:, None, None, -(past + s) :].bool()
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=input_ids.device)
    if self.config.position == "alibi":
      distance = (positions[:, None] - keys[None, :]).float()
      # computed here, not kept as a buffer: from_pretrained leaves non-persistent buffers empty
      slopes = alibi_slopes(self.config.num_attention_heads).to(input_ids.device)
      bias = bias - slopes[None, :, None, None] * distance[None, None]
    bias = bias.masked_fill(~visible, torch.finfo(torch.float32).min)
    x = self.embed_tokens(input_ids) * multiplier(self.config, "input_scale")
    for layer in self.layers:
      x = layer(x, positions, bias, past_key_values if use_cache else None)
    return self.norm(x), past_key_values


class CelerityForCausalLM(CelerityPreTrainedModel, GenerationMixin):
  def __init__(self, config: CelerityConfig):
    super().__init__(config)
    self.model = CelerityModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def forward(
    self,
    input_ids=None,
    attention_mask=None,
    past_key_values=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
  ):
    use_cache = self.config.use_cache if use_cache is None else use_cache
    hidden, cache = self.model(input_ids, attention_mask, past_key_values, use_cache)
    if logits_to_keep:
      hidden = hidden[:, -logits_to_keep:]
    logits = self.lm_head(hidden).float() * multiplier(self.config, "logit_scale")
    loss = None
    if labels is not None:
      loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
      )
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
