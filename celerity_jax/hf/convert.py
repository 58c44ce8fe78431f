"""A trained run as a Hugging Face `transformers` causal LM directory: config.json,
model.safetensors, the tokenizer, and modeling code where no stock class fits.

Which class loads it depends on the architecture (docs/usage.md, "Use the model"):
- RoPE + RMSNorm + SwiGLU is `LlamaForCausalLM`;
- RoPE + LayerNorm + squared ReLU is `NemotronForCausalLM` (its LayerNorm stores gain - 1);
- anything else, the Celerity default ALiBi + LayerNorm + squared ReLU among them, is the
  shipped `modeling_celerity.CelerityForCausalLM` (`trust_remote_code=True`): Falcon's ALiBi adds
  the bias before the 1/sqrt(d_head) scale and rounds positions in bf16, and Bloom and MPT fix a
  GELU MLP of width 4d, so none of them computes this model's logits.

CompleteP's multipliers (docs/method.md section 4) are folded into the weights for the stock
classes, which compute a plain decoder: the embedding multiplier into the embedding table; the
attention-logit scale into W_q, times sqrt(d_head) because transformers divides by it; the
residual-branch scale 1/m_L into the attention output and MLP down projections; the logit
multiplier into lm_head. The shipped class applies them at run time instead (config.json
`multipliers`), so its weights are the run's own, bit for bit, and an import (hf/importer.py)
gets them back exactly; a fold is a float32 product, which an import can undo only to within an
ulp. Tested (tests/test_hf_export.py): transformers' logits equal the JAX forward to 1e-4, and
its greedy generation equals tools.sample's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from celerity_jax.config import ConfigError

HERE = Path(__file__).resolve().parent
BOS_EOS = 3  # a trained tokenizer's eos: the document boundary, before every prompt and after text


def architecture(model_cfg) -> str:
  """ "llama", "nemotron" or "celerity" (the shipped modeling code); refuses what none holds."""
  if model_cfg.experts:
    raise ConfigError(
      "export --format hf: mixture-of-experts models are not supported yet "
      "(--format npz exports them)"
    )
  kinds = (model_cfg.position, model_cfg.norm, model_cfg.mlp)
  if kinds == ("rope", "rmsnorm", "swiglu") and model_cfg.rope_fraction == 1.0:
    return "llama"
  if kinds == ("rope", "layernorm", "squared_relu") and not model_cfg.rope_factor:
    return "nemotron"
  return "celerity"


FOLDED = ("input_scale", "attn_scale", "residual_scale", "logit_scale")
LLAMA3_KEYS = (
  "rope_factor",
  "rope_low_freq_factor",
  "rope_high_freq_factor",
  "rope_original_context",
)


def llama3_rope(m) -> dict:
  """transformers' rope_parameters for Llama 3's scaled RoPE ({} without it)."""
  if not m.rope_factor:
    return {}
  return {
    "rope_type": "llama3",
    "factor": m.rope_factor,
    "low_freq_factor": m.rope_low_freq_factor,
    "high_freq_factor": m.rope_high_freq_factor,
    "original_max_position_embeddings": m.rope_original_context,
  }


def file_multipliers(arch: str, model_cfg, ours) -> dict[str, float]:
  """The multipliers the class that loads `arch` applies itself: the shipped class applies the
  run's own; a stock class applies 1/sqrt(d_head) to q.k and nothing else."""
  if arch == "celerity":
    return {name: getattr(ours, name) for name in FOLDED}
  return {name: 1.0 for name in FOLDED} | {"attn_scale": 1.0 / math.sqrt(model_cfg.d_head)}


def hf_config(trained, arch: str) -> dict:
  m = trained.cfg.model
  boundary = trained.tokenizer.eos_id if trained.tokenizer is not None else BOS_EOS
  common = {
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "intermediate_size": m.d_ff,
    "num_hidden_layers": m.n_layers,
    "num_attention_heads": m.n_heads,
    "num_key_value_heads": m.n_kv_heads or m.n_heads,
    "head_dim": m.d_head,
    "max_position_embeddings": m.seq_len,
    "tie_word_embeddings": False,
    "bos_token_id": boundary,
    "eos_token_id": boundary,
    "pad_token_id": 0,
    "dtype": "float32",
    "celerity_jax": {"run_dir": str(trained.run_dir), "step": trained.step},
  }
  if arch == "llama":
    return {
      **common,
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_act": "silu",
      "rms_norm_eps": m.norm_eps,
      "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"} | llama3_rope(m),
      "attention_bias": False,
      "mlp_bias": False,
    }
  if arch == "nemotron":
    return {
      **common,
      "architectures": ["NemotronForCausalLM"],
      "model_type": "nemotron",
      "hidden_act": "relu2",
      "norm_eps": m.norm_eps,
      "rope_parameters": {
        "rope_theta": m.rope_theta,
        "partial_rotary_factor": m.rope_fraction,
        "rope_type": "default",
      },
      "attention_bias": False,
      "mlp_bias": False,
    }
  return {
    **common,
    "architectures": ["CelerityForCausalLM"],
    "model_type": "celerity",
    "auto_map": {
      "AutoConfig": "modeling_celerity.CelerityConfig",
      "AutoModelForCausalLM": "modeling_celerity.CelerityForCausalLM",
    },
    "norm": m.norm,
    "norm_eps": m.norm_eps,
    "position": m.position,
    "rope_theta": m.rope_theta,
    "rope_fraction": m.rope_fraction,
    **{k: getattr(m, k) for k in LLAMA3_KEYS if m.rope_factor},
    "mlp": m.mlp,
    "multipliers": file_multipliers(arch, m, trained.multipliers),
  }


