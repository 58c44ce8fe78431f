"""A deterministic synthetic token stream (`data.corpus=synthetic`), for tests and benchmarks.

Tokens follow a fixed random sparse Markov chain (each token has `branching` possible successors),
so a model can learn it: the loss falls from ln(vocab) towards ln(branching). The chain is fixed by
`chain_seed`; which sequences a step sees is a pure function of (seed, step).
"""

from __future__ import annotations

import numpy as np


class SyntheticTokens:
  def __init__(
    self,
    vocab_size: int,
    seq_len: int,
    global_batch: int,
    seed: int,
    rows=None,
    branching: int = 4,
    chain_seed: int = 1234,
  ):
    chain_rng = np.random.default_rng(chain_seed)
    self.successors_VxC = chain_rng.integers(0, vocab_size, (vocab_size, branching), np.int32)
    self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
    self.global_batch = global_batch
    self.rows = slice(None) if rows is None else np.asarray(rows)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch's `rows` (default all) at `step`: inputs and next-token targets, int32 BxL."""
    rng = np.random.default_rng([self.seed, step])
    b, length = self.global_batch, self.seq_len + 1
    choice_BxL = rng.integers(0, self.successors_VxC.shape[1], (b, length), np.int32)
    tokens_BxL = np.empty((b, length), np.int32)
    tokens_BxL[:, 0] = rng.integers(0, self.vocab_size, b)
    for i in range(1, length):
      tokens_BxL[:, i] = self.successors_VxC[tokens_BxL[:, i - 1], choice_BxL[:, i]]
    tokens_BxL = tokens_BxL[self.rows]
    return {"inputs": tokens_BxL[:, :-1], "targets": tokens_BxL[:, 1:]}


def placed_batches(cfg, resolved, mesh, steps: int = 1, seed: int = 0) -> list[dict]:
  """Synthetic batches for steps 0..steps-1 of the run's shape, placed on `mesh` as the step takes
  them (for tools and tests that time or check a step without a corpus)."""
  from celerity_jax.sharding import place_batch, process_rows

  data = SyntheticTokens(
    cfg.model.vocab_size,
    cfg.model.seq_len,
    resolved.batch_seqs,
    seed,
    rows=process_rows(mesh, resolved.batch_seqs),
  )
  return [place_batch(data.batch(step), mesh, resolved.batch_seqs) for step in range(steps)]
