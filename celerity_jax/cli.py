"""Command-line plumbing shared by every entry point: the `section.key=value` argument parser, the
argparse subclass the commands use, and the map from the contract's errors to exit statuses."""

from __future__ import annotations

import argparse
import sys

from celerity_jax.config import ConfigError
from celerity_jax.data import DataError


def parse(argv: list[str]):
  """Returns (config, print_only) or raises ConfigError."""
  from celerity_jax import recipes

  flags = [a for a in argv if a.startswith("--")]
  for flag in flags:
    if flag not in ("--print-config", "--help"):
      raise ConfigError(f"unknown flag {flag!r}; known: --print-config, --help")
  args = [a for a in argv if not a.startswith("--")]
  cfg = recipes.configure(recipe_name(args), [a for a in args if not a.startswith("recipe=")])
  return cfg, "--print-config" in flags


def recipe_name(args: list[str]) -> str:
  """The recipe `recipe=NAME` names; the last one wins, like every other key."""
  from celerity_jax import recipes

  names = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
  return names[-1] if names else recipes.DEFAULT


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the tools, whose usage errors become one-line config errors (exit 2)."""

  def error(self, message):
    raise ConfigError(f"{self.prog}: {message} (see --help)")


def run_cli(action) -> int:
  """Runs action() and maps the contract's errors to exit statuses with a one-line message. Every
  entry point (main and tools) goes through here. An action returning an int sets the status."""
  from celerity_jax.checkpoint import CheckpointUnusable, quiet_abandoned_io
  from celerity_jax.train.events import RunHalted

  try:
    status = action()
  except ConfigError as e:
    return _fail("config error", e, 2)
  except DataError as e:
    return _fail("data error", e, 3)
  except RunHalted as e:
    return _fail("halted", e, e.code)
  except CheckpointUnusable as e:
    return _fail("checkpoint error", e, 6)
  except Exception as e:
    from celerity_jax import storage

    if storage.out_of_space(e):
      quiet_abandoned_io()
      return _fail("disk full", storage.out_of_space_message(e), 7)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _fail(
      "config error",
      f"out of memory: the model, batch or layout does not fit the "
      f"devices (model.*, train.batch_size, train.microbatch_rows, mesh.*, "
      f"model.remat): {str(e).splitlines()[0][:300]}",
      2,
    )
  return status if isinstance(status, int) else 0


def _fail(kind: str, error, status: int) -> int:
  message = " ".join(str(error).split())  # exactly one line, whatever the message holds
  print(f"{kind}: {message}", file=sys.stderr)
  return status
