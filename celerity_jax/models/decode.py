"""Autoregressive decoding with a KV cache: the decoder's forward pass for a few new tokens at
absolute positions, attending over every layer's cached keys and values.

Shape legend: B batch, S new tokens, C cache length (prompt + generated), D d_model, N query
heads, K kv heads, H head dim, V vocab.

The cache is written in place (`lax.dynamic_update_slice` at a traced position), so one compiled
step serves every position. Positions enter through RoPE's angles or ALiBi's distances, both
computed for the new tokens only; keys past the newest position are masked, so the pad at the end
of the cache is never seen. Tested against the full forward pass: the cached logits and greedy
tokens equal it at every position (tests/test_sample.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from celerity_jax.models.attention import alibi_bias
from celerity_jax.models.decoder import Decoder
from celerity_jax.models.layers import Forward


class KVCache(NamedTuple):
  k: list  # per layer, BxCxKxH
  v: list


def empty_cache(cfg, batch: int, length: int) -> KVCache:
  kv = cfg.n_kv_heads or cfg.n_heads
  shape, dt = (batch, length, kv, cfg.d_head), jnp.dtype(cfg.dtype)
  return KVCache(*([jnp.zeros(shape, dt) for _ in range(cfg.n_layers)] for _ in range(2)))


def cache_axes(batch_axis: str | None) -> tuple:
  """Logical axes of each layer's cache, sharded like the activations it replaces (kv heads over
  `tensor`); `batch_axis` is "batch", or None when the rows cannot be split over the mesh."""
  return (batch_axis, "length", "kv_heads", "head_dim")


def forward(
  model: Decoder, tokens_BxS: jax.Array, cache: KVCache, start: jax.Array
) -> tuple[jax.Array, KVCache]:
  """(float32 logits BxSxV, updated cache) for tokens at positions start..start+S-1, every
  earlier position already in `cache`. A prompt is one call with start = 0 (the prefill), each
  generated token one call with S = 1."""
  cfg, mult = model.cfg, model.mult
  s, c = tokens_BxS.shape[1], cache.k[0].shape[1]
  positions_S = start + jnp.arange(s)
  mask_1x1xSxC = (jnp.arange(c)[None, :] <= positions_S[:, None])[None, None]
  bias = alibi_bias(cfg.n_heads, c, positions_S) if cfg.position == "alibi" else None
  x_BxSxD = model.embed_tokens(tokens_BxS)
  new_k, new_v = [], []
  for i, block in enumerate(model.layers()):
    q, k, v = block.attn.project(block.ln1(x_BxSxD), positions_S)
    k_BxCxKxH = jax.lax.dynamic_update_slice(
      cache.k[i], k.astype(cache.k[i].dtype), (0, start, 0, 0)
    )
    v_BxCxKxH = jax.lax.dynamic_update_slice(
      cache.v[i], v.astype(cache.v[i].dtype), (0, start, 0, 0)
    )
    new_k.append(k_BxCxKxH)
    new_v.append(v_BxCxKxH)
    attended = block.attn.attend(q, k_BxCxKxH, v_BxCxKxH, mask_1x1xSxC, bias)
    x_BxSxD = x_BxSxD + mult.residual_scale * attended
    h_BxSxD = block.ln2(x_BxSxD)
    y_BxSxD, _ = block.mlp_branch(h_BxSxD, Forward(tokens_BxL=tokens_BxS))  # dense or routed
    x_BxSxD = x_BxSxD + mult.residual_scale * y_BxSxD
  return model.logits(x_BxSxD), KVCache(new_k, new_v)


def choose(
  logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  """The next token per row: argmax at temperature 0; else a draw from softmax(logits / T)
  restricted to the top_k most likely tokens (0 = all) and to the smallest set whose probability
  reaches top_p (nucleus sampling; 1 = all)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the tokens ranked above
    keep = jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf).min(axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < keep, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)
