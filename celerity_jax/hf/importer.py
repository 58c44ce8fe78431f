"""A Hugging Face causal LM directory as this project's model: the inverse of convert.py.

Reads a Llama (`LlamaForCausalLM`), a Nemotron (`NemotronForCausalLM`) or this project's own
export (`CelerityForCausalLM`): config.json for the shape, and the weights from model.safetensors
or the shards its index (model.safetensors.index.json) lists, in any float dtype.

CompleteP's multipliers are unfolded (docs/method.md, "Starting from existing weights"): a stock
class applies 1/sqrt(d_head) to q.k and no other multiplier, so its weights are the products our
model forms at run time; each is divided by the multiplier our model will apply (the embedding by
input_scale, W_q by attn_scale * sqrt(d_head), the attention output and MLP down projections by
the residual scale, lm_head by the logit scale), and the model computes what the checkpoint
computed. The shipped class applies the exporting run's multipliers itself (config.json
`multipliers`): where they equal the new run's, the weights are taken unchanged, bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from celerity_jax.config import ConfigError

SUPPORTED = {
  "LlamaForCausalLM": "llama",
  "NemotronForCausalLM": "nemotron",
  "CelerityForCausalLM": "celerity",
}
FOLDED = ("input_scale", "attn_scale", "residual_scale", "logit_scale")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
  """What a Hugging Face directory holds: its architecture, the model.* keys it fixes, the
  multipliers its class applies, where each tensor is, and its tokenizer file ("" if none)."""

  where: str  # "init.from=DIR", for messages
  directory: object
  arch: str
  architecture: str  # the class name config.json gives
  model: dict
  applied: dict
  tied: bool
  files: dict  # tensor name -> safetensors file name
  tokenizer: str


def is_hf_dir(path) -> bool:
  return (path / "config.json").exists() and not (path / "checkpoints").exists()


def read(directory, where: str) -> Checkpoint:
  """The directory's config and weight index; ConfigError naming the problem when it is not a
  checkpoint this importer can use or a weight file is missing."""
  config = _config(directory, where)
  names = config.get("architectures") or []
  arch = next((SUPPORTED[n] for n in names if n in SUPPORTED), None)
  if arch is None:
    raise ConfigError(
      f"{where}: unsupported architecture {', '.join(names) or config.get('model_type', '?')}; "
      f"supported: {', '.join(SUPPORTED)}"
    )
  model = _model_keys(config, arch, where)
  h = model["d_head"]
  plain = {name: 1.0 for name in FOLDED} | {"attn_scale": 1.0 / math.sqrt(h)}
  applied = plain | (config.get("multipliers") or {}) if arch == "celerity" else plain
  tied = bool(config.get("tie_word_embeddings", False))
  files = _weight_files(directory, where)
  tokenizer = next(
    (str(directory / n) for n in ("tokenizer.model", "tokenizer.json") if (directory / n).exists()),
    "",
  )
  return Checkpoint(where, directory, arch, names[0], model, applied, tied, files, tokenizer)


def _config(directory, where: str) -> dict:
  path = directory / "config.json"
  if not directory.exists():
    raise ConfigError(f"{where}: no such directory")
  if not path.exists():
    raise ConfigError(f"{where}: no config.json (not a Hugging Face model directory)")
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{where}: config.json is not JSON ({e})") from None


def _rope(config: dict, where: str) -> tuple[float, float | None, dict]:
  """(theta, partial rotary factor or None, Llama 3 scaling keys or {}) from rope_parameters
  (transformers 5) or the older top-level keys; other scaled RoPE variants are refused by name."""
  rope = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind not in ("default", "llama3"):
    raise ConfigError(
      f"{where}: RoPE type {kind!r} (rope scaling) is not supported; supported: default, llama3"
    )
  theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
  fraction = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
  llama3 = {}
  if kind == "llama3":
    given = {**scaling, **rope}
    try:
      llama3 = {
        "rope_factor": float(given["factor"]),
        "rope_low_freq_factor": float(given["low_freq_factor"]),
        "rope_high_freq_factor": float(given["high_freq_factor"]),
        "rope_original_context": int(given["original_max_position_embeddings"]),
      }
    except KeyError as e:
      raise ConfigError(f"{where}: llama3 RoPE scaling without its {e.args[0]!r}") from None
  return float(theta), fraction, llama3


def _model_keys(config: dict, arch: str, where: str) -> dict:
  def need(name):
    if name not in config:
      raise ConfigError(f"{where}: config.json has no {name!r}")
    return config[name]

  for flag in ("attention_bias", "mlp_bias"):
    if config.get(flag):
      raise ConfigError(f"{where}: {flag}=true is not supported (this model has no biases)")
  heads, d = int(need("num_attention_heads")), int(need("hidden_size"))
  kv = int(config.get("num_key_value_heads") or heads)
  theta, fraction, llama3 = _rope(config, where)
  model = {
    "vocab_size": int(need("vocab_size")),
    "d_model": d,
    "n_layers": int(need("num_hidden_layers")),
    "n_heads": heads,
    "n_kv_heads": 0 if kv == heads else kv,
    "d_head": int(config.get("head_dim") or d // heads),
    "d_ff": int(need("intermediate_size")),
    "position": "rope",
    "rope_theta": theta,
    "rope_fraction": 1.0,
  }
  act = config.get("hidden_act")
  if arch == "llama":
    if act != "silu":
      raise ConfigError(f"{where}: hidden_act={act!r} is not supported for Llama (silu)")
    if fraction not in (None, 1.0):
      raise ConfigError(f"{where}: partial_rotary_factor={fraction} is not supported for Llama")
    norm_eps = float(config.get("rms_norm_eps", 1e-6))
    return model | llama3 | {"norm": "rmsnorm", "norm_eps": norm_eps, "mlp": "swiglu"}
  if llama3:
    raise ConfigError(f"{where}: llama3 RoPE scaling is supported for Llama checkpoints only")
  if arch == "nemotron":
    if act != "relu2":
      raise ConfigError(f"{where}: hidden_act={act!r} is not supported for Nemotron (relu2)")
    return model | {
      "norm": "layernorm",
      "norm_eps": float(config.get("norm_eps", 1e-5)),
      "mlp": "squared_relu",
      # transformers' NemotronConfig rotates half of each head unless told otherwise
      "rope_fraction": float(0.5 if fraction is None else fraction),
    }
  from celerity_jax.hf.convert import LLAMA3_KEYS

  return (
    model
    | {k: config[k] for k in LLAMA3_KEYS if k in config}
    | {
      "position": config.get("position", "alibi"),
      "rope_theta": float(config.get("rope_theta", 10000.0)),
      "rope_fraction": float(config.get("rope_fraction", 1.0)),
      "norm": config.get("norm", "layernorm"),
      "norm_eps": float(config.get("norm_eps", 1e-5)),
      "mlp": config.get("mlp", "squared_relu"),
    }
  )


def _weight_files(directory, where: str) -> dict:
  """tensor name -> file, from the index of a sharded checkpoint or the one file's header."""
  index = directory / INDEX
  if index.exists():
    try:
      files = dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{where}: {INDEX} has no readable weight_map ({e})") from None
    missing = sorted({f for f in files.values() if not (directory / f).exists()})
    if missing:
      raise ConfigError(
        f"{where}: {INDEX} lists {', '.join(missing)}, missing from the directory (a partial "
        f"download?)"
      )
    return files
  if (directory / "model.safetensors").exists():
    return {name: "model.safetensors" for name in _header(directory / "model.safetensors", where)}
  found = sorted(p.name for p in directory.iterdir() if p.name.endswith((".bin", ".pt", ".pth")))
  hint = f" (it has {', '.join(found)}: PyTorch pickles are not read)" if found else ""
  raise ConfigError(f"{where}: no model.safetensors or {INDEX}{hint}")


