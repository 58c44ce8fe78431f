"""Recipes: named members of the model families, each a call to a family rule (family.py).

`recipe=NAME` on the command line loads RECIPES[NAME]. A recipe states only its choices: the
family, the shape and, for pod recipes, the slice its layout is made for. Every derived number (N,
D, B, T, warmup, eta, lambda, tau, FLOPs) comes from the config:
`python -m celerity_jax.commands.plan recipe=NAME` prints the family's table,
`python -m celerity_jax.main recipe=NAME --print-config` one member's. Adding a member is one row.

A recipe is a family rule and its arguments, so a size override re-derives the shape:
`recipe=celerity_nano_2 model.d_model=96` calls the nano rule with d_model 96 (3 layers, 6 heads
of 16, d_ff 768), where setting the one key alone would break the family's rules. Keys a rule takes
as arguments are in SHAPE_KEYS; a key given explicitly still wins over what the rule derives.

`recipe=path/to/file.py:NAME` loads a user's own recipe without touching the package: NAME is a
`Recipe`, a `Config`, or a function returning a `Config`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celerity_jax.recipes.family import celerity, gpu, long, moe, nano

from celerity_jax.config import Config, ConfigError, apply_overrides
from celerity_jax.config_checks import validate

DEFAULT = "celerity_tiny"


# config keys a family rule takes as arguments: overriding one re-derives what follows from it
SHAPE_KEYS = {
  "model.d_model": "d_model",
  "model.n_layers": "n_layers",
  "model.d_head": "d_head",
  "model.vocab_size": "vocab_size",
  "model.seq_len": "seq_len",
}


@dataclass(frozen=True)
class Recipe:
  name: str
  rule: Callable[..., Config]  # a family rule (family.py): rule(name, **args) -> Config
  args: dict = field(default_factory=dict)
  about: str = ""
  slice: str | None = None  # the Cloud TPU slice its layout (mesh, remat, rows) fits

  def build(self, overrides: list[str] = ()) -> Config:
    """The rule's Config, with the overrides of keys the rule takes (SHAPE_KEYS) passed to it."""
    takes = inspect.signature(self.rule).parameters
    args = dict(self.args)
    for item in overrides:
      key = item.split("=", 1)[0]
      if key in SHAPE_KEYS and SHAPE_KEYS[key] in takes:
        section, name = key.split(".")
        args[SHAPE_KEYS[key]] = getattr(getattr(apply_overrides(Config(), [item]), section), name)
    return self.rule(self.name, **args)


def _moe_of(rule, experts: int, top_k: int, aux_loss: float = 0.01):
  """`rule` with every MLP made routed experts (family.moe); takes the same arguments."""

  @functools.wraps(rule)
  def build(name, **args):
    return moe(rule(name, **args), experts=experts, top_k=top_k, aux_loss=aux_loss)

  return build


def _pod(name, d_model, n_layers, d_head, slice_, about) -> Recipe:
  """A Celerity member at context 8192 with the layout pod recipes ship: FSDP over every chip,
  `dots` remat, one sequence per device per microbatch (family.celerity)."""
  shape = {"d_model": d_model, "n_layers": n_layers, "d_head": d_head}
  return Recipe(name, celerity, {**shape, "remat": "dots", "microbatch_rows": 1}, about, slice_)


def _nano(name, d_model, about, **kw) -> Recipe:
  return Recipe(name, nano, {"d_model": d_model, **kw}, about)


def _moe_nano(name, d_model) -> Recipe:
  dense = name.replace("moe_", "")
  return Recipe(
    name,
    _moe_of(nano, experts=8, top_k=2, aux_loss=0.1),
    {"d_model": d_model},
    f"{dense} with 8 routed experts, top-2, load-balancing weight 0.1 (family.moe)",
  )


