"""CompleteP (alpha = 1) and standard parameterization: init scales, multipliers, per-group LR/WD.

With m_N = d_model / d_base and m_L = n_layers / l_base (docs/method.md section 4), CompleteP uses:
hidden matrices init std sigma / sqrt(m_N) and Adam LR eta / m_N; residual branches x 1/m_L; input
embedding x alpha_in; logits x alpha_out / m_N; attention logits x 1/d_head; embeddings, norms and
biases at LR eta; no weight decay on norms and biases. Mixture-of-experts layers: expert matrices
are hidden matrices (the same init and LR as the dense MLP); the router maps the width to a fixed
number of experts, so it is a readout like the unembedding: init std sigma, LR eta, logits x 1/m_N.
Standard parameterization (SP) keeps every
multiplier at 1, sigma everywhere and 1/sqrt(d_head), so the proxy at base width agrees with both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Parameter groups; every nnx.Param in the model carries one of these as `group` metadata.
GROUPS = ("embed", "hidden", "unembed", "norm", "router")
DECAYED_GROUPS = ("embed", "hidden", "unembed", "router")


@dataclass(frozen=True)
class Multipliers:
  width: float  # m_N
  depth: float  # m_L
  embed_init_std: float
  hidden_init_std: float
  unembed_init_std: float
  input_scale: float  # applied to the embedding output
  logit_scale: float  # applied to the unembedding output
  residual_scale: float  # applied to each attention / MLP branch
  attn_scale: float  # applied to q.k
  router_scale: float  # applied to the MoE router logits
  lr: dict  # group -> LR multiplier relative to optim.lr_base

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def multipliers(param_cfg, model_cfg) -> Multipliers:
  m_n = model_cfg.d_model / param_cfg.d_base
  m_l = model_cfg.n_layers / param_cfg.l_base
  sigma = param_cfg.sigma_base
  routed = model_cfg.experts > 0 and model_cfg.router == "topk"  # only then is there a router
  if param_cfg.kind == "completep":
    lr = {"embed": 1.0, "hidden": 1.0 / m_n, "unembed": 1.0, "norm": 1.0, "router": 1.0}
    return Multipliers(
      width=m_n,
      depth=m_l,
      embed_init_std=sigma,
      hidden_init_std=sigma / math.sqrt(m_n),
      unembed_init_std=sigma,
      input_scale=param_cfg.alpha_in,
      logit_scale=param_cfg.alpha_out / m_n,
      residual_scale=1.0 / m_l,
      attn_scale=1.0 / model_cfg.d_head,
      router_scale=1.0 / m_n,
      lr={g: v for g, v in lr.items() if routed or g != "router"},
    )
  return Multipliers(
    width=m_n,
    depth=m_l,
    embed_init_std=sigma,
    hidden_init_std=sigma,
    unembed_init_std=sigma,
    input_scale=1.0,
    logit_scale=1.0,
    residual_scale=1.0,
    attn_scale=1.0 / math.sqrt(model_cfg.d_head),
    router_scale=1.0,
    lr={g: 1.0 for g in GROUPS if routed or g != "router"},
  )
