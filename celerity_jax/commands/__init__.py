"""The installed commands, `python -m celerity_jax.commands.NAME` (README, "Commands").

Importing this package from such a command line prepares the process before any command imports
jax (platform.prepare_command); importing it anywhere else changes nothing."""

from celerity_jax import platform as _platform

if _platform.command_module().startswith(__name__ + "."):
  _platform.prepare_command()