_ROWS = [
  _nano(
    "celerity_tiny",
    64,
    "the default run: nano rules at d_model 64 on the built-in stdlib "
    "corpus, a few minutes on 2 CPU cores (celerity_nano_4's shape at the batch law's B, its own "
    "run directory)",
    batch_size=0,
  ),
  _nano("celerity_nano_1", 16, "CPU-sized Celerity member 1 of 4"),
  _nano("celerity_nano_2", 32, "CPU-sized Celerity member 2 of 4"),
  _nano("celerity_nano_3", 48, "CPU-sized Celerity member 3 of 4"),
  _nano("celerity_nano_4", 64, "CPU-sized Celerity member 4 of 4"),
  *(_moe_nano(f"celerity_moe_nano_{i}", d) for i, d in enumerate((16, 32, 48, 64), start=1)),
  *(
    Recipe(f"celerity_long_{i}", long, {"d_model": d}, f"long-run member {i} of 5 (family.long)")
    for i, d in enumerate((32, 48, 64, 80, 96), start=1)
  ),
  *(
    Recipe(f"celerity_gpu_{size}", gpu, {"d_model": d}, about)
    for size, d, about in (
      ("10m", 128, "GPU-sized Celerity member 1 of 5 (family.gpu): 3 layers, 9.4M parameters"),
      ("25m", 256, "GPU-sized Celerity member 2 of 5: the base width and depth"),
      ("50m", 384, "GPU-sized Celerity member 3 of 5"),
      ("85m", 512, "GPU-sized Celerity member 4 of 5"),
      ("150m", 640, "GPU-sized Celerity member 5 of 5: the 300M member's shape at vocab 32k"),
    )
  ),
  _pod("celerity_300m", 640, 13, 64, "v5litepod-8", "the paper's 300M member"),
  _pod("celerity_500m", 896, 17, 64, "v5litepod-16", "the paper's 500M member"),
  _pod("celerity_900m", 1152, 23, 128, "v5p-16", "the paper's 900M member"),
  _pod(
    "celerity_1b",
    1152,
    26,
    128,
    "v5p-64",
    "our ~1B member (the paper has none): the 900M member deepened from 23 to 26 layers",
  ),
  _pod("celerity_1_8b", 1536, 30, 128, "v5p-32", "the paper's 1.8B member"),
  _pod("celerity_3_9b", 2048, 40, 128, "v5p-64", "the paper's 3.9B member"),
  Recipe(
    "celerity_moe_1b",
    _moe_of(celerity, experts=16, top_k=2),
    {"d_model": 1152, "n_layers": 26, "d_head": 128, "remat": "dots", "microbatch_rows": 1},
    "celerity_1b with 16 routed experts, top-2 (family.moe): the same active parameters",
    "v5p-64",
  ),
]
RECIPES = {r.name: r for r in _ROWS}


def available() -> list[str]:
  return sorted(RECIPES)


def get(name: str) -> Recipe:
  """The recipe `name`: a row of the table, or `path/to/file.py:NAME` (a user's own)."""
  if name.endswith(".py") or ".py:" in name:
    return _from_file(name)
  if name not in RECIPES:
    raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available())}")
  return RECIPES[name]


def _from_file(spec: str) -> Recipe:
  path, _, attr = spec.partition(":")
  if not attr:
    raise ConfigError(f"recipe={spec}: name the recipe in the file, recipe={path}:NAME")
  if not Path(path).is_file():
    raise ConfigError(f"recipe={spec}: no such file {path}")
  module_spec = importlib.util.spec_from_file_location(
    f"celerity_user_recipe_{Path(path).stem}", path
  )
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's code: its error, named, in one line
    raise ConfigError(f"recipe={spec}: {path} failed to load: {type(e).__name__}: {e}") from None
  found = getattr(module, attr, None)
  if isinstance(found, Recipe):
    return found
  if isinstance(found, Config):
    return Recipe(attr, lambda name: found, about=f"{attr} from {path}")
  if callable(found):
    return Recipe(attr, lambda name: _checked(found(), spec), about=f"{attr}() from {path}")
  raise ConfigError(
    f"recipe={spec}: {path} has no {attr!r} that is a Recipe, a Config or a function returning one"
  )


def _checked(cfg, spec: str) -> Config:
  if not isinstance(cfg, Config):
    raise ConfigError(f"recipe={spec}: returned {type(cfg).__name__}, not a Config")
  return cfg


def load(name: str) -> Config:
  return get(name).build()


def configure(name: str, overrides: list[str]) -> Config:
  """Recipe `name` with `section.key=value` overrides applied (shape keys through its family
  rule) and validated, with the model and tokenizer of init.from where one is given
  (init_weights.py): the Config every entry point runs."""
  from celerity_jax import init_weights

  cfg = validate(apply_overrides(get(name).build(overrides), overrides))
  return init_weights.configure(cfg, overrides)


def target_slice(name: str) -> str | None:
  """The Cloud TPU slice a recipe's layout is made to fit (e.g. "v5p-64"); None for recipes
  sized for any machine."""
  return get(name).slice
