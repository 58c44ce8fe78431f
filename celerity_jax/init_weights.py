"""Starting a run from existing weights: `init.from=PATH` (docs/method.md, "Starting from existing
weights").

PATH is a Hugging Face directory (Llama, Nemotron, or this project's export; hf/importer.py) or
another run's run.dir (its newest complete checkpoint, or `init.step`). The weights fix the model:
their shape and architecture replace the recipe's `model.*` keys (one given on the command line
that disagrees is refused), their tokenizer becomes `data.tokenizer`, and the collapse monitor
checks spikes only (`collapse.reference=none`) unless a reference run is given: the surrogate's
curve is that of a run from random weights. Only the params are
taken: the optimizer, the schedule, the step count and the data order start fresh, and the new
run's recipe derives D, B, eta, lambda and tau for the model it now holds.

`configure` runs where the recipe becomes a Config (recipes.configure), before anything is
allocated or written, and checks every tensor's name and shape from the files' headers, so a
missing or partial checkpoint is one line before run.dir exists; `params` reads the weights when
the run starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from celerity_jax import storage
from celerity_jax.config import Config, ConfigError
from celerity_jax.config_checks import validate

# the model.* keys that fix what the weights compute (the rest say how it runs: dtype, remat,
# attention path, seq_len, the losses' coefficients)
ARCHITECTURE_KEYS = (
  "vocab_size",
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "d_head",
  "d_ff",
  "norm",
  "norm_eps",
  "position",
  "rope_theta",
  "rope_fraction",
  "mlp",
  "experts",
  "top_k",
  "router",
  "moe_every",
  "expert_d_ff",
  "shared_expert",
)
# where each CompleteP multiplier acts, by the name of the parameter it scales
SCALED_BY = {
  "embed": "input_scale",
  "wq": "attn_scale",
  "wo": "residual_scale",
  "unembed": "logit_scale",
  "router": "router_scale",
}


@dataclass(frozen=True)
class Start:
  """What init.from names: a Hugging Face checkpoint (`hf`) or a run's checkpoint (`step`)."""

  where: str  # "init.from=PATH", for messages
  path: object
  model: dict  # the model.* keys the weights fix
  tokenizer: str  # its tokenizer file; "" if it has none
  about: str  # what it is, in words
  hf: object = None  # hf.importer.Checkpoint
  step: int | None = None  # a run's checkpoint step
  source: Config | None = None  # that run's config


def read(init_cfg) -> Start:
  """The checkpoint init.from names, from its config and headers only; ConfigError if it is not
  one this version can start from."""
  from celerity_jax.hf import importer

  where = f"init.from={init_cfg.from_}"
  path = storage.location(init_cfg.from_)
  if (path / "checkpoints").exists():
    return _run(path, init_cfg.step, where)
  if init_cfg.step != -1:
    raise ConfigError(f"init.step={init_cfg.step}: only a run.dir has checkpoint steps ({where})")
  if storage.is_remote(init_cfg.from_) and (path / "config.json").exists():
    raise ConfigError(
      f"{where}: a Hugging Face directory is read from local disk; copy it first (gcloud storage "
      f"cp -r {init_cfg.from_} .)"
    )
  if not path.exists():
    raise ConfigError(f"{where}: no such directory")
  ckpt = importer.read(path, where)
  return Start(where, path, ckpt.model, ckpt.tokenizer, ckpt.architecture, hf=ckpt)


def _run(path, step: int, where: str) -> Start:
  from celerity_jax import trained

  step, cfg, described = trained.settings(path, None if step == -1 else step, where)
  model = {k: getattr(cfg.model, k) for k in ARCHITECTURE_KEYS}
  found = trained.tokenizer_file(path, step, described.get("data_fingerprint"), where)
  tokenizer = "" if found is None else str(found)
  about = f"a run's checkpoint, step {step}"
  return Start(where, path, model, tokenizer, about, step=step, source=cfg)