def _header(path, where: str) -> dict:
  """{tensor name: shape} from a safetensors file's header, without reading the tensors."""
  try:
    with path.open("rb") as f:
      size = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(size))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{where}: {path.name} is not a readable safetensors file ({e})") from None
  return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def expected(ckpt: Checkpoint, model_cfg) -> dict[str, tuple]:
  """Every tensor name the checkpoint must hold, with its shape (transformers' layout)."""
  m = model_cfg
  d, h, kv = m.d_model, m.d_head, m.n_kv_heads or m.n_heads
  out = {"model.embed_tokens.weight": (m.vocab_size, d), "model.norm.weight": (d,)}
  if not ckpt.tied:
    out["lm_head.weight"] = (m.vocab_size, d)
  if m.norm == "layernorm":
    out["model.norm.bias"] = (d,)
  for i in range(m.n_layers):
    pre = f"model.layers.{i}"
    out |= {
      f"{pre}.self_attn.q_proj.weight": (m.n_heads * h, d),
      f"{pre}.self_attn.k_proj.weight": (kv * h, d),
      f"{pre}.self_attn.v_proj.weight": (kv * h, d),
      f"{pre}.self_attn.o_proj.weight": (d, m.n_heads * h),
      f"{pre}.mlp.up_proj.weight": (m.d_ff, d),
      f"{pre}.mlp.down_proj.weight": (d, m.d_ff),
    }
    if m.mlp == "swiglu":
      out[f"{pre}.mlp.gate_proj.weight"] = (m.d_ff, d)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      out[f"{pre}.{norm}.weight"] = (d,)
      if m.norm == "layernorm":
        out[f"{pre}.{norm}.bias"] = (d,)
  return out


