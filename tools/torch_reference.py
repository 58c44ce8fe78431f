"""A PyTorch implementation of the dense decoder, for speed comparisons only (tools.bench_vs_torch).

nanoGPT-style and written the way a PyTorch user would write it: fused QKV projection,
`scaled_dot_product_attention` (with the ALiBi bias and causal mask as one additive float mask, or
`is_causal=True` for RoPE-free plain causal attention), pre-LN blocks, the MLP of the config
(squared ReLU or SwiGLU), untied embeddings, cross-entropy, `torch.optim.AdamW`. It trains the same
shapes as celerity_jax in float32; it is not numerically tied to our model (its init is PyTorch's),
which the benchmark does not need. Needs the `test` extra (torch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def alibi_slopes(n_heads: int) -> torch.Tensor:

  from celerity_jax.models.attention import alibi_slopes as ours

  return torch.from_numpy(np.asarray(ours(n_heads)).copy())


class Block(nn.Module):
  def __init__(self, m):
    super().__init__()
    d, n, h, f = m.d_model, m.n_heads, m.d_head, m.d_ff
    norm = nn.LayerNorm if m.norm == "layernorm" else nn.RMSNorm
    self.n, self.h, self.swiglu = n, h, m.mlp == "swiglu"
    self.ln1, self.ln2 = norm(d, eps=m.norm_eps), norm(d, eps=m.norm_eps)
    self.qkv = nn.Linear(d, 3 * n * h, bias=False)
    self.proj = nn.Linear(n * h, d, bias=False)
    self.up = nn.Linear(d, (2 if self.swiglu else 1) * f, bias=False)
    self.down = nn.Linear(f, d, bias=False)

  def forward(self, x, bias):
    b, length, _ = x.shape
    q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.n, self.h).permute(2, 0, 3, 1, 4)
    if bias is None:
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / self.h)
    else:
      y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / self.h)
    x = x + self.proj(y.transpose(1, 2).reshape(b, length, self.n * self.h))
    u = self.up(self.ln2(x))
    if self.swiglu:
      gate, u = u.chunk(2, dim=-1)
      u = F.silu(gate) * u
    else:
      u = torch.square(F.relu(u))
    return x + self.down(u)


class Decoder(nn.Module):
  """Embedding, blocks, final norm, unembedding; `loss(inputs, targets)` is the mean CE."""

  def __init__(self, m, alibi: bool):
    super().__init__()
    self.embed = nn.Embedding(m.vocab_size, m.d_model)
    self.blocks = nn.ModuleList(Block(m) for _ in range(m.n_layers))
    norm = nn.LayerNorm if m.norm == "layernorm" else nn.RMSNorm
    self.final_norm = norm(m.d_model, eps=m.norm_eps)
    self.unembed = nn.Linear(m.d_model, m.vocab_size, bias=False)
    length = m.seq_len
    if alibi:  # -slope * (i - j) on and below the diagonal, -inf above: one additive mask
      pos = torch.arange(length)
      distance = (pos[:, None] - pos[None, :]).float()
      bias = -alibi_slopes(m.n_heads)[:, None, None] * distance
      bias = bias.masked_fill(distance < 0, -math.inf)
      self.register_buffer("bias", bias[None], persistent=False)
    else:
      self.bias = None

  def loss(self, inputs, targets):
    x = self.embed(inputs)
    for block in self.blocks:
      x = block(x, self.bias)
    logits = self.unembed(self.final_norm(x))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def make_step(m, alibi: bool, compiled: bool, lr: float = 1e-3, seed: int = 0):
  """A train step closure () -> loss (a float tensor), over one fixed random batch of the
  config's shape, with the model optionally under torch.compile."""
  torch.manual_seed(seed)
  model = Decoder(m, alibi)
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
  loss_fn = torch.compile(model.loss) if compiled else model.loss
  return model, opt, loss_fn


def train_step(model, opt, loss_fn, inputs, targets):
  opt.zero_grad(set_to_none=True)
  loss = loss_fn(inputs, targets)
  loss.backward()
  opt.step()
  return loss


def matmul_ceiling(n: int, repeats: int = 10) -> float:
  """Best float32 FLOP/s of an n x n x n torch matmul."""
  import time

  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best
