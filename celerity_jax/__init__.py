"""celerity_jax: predictable LLM-family training with loss-curve collapse (JAX / Flax NNX)."""

from celerity_jax import platform as _platform

_platform.quiet_libtpu_off_tpu()  # before anything imports jax
if _platform.running_a_command():
  _platform.one_cpu_device_per_core()  # see platform.py: data-parallel over the CPU's cores
  _platform.reexec_with_hugepages()  # see platform.py: ~1.5x faster CPU steps