def configure(cfg: Config, overrides: list[str]) -> Config:
  """`cfg` with the model and tokenizer of init.from: a model.* key given in `overrides` that
  disagrees with the weights is refused, as is a data.tokenizer other than theirs."""
  if not cfg.init.from_:
    return cfg
  start = read(cfg.init)
  given = dict(item.split("=", 1) for item in overrides if "=" in item)
  model = dataclasses.replace(cfg.model, **start.model)
  for name, value in start.model.items():
    key = f"model.{name}"
    if key in given and _differs(cfg.model, model, name):
      raise ConfigError(
        f"{key}={given[key]} disagrees with {start.where} ({start.about}), whose weights have "
        f"{key}={value}; drop the key (the weights fix the model's shape)"
      )
  data = cfg.data
  if start.tokenizer:
    if data.tokenizer and not _same_file(data.tokenizer, start.tokenizer):
      raise ConfigError(
        f"data.tokenizer={data.tokenizer}: {start.where} brings its own tokenizer "
        f"({start.tokenizer}), the one its embeddings were trained with; drop data.tokenizer"
      )
    data = dataclasses.replace(data, tokenizer=start.tokenizer)
  elif not data.tokenizer and (data.paths or data.mixture or data.corpus != "synthetic"):
    raise ConfigError(
      f"{start.where}: has no tokenizer (tokenizer.model or tokenizer.json); give data.tokenizer="
      f"FILE, the one its embeddings were trained with (or train on data.corpus=synthetic)"
    )
  collapse = cfg.collapse
  if collapse.reference == "surrogate" and "collapse.reference" not in given:
    # the surrogate describes runs from random weights; a continued run starts low and has no
    # initial drop, so its residual would alert for nothing: spike checks only, unless a
    # reference run (another continued run) is named. config.json records it.
    collapse = dataclasses.replace(collapse, reference="none")
  cfg = validate(dataclasses.replace(cfg, model=model, data=data, collapse=collapse))
  if start.hf is not None:
    from celerity_jax.hf import importer

    importer.check(start.hf, cfg.model)
  return cfg


def _differs(given_model, weights_model, name: str) -> bool:
  a, b = getattr(given_model, name), getattr(weights_model, name)
  if name == "n_kv_heads":  # 0 means "as many as n_heads"
    a, b = a or given_model.n_heads, b or weights_model.n_heads
  return a != b


def _same_file(a: str, b: str) -> bool:
  pa, pb = storage.location(a), storage.location(b)
  return str(pa) == str(pb) or (pa.exists() and pb.exists() and pa.read_bytes() == pb.read_bytes())


def params(cfg: Config, multipliers, abstract: dict) -> dict:
  """The weights of init.from as the run's param tree, with CompleteP's multipliers unfolded for
  this run's; `abstract`: the model's params as ShapeDtypeStructs with their shardings, which a
  run's checkpoint is restored into (any mesh, any process count; a Hugging Face checkpoint is
  read whole by every process, as float32 host arrays). Shapes are checked against `abstract`."""
  import jax

  start = read(cfg.init)
  if start.hf is not None:
    from celerity_jax.hf import importer

    tree = importer.params(start.hf, cfg.model, multipliers)
  else:
    from celerity_jax.checkpoint import Checkpointer

    reader = Checkpointer(start.path / "checkpoints", read_only=True)
    try:
      tree = reader.restore_params(start.step, jax.tree.map(_placed, abstract))
    except Exception as e:  # Orbax's own errors: a damaged or foreign checkpoint
      raise ConfigError(
        f"{start.where}: cannot read the params of step {start.step} ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:200]})"
      ) from None
    finally:
      reader.close()
    from celerity_jax.parametrization import multipliers as multipliers_of

    theirs = multipliers_of(start.source.param, start.source.model)
    tree = _rescaled(tree, theirs, multipliers)
  want = jax.tree.map(lambda a: tuple(a.shape), abstract)
  got = jax.tree.map(lambda a: tuple(a.shape), tree)
  if want != got:
    raise ConfigError(f"{start.where}: its parameters do not fit the model ({got} vs {want})")
  return tree


def _placed(leaf):
  """A ShapeDtypeStruct with a sharding (one device where `leaf` has none)."""
  import jax

  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _rescaled(tree: dict, theirs, ours) -> dict:
  """A run's params for a run whose multipliers differ (another param.* setting): each parameter
  a multiplier scales times theirs / ours, so the model computes the same function; unchanged,
  bit for bit, where the two agree."""

  def walk(node, name=""):
    if isinstance(node, dict):
      return {k: walk(v, k) for k, v in node.items()}
    multiplier = SCALED_BY.get(name)
    ratio = 1.0 if multiplier is None else getattr(theirs, multiplier) / getattr(ours, multiplier)
    return node if ratio == 1.0 else node * np.float32(ratio)

  return walk(tree)
