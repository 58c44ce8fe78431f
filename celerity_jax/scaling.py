"""Pure-Python scaling math: parameter counts, D, B, T, warmup, tau and weight decay, FLOPs.

Sources (docs/method.md sections 1-2): tau = B / (eta * lambda * D) from AdamW-as-EMA (Wang &
Aitchison 2024) and Power Lines (Bergsma et al. 2025); tau_opt(TPP) = c * TPP**m with c, m fitted to
the Celerity bands (tau 0.175 / 0.087 / 0.051 at TPP 20 / 80 / 234: c = 0.785, m = -0.501);
B_tokens = k * D**0.5 with k = 19.87 fitted to the five Celerity 20-TPP batch sizes (a two-point
fit, 19.6, misses the 900M member by 4%); warmup = min(10% of D, 375M tokens) (Celerity).
"""

from __future__ import annotations


def param_counts(model) -> dict[str, int]:
  """Parameter counts as the paper's tables count them (embeddings included).

  `total` counts every parameter, `active` those one token uses: for a mixture of experts, top_k of
  the routed experts (plus the router and any shared expert) in each MoE layer. Dense: equal.
  """
  d, v, f, h = model.d_model, model.vocab_size, model.d_ff, model.d_head
  q_heads, kv_heads = model.n_heads, model.n_kv_heads or model.n_heads
  attention = d * h * (2 * q_heads + 2 * kv_heads)  # Wq, Wo and Wk, Wv
  matrices = 3 if model.mlp == "swiglu" else 2
  mlp = matrices * d * f
  norm = (2 if model.norm == "layernorm" else 1) * d  # gain (+ bias)
  per_layer = attention + mlp + 2 * norm
  embedding = 2 * v * d  # untied input and output tables
  total = active = model.n_layers * per_layer + norm + embedding
  expert = 0
  if model.experts:
    n_moe = model.n_layers // model.moe_every
    expert = matrices * d * (model.expert_d_ff or f)
    fixed = (d * model.experts if model.router == "topk" else 0) + (
      expert if model.shared_expert else 0
    )
    total += n_moe * (model.experts * expert + fixed - mlp)
    active += n_moe * (model.top_k * expert + fixed - mlp)
  return {
    "total": total,
    "active": active,
    "embedding": embedding,
    "non_embedding": total - embedding,
    "per_layer": per_layer,
    "expert": expert,
  }


def effective_tpp(tpp: float, model) -> float:
  """The TPP that sets tau_opt and the collapse curve's shape: TPP * top_k / experts for a mixture
  of experts (TPP counts active parameters), TPP for a dense model.

  Under balanced routing each routed expert trains on top_k * D / E of the D tokens, so its
  parameters see top_k / E of the tokens a dense MLP's would. Top-1: TPP / E, as Celerity App. B.4
  found for hash routing. Attention, embeddings and shared experts see every token; the routed
  experts' share sets the effective TPP, as in the paper.
  """
  return tpp * model.top_k / model.experts if model.experts else tpp


def tau_opt(tpp: float, c: float, m: float) -> float:
  """Optimal normalized AdamW timescale at a tokens-per-parameter ratio: c * TPP**m."""
  return c * tpp**m


def batch_tokens(d_tokens: float, coef: float, exponent: float, anchor: float) -> float:
  """Batch size in tokens: B = coef * sqrt(anchor) * (D / anchor)**exponent.

  At exponent 0.5 this is coef * sqrt(D), the Celerity fit. Another exponent (Power Lines' 0.383
  for B_opt, 0.462 for B_crit; their prefactors are unpublished) rotates the law about the anchor
  D, where the batch size was tuned before extrapolating, so B there is unchanged.
  """
  return coef * anchor**0.5 * (d_tokens / anchor) ** exponent


def round_batch(sequences: float, granule: int) -> int:
  """Rounds a batch in sequences to the nearest positive multiple of `granule` (data-parallel size
  times microbatches), so every device gets whole sequences."""
  return max(granule, granule * round(sequences / granule))


def total_steps(d_tokens: float, b_tokens: int) -> int:
  return max(1, round(d_tokens / b_tokens))


def warmup_steps(d_tokens: float, b_tokens: int, frac: float, max_tokens: float) -> int:
  """Celerity warmup: min(frac * D, max_tokens) tokens, in whole steps."""
  return round(min(frac * d_tokens, max_tokens) / b_tokens)


def weight_decay(eta: float, tau: float, steps: int) -> float:
  """lambda = 1 / (eta * tau * T): the AdamW decay that gives EMA timescale tau (fraction of T)."""
  return 1.0 / (eta * tau * steps)


def tau(b_tokens: float, eta: float, lam: float, d_tokens: float) -> float:
  """tau = B / (eta * lambda * D), the EMA timescale as a fraction of training."""
  return b_tokens / (eta * lam * d_tokens)


def flops_per_token(model, causal: bool = True, all_params: bool = False) -> float:
  """Training FLOPs per token: 6 * (matmul params) + attention.

  Matmul params exclude the input embedding (a lookup) and norms but include the unembedding.
  Attention score and value matmuls cost 12 * layers * seq_len * (heads * d_head) per token with
  full
  attention (Megatron/Levanter convention) and half that when causal (MaxText convention).
  `all_params=True, causal=False` is the paper's convention (6 N D with N counting every parameter,
  plus full attention): it reproduces Celerity's 234-TPP FLOPs (Table 2) within 5%. A mixture of
  experts counts its active parameters, the ones a token uses.
  """
  counts = param_counts(model)
  norms = (2 * model.n_layers + 1) * ((2 if model.norm == "layernorm" else 1) * model.d_model)
  matmul = counts["active"] if all_params else counts["active"] - counts["embedding"] // 2 - norms
  attention = 12 * model.n_layers * model.seq_len * model.n_heads * model.d_head
  return 6.0 * matmul + (0.5 if causal else 1.0) * attention


def chinchilla_tpp(k_n: float, a: float = 0.35, base_tpp: float = 20.0) -> dict:
  """Celerity App. C.1: train a model k_n times the compute-optimal size to the same loss.

  With a Chinchilla loss form and a = alpha = beta at r = base_tpp, the data multiplier is
  k_D = (2 - k_N^-a)^(-1/a); compute grows by C/C_opt = k_N k_D and TPP = r k_D / k_N.
  k_N = 0.38 gives TPP ~ 234 (the Celerity top band) for 1.67x the compute-optimal FLOPs.
  """
  if not 0 < k_n or k_n**-a >= 2:
    raise ValueError(f"k_n={k_n}: no finite data multiplier (need k_n > {2 ** (-1 / a):.3f})")
  k_d = (2.0 - k_n**-a) ** (-1.0 / a)
  return {"k_n": k_n, "k_d": k_d, "compute_ratio": k_n * k_d, "tpp": base_tpp * k_d / k_n}


def fmt_count(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"
