"""celerity_tiny: the CPU default; an alias of celerity_nano_4 (with its own run directory).

Shape: d_model 64, 4 heads x 16, 2 layers, d_ff 512, vocab 512, context 128 -> N = 230,016.
Celerity rules (CompleteP, ALiBi, squared ReLU, linear D2Z, tau_opt(20) = 0.175) in float32, on
the built-in stdlib corpus (BPE tokenizer built on first use and cached); held-out loss every 20
steps; a checkpoint every 25 (rerun the same command to resume).

  python -m celerity_jax.main recipe=celerity_tiny
"""
from recipes.family import nano


def config():
  return nano("celerity_tiny", d_model=64)
