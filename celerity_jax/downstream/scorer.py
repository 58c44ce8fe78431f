"""Batched, sharded scoring of token sequences: what downstream evaluation asks of a model.

Rows are right-padded to a bucket length (a power of two, at most the model's context) and
batches to a fixed row count, so a whole evaluation compiles one function per bucket. Padding
never changes a real position's logits: attention is causal, and padded positions have weight 0.
The params stay where they are (a run's mesh in training, or restored into their shards by
`restore` for a finished run); rows are split over the mesh's data axes where they divide, and
the few numbers each batch returns are gathered on every process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from celerity_jax import sharding
from celerity_jax.models.layers import Forward


def restore(run_dir, step: int, cfg, mesh):
  """(graphdef, params) of a run's checkpoint `step`, restored straight into their shards on
  `mesh` (any process count; the optimizer state stays on disk)."""
  from celerity_jax.checkpoint import Checkpointer
  from celerity_jax.models.decoder import Decoder
  from celerity_jax.parametrization import multipliers

  mult = multipliers(cfg.param, cfg.model)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg.model, mult, nnx.Rngs(params=0))))
  specs = sharding.named(mesh, sharding.param_specs(state, mesh))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(state), specs
  )
  reader = Checkpointer(run_dir / "checkpoints", read_only=True)
  try:
    return graphdef, reader.restore_params(step, abstract)
  finally:
    reader.close()


def bucket(length: int, limit: int) -> int:
  """The padded length for a row of `length` tokens: the next power of two (at least 16), at
  most `limit`."""
  return min(limit, max(16, 1 << (length - 1).bit_length()))


class Scorer:
  def __init__(self, graphdef, params, mesh, cfg, batch_rows: int):
    self.params, self.mesh, self.cfg, self.batch_rows = params, mesh, cfg, batch_rows
    self.max_length = cfg.seq_len
    split = batch_rows % sharding.data_parallel_size(dict(mesh.shape)) == 0
    self.rows = NamedSharding(
      mesh, sharding.logical_spec(("batch" if split else None,), "sampling")
    )
    self.grid = NamedSharding(
      mesh, sharding.logical_spec(("batch" if split else None, "length"), "sampling")
    )
    everywhere = NamedSharding(mesh, jax.sharding.PartitionSpec())  # results: on every process
    forward = Forward.planned(cfg, mesh.devices.flat[0].platform, mesh=mesh)

    def logits(params, tokens_BxL):
      return nnx.merge(graphdef, params)(tokens_BxL, forward=forward)[0]

    def score(params, tokens_BxL, targets_BxL, weights_BxL):
      logits_BxLxV = logits(params, tokens_BxL)
      logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
      picked_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
      greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
      total_B = jnp.sum(picked_BxL * weights_BxL, axis=-1)
      return total_B, jnp.all(greedy_BxL | (weights_BxL == 0), axis=-1)

    def next_token(params, tokens_BxL, last_B, key, temperature):
      logits_BxV = logits(params, tokens_BxL)[jnp.arange(tokens_BxL.shape[0]), last_B]
      greedy = jnp.argmax(logits_BxV, axis=-1)
      sampled = jax.random.categorical(key, logits_BxV / jnp.maximum(temperature, 1e-6), axis=-1)
      return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    self._score = jax.jit(score, out_shardings=(everywhere, everywhere))
    self._next = jax.jit(next_token, out_shardings=everywhere)

  def _put(self, array, where):
    return jax.make_array_from_callback(array.shape, where, lambda index: array[index])

  def score(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
    """For each (input tokens, target tokens of the same length, n scored at the end): the summed
    log-probability of the last n targets and whether each is the greedy choice. At most
    `batch_rows` rows, none longer than the context."""
    n = len(rows)
    length = bucket(max(len(r[0]) for r in rows), self.max_length)
    tokens = np.zeros((self.batch_rows, length), np.int32)
    targets = np.zeros_like(tokens)
    weights = np.zeros((self.batch_rows, length), np.float32)
    for i, (inp, tgt, scored) in enumerate(rows):
      tokens[i, : len(inp)], targets[i, : len(tgt)] = inp, tgt
      weights[i, len(inp) - scored : len(inp)] = 1.0
    total, greedy = self._score(
      self.params,
      self._put(tokens, self.grid),
      self._put(targets, self.grid),
      self._put(weights, self.grid),
    )
    total, greedy = jax.device_get((total, greedy))
    return [(float(total[i]), bool(greedy[i])) for i in range(n)]

  def next_tokens(self, rows: list[list[int]], key, temperature: float) -> list[int]:
    """The next token after each row (greedy at temperature 0, else sampled)."""
    n = len(rows)
    length = bucket(max(len(r) for r in rows), self.max_length)
    tokens = np.zeros((self.batch_rows, length), np.int32)
    last = np.zeros((self.batch_rows,), np.int32)
    for i, row in enumerate(rows):
      tokens[i, : len(row)], last[i] = row, len(row) - 1
    out = self._next(
      self.params,
      self._put(tokens, self.grid),
      self._put(last, self.rows),
      key,
      jnp.float32(temperature),
    )
    return [int(t) for t in jax.device_get(out)[:n]]
