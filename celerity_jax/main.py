"""CLI: python -m celerity_jax.main recipe=NAME [section.key=value ...] [--print-config]

Exit status: 0 done (or stopped by SIGTERM/SIGINT: after saving a checkpoint, or before the first
step, when there is nothing to save), 2 configuration error (message names the key), 3 data error
(names the file), 4 halted on non-finite losses, 5 halted on a collapse alert
(collapse.policy=halt), 6 no usable checkpoint (every one in run.dir is damaged), 7 no space
left on a device it writes to (run.dir, the data cache, an export; the same command resumes once
there is space).
"""

from __future__ import annotations

import json
import sys

from celerity_jax.cli import parse, run_cli  # (loads no jax: see the end)


def main(argv: list[str] | None = None, linger: bool = False) -> int:
  """`linger`: this is the command's own process, whose signal guard stays until it exits."""
  argv = sys.argv[1:] if argv is None else argv
  if "--help" in argv:
    print(__doc__.strip())
    return 0
  from celerity_jax.train import signals

  with signals.guarded(linger):  # first thing: a signal during start-up exits cleanly
    return run_cli(lambda: _train_or_print(argv))


def _train_or_print(argv: list[str]):
  cfg, print_only = parse(argv)
  if print_only:  # allocates nothing and never waits for other hosts
    import jax

    from celerity_jax.resolve import describe, resolve

    print(json.dumps(describe(cfg, resolve(cfg, jax.device_count())), indent=2))
    return
  from celerity_jax import distributed
  from celerity_jax.train import loop

  distributed.initialize(cfg.dist)
  loop.run(cfg)


if __name__ == "__main__":
  from celerity_jax import platform

  platform.prepare_command()  # before jax loads: nothing imported above loads it
  sys.exit(main(linger=True))