def check(ckpt: Checkpoint, model_cfg):
  """Refuses, naming the tensor, a checkpoint that lacks a tensor (in its index or in the file
  the index names), holds one this model does not use, or one of another shape (only the files'
  headers are read)."""
  headers = {name: _header(ckpt.directory / name, ckpt.where) for name in set(ckpt.files.values())}
  wanted = expected(ckpt, model_cfg)
  unused = sorted(
    n for n in ckpt.files if n not in wanted and not n.endswith("rotary_emb.inv_freq")
  )
  if unused:
    raise ConfigError(
      f"{ckpt.where}: holds tensors a {ckpt.architecture} of this config does not use "
      f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})"
    )
  for name, shape in wanted.items():
    file = ckpt.files.get(name)
    if file is None or name not in headers[file]:
      where = file or (INDEX if (ckpt.directory / INDEX).exists() else "model.safetensors")
      raise ConfigError(f"{ckpt.where}: tensor {name} is missing ({where} does not hold it)")
    if tuple(headers[file][name]) != shape:
      raise ConfigError(
        f"{ckpt.where}: tensor {name} has shape {tuple(headers[file][name])}, config.json "
        f"implies {shape}"
      )


def params(ckpt: Checkpoint, model_cfg, ours) -> dict:
  """The Decoder's parameter tree (float32 host arrays, layers stacked) holding the checkpoint's
  weights with the multipliers unfolded for `ours` (parametrization.Multipliers)."""
  from safetensors import safe_open

  tensors = {}
  for file in sorted(set(ckpt.files.values())):
    with safe_open(str(ckpt.directory / file), framework="numpy") as f:
      for name in (n for n, where in ckpt.files.items() if where == file):
        tensors[name] = np.asarray(f.get_tensor(name), np.float32)
  m = model_cfg
  d, gain_offset = m.d_model, 1.0 if ckpt.arch == "nemotron" else 0.0
  # the export multiplied by ours / applied (convert.state_dict); dividing by the same float32
  # factor undoes it, exactly where the factor is 1
  fold = {name: np.float32(getattr(ours, name) / ckpt.applied[name]) for name in FOLDED}

  def norm(prefix):
    out = {"scale": tensors[f"{prefix}.weight"] + np.float32(gain_offset)}
    if m.norm == "layernorm":
      out["bias"] = tensors[f"{prefix}.bias"]
    return out

  def layer(i):
    pre = f"model.layers.{i}"

    def t(name):
      return tensors[f"{pre}.{name}.weight"].T

    mlp = {"wi": t("mlp.up_proj"), "wo": t("mlp.down_proj") / fold["residual_scale"]}
    if m.mlp == "swiglu":
      mlp["wg"] = t("mlp.gate_proj")
    return {
      "attn": {
        "wq": (t("self_attn.q_proj") / fold["attn_scale"]).reshape(d, m.n_heads, m.d_head),
        "wk": t("self_attn.k_proj").reshape(d, -1, m.d_head),
        "wv": t("self_attn.v_proj").reshape(d, -1, m.d_head),
        "wo": (t("self_attn.o_proj") / fold["residual_scale"]).reshape(m.n_heads, m.d_head, d),
      },
      "mlp": mlp,
      "ln1": norm(f"{pre}.input_layernorm"),
      "ln2": norm(f"{pre}.post_attention_layernorm"),
    }

  layers = [layer(i) for i in range(m.n_layers)]
  embed = tensors["model.embed_tokens.weight"]
  head = embed if ckpt.tied else tensors["lm_head.weight"]
  out = {
    "embed": embed / fold["input_scale"],
    "blocks": _stack(layers),
    "final_norm": norm("model.norm"),
    "unembed": head.T / fold["logit_scale"],
  }
  return _contiguous(out)


def _stack(trees: list[dict]) -> dict:
  return {
    k: _stack([t[k] for t in trees])
    if isinstance(trees[0][k], dict)
    else np.stack([t[k] for t in trees])
    for k in trees[0]
  }


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, np.float32)
