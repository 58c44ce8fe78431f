"""Recipes: one module per recipe, each with `config() -> celerity_jax.config.Config`.

`recipe=NAME` on the command line loads `recipes/NAME.py`. Shared shape rules live in `family.py`.
"""
from __future__ import annotations

import importlib
import pkgutil

from celerity_jax.config import Config, ConfigError

DEFAULT = "celerity_tiny"
_HELPERS = {"family"}


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_") and m.name not in _HELPERS)


def target_slice(name: str) -> str | None:
  """The Cloud TPU slice a recipe's layout (mesh, remat, microbatch rows) is made to fit, from the
  recipe module's SLICE (e.g. "v5p-64"); None for recipes sized for any machine."""
  load(name)
  return getattr(importlib.import_module(f"recipes.{name}"), "SLICE", None)


def load(name: str) -> Config:
  if name not in available():
    raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available())}")
  return importlib.import_module(f"recipes.{name}").config()
