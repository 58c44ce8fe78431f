"""Experiments, benchmarks and profilers, run from a checkout as `python -m tools.NAME` (they are
not installed).

Importing this package from such a command line prepares the process as the installed commands
do (celerity_jax.platform.prepare_command), so benchmarks measure what a run gets."""

from celerity_jax import platform as _platform

if _platform.command_module().startswith(__name__ + "."):
  _platform.prepare_command()
