"""celerity_jax: predictable LLM-family training with loss-curve collapse (JAX / Flax NNX)."""

from celerity_jax import platform as _platform

_platform.quiet_libtpu_off_tpu()  # before anything imports jax (environment defaults only)
