"""CLI: python -m celerity_jax.main recipe=NAME [section.key=value ...] [--print-config]

Exit status: 0 done (or stopped by SIGTERM/SIGINT after saving a checkpoint), 2 configuration
error (message names the key), 3 data error (names the file), 4 halted on non-finite losses,
5 halted on a collapse alert (collapse.policy=halt).
"""
from __future__ import annotations

import json
import sys

from celerity_jax.config import ConfigError, apply_overrides, validate
from celerity_jax.data import DataError


def parse(argv: list[str]):
  """Returns (config, print_only) or raises ConfigError."""
  import recipes
  flags = [a for a in argv if a.startswith("--")]
  for flag in flags:
    if flag not in ("--print-config", "--help"):
      raise ConfigError(f"unknown flag {flag!r}; known: --print-config, --help")
  args = [a for a in argv if not a.startswith("--")]
  names = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
  name = names[-1] if names else recipes.DEFAULT
  cfg = recipes.load(name)
  cfg = validate(apply_overrides(cfg, [a for a in args if not a.startswith("recipe=")]))
  return cfg, "--print-config" in flags


def run_cli(action) -> int:
  """Runs action() and maps the contract's errors to exit statuses with a one-line message."""
  from celerity_jax.train import loop
  try:
    action()
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    return 3
  except loop.RunHalted as e:
    print(f"halted: {e}", file=sys.stderr)
    return e.code
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--help" in argv:
    print(__doc__.strip())
    return 0

  def train_or_print():
    import jax
    from celerity_jax import distributed
    from celerity_jax.resolve import resolve
    from celerity_jax.train import loop
    cfg, print_only = parse(argv)
    if not print_only:           # printing allocates nothing, so it never waits for other hosts
      distributed.initialize(cfg.dist)
    resolved = resolve(cfg, len(jax.devices()))
    if print_only:
      print(json.dumps(loop.describe(cfg, resolved), indent=2))
    else:
      loop.run(cfg)

  return run_cli(train_or_print)


if __name__ == "__main__":
  sys.exit(main())
