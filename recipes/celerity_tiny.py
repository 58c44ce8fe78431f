"""celerity_tiny: the CPU default; about five minutes on 2 CPU cores.

Shape: d_model 64, 1 head x 64, 2 layers, d_ff 512, vocab 1024, context 128 -> N = 295,552.
Celerity rules (CompleteP, ALiBi, squared ReLU, linear D2Z, tau_opt(20) = 0.175) in float32.
At 20 TPP: D = 5.9M tokens, B = 377 x 128 tokens, T = 122 steps, 12 warmup steps.
Data: the built-in `stdlib` corpus (the interpreter's standard library source, ~13M tokens with a
1024-piece BPE tokenizer built on first use and cached); held-out loss every 20 steps; a checkpoint
every 25 steps (rerun the same command to resume).

  python -m celerity_jax.main recipe=celerity_tiny
"""
import dataclasses

from recipes.family import celerity


def config():
  cfg = celerity("celerity_tiny", d_model=64, n_layers=2, d_head=64, tpp=20.0, vocab_size=1024,
                 seq_len=128, dtype="float32", l_base=2)
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=20),
                             checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=25))