def state_dict(trained, arch: str) -> dict[str, np.ndarray]:
  """transformers' parameter names -> float32 arrays (out x in, as torch.nn.Linear keeps them),
  with what the loading class does not apply itself folded in (a ratio of exactly 1 where it
  applies a multiplier itself: the weight is unchanged, bit for bit)."""
  p, m, ours = trained.params, trained.cfg.model, trained.multipliers
  d = m.d_model
  applied = file_multipliers(arch, m, ours)
  fold = {name: getattr(ours, name) / applied[name] for name in FOLDED}
  q_fold, residual = fold["attn_scale"], fold["residual_scale"]
  gain_offset = 1.0 if arch == "nemotron" else 0.0  # Nemotron's LayerNorm1P: weight + 1

  def norm(prefix, params):
    out = {f"{prefix}.weight": params["scale"] - gain_offset}
    if "bias" in params:
      out[f"{prefix}.bias"] = params["bias"]
    return out

  out = {"model.embed_tokens.weight": p["embed"] * fold["input_scale"]}
  blocks = p["blocks"]
  for i in range(m.n_layers):
    layer = {k: {name: a[i] for name, a in v.items()} for k, v in blocks.items()}
    attn, mlp, pre = layer["attn"], layer["mlp"], f"model.layers.{i}"
    out[f"{pre}.self_attn.q_proj.weight"] = (attn["wq"] * q_fold).reshape(d, -1).T
    out[f"{pre}.self_attn.k_proj.weight"] = attn["wk"].reshape(d, -1).T
    out[f"{pre}.self_attn.v_proj.weight"] = attn["wv"].reshape(d, -1).T
    out[f"{pre}.self_attn.o_proj.weight"] = (attn["wo"] * residual).reshape(-1, d).T
    out[f"{pre}.mlp.up_proj.weight"] = mlp["wi"].T
    if "wg" in mlp:
      out[f"{pre}.mlp.gate_proj.weight"] = mlp["wg"].T
    out[f"{pre}.mlp.down_proj.weight"] = (mlp["wo"] * residual).T
    out.update(norm(f"{pre}.input_layernorm", layer["ln1"]))
    out.update(norm(f"{pre}.post_attention_layernorm", layer["ln2"]))
  out.update(norm("model.norm", p["final_norm"]))
  out["lm_head.weight"] = (p["unembed"] * fold["logit_scale"]).T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def tokenizer_config(seq_len: int) -> dict:
  return {
    # exact with trust_remote_code; else transformers converts tokenizer.model itself
    "tokenizer_class": "LlamaTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_celerity.CelerityTokenizer", None]},
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "add_bos_token": True,
    "add_eos_token": False,
    "model_max_length": seq_len,
    "clean_up_tokenization_spaces": False,
  }


def tokenizer_json_config(trained) -> dict:
  """A given tokenizer.json's config: its end-of-text token starts each prompt and ends text."""
  eos = trained.tokenizer.tk.id_to_token(trained.tokenizer.eos_id)
  return {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": eos,
    "eos_token": eos,
    "model_max_length": trained.cfg.model.seq_len,
    "clean_up_tokenization_spaces": False,
  }


def write(trained, target) -> dict:
  """Writes the directory `target` (local) and returns what it holds. The files go to a sibling
  directory first, which then takes the place of `target` (an earlier export there is replaced
  whole: a reader never sees a mix of two exports, and no stale file stays)."""
  from safetensors.numpy import save_file

  arch = architecture(trained.cfg.model)
  target = Path(target)
  out = target.with_name(f".{target.name}.partial-{os.getpid()}")
  try:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tensors = state_dict(trained, arch)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(trained, arch), indent=2) + "\n")
    if arch == "celerity":
      shutil.copyfile(HERE / "modeling_celerity.py", out / "modeling_celerity.py")
    files = ["config.json", "model.safetensors"]
    if trained.tokenizer is not None and trained.tokenizer.file_name == "tokenizer.json":
      (out / "tokenizer.json").write_bytes(trained.tokenizer.proto)  # transformers reads it as is
      config = tokenizer_json_config(trained)
      (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
      files += ["tokenizer.json", "tokenizer_config.json"]
    elif trained.tokenizer is not None:
      (out / "tokenizer.model").write_bytes(trained.tokenizer.proto)
      config = tokenizer_config(trained.cfg.model.seq_len)
      (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
      shutil.copyfile(HERE / "tokenization_celerity.py", out / "tokenization_celerity.py")
      files += ["tokenizer.model", "tokenizer_config.json"]
    if target.exists():
      old = target.with_name(f".{target.name}.replaced-{os.getpid()}")
      os.replace(target, old)
      os.replace(out, target)
      shutil.rmtree(old)
    else:
      os.replace(out, target)
  except OSError as e:
    shutil.rmtree(out, ignore_errors=True)
    raise ConfigError(f"export --out {target}: cannot write ({e.strerror or e})") from None
  return {
    "step": trained.step,
    "out": str(target),
    "format": "hf",
    "architecture": hf_config(trained, arch)["architectures"][0],
    "model_needs_trust_remote_code": arch == "celerity",
    "n_params": int(sum(a.size for a in tensors.values())),
    "files": sorted(files + (["modeling_celerity.py"] if arch == "celerity" else [])),
  }
