"""Recipes: named members of the model families, each a call to a family rule (family.py).

`recipe=NAME` on the command line loads RECIPES[NAME]. A recipe states only its choices: the
family, the shape and, for pod recipes, the slice its layout is made for. Every derived number (N,
D, B, T, warmup, eta, lambda, tau, FLOPs) comes from the config:
`python -m celerity_jax.commands.plan recipe=NAME` prints the family's table,
`python -m celerity_jax.main recipe=NAME --print-config` one member's. Adding a member is one row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from celerity_jax.recipes.family import celerity, gpu, moe, nano

from celerity_jax.config import Config, ConfigError

DEFAULT = "celerity_tiny"


@dataclass(frozen=True)
class Recipe:
  name: str
  build: Callable[[], Config]
  about: str
  slice: str | None = None  # the Cloud TPU slice its layout (mesh, remat, rows) fits


def _pod(name, d_model, n_layers, d_head, slice_, about) -> Recipe:
  """A Celerity member at context 8192 with the layout pod recipes ship: FSDP over every chip,
  `dots` remat, one sequence per device per microbatch (family.celerity)."""
  return Recipe(
    name,
    partial(
      celerity,
      name,
      d_model=d_model,
      n_layers=n_layers,
      d_head=d_head,
      remat="dots",
      microbatch_rows=1,
    ),
    about,
    slice_,
  )


def _nano(name, d_model, about, **kw) -> Recipe:
  return Recipe(name, partial(nano, name, d_model=d_model, **kw), about)


def _moe_nano(name, d_model) -> Recipe:
  dense = name.replace("moe_", "")
  return Recipe(
    name,
    lambda: moe(nano(name, d_model=d_model), experts=8, top_k=2, aux_loss=0.1),
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
    Recipe(f"celerity_gpu_{size}", partial(gpu, f"celerity_gpu_{size}", d_model=d), about)
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
    lambda: moe(
      celerity(
        "celerity_moe_1b", d_model=1152, n_layers=26, d_head=128, remat="dots", microbatch_rows=1
      ),
      experts=16,
      top_k=2,
    ),
    "celerity_1b with 16 routed experts, top-2 (family.moe): the same active parameters",
    "v5p-64",
  ),
]
RECIPES = {r.name: r for r in _ROWS}


def available() -> list[str]:
  return sorted(RECIPES)


def get(name: str) -> Recipe:
  if name not in RECIPES:
    raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available())}")
  return RECIPES[name]


def load(name: str) -> Config:
  return get(name).build()


def target_slice(name: str) -> str | None:
  """The Cloud TPU slice a recipe's layout is made to fit (e.g. "v5p-64"); None for recipes
  sized for any machine."""
  return get(name).slice
