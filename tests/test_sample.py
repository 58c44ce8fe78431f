"""Sampling: the KV-cached decode equals the full forward pass, token by token, for every
attention variant; the sampling rules; the command line on a trained run."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from celerity_jax.models import decode
from celerity_jax.models.decoder import Decoder
from celerity_jax.parametrization import multipliers
from celerity_jax.sampling import Sampler, Settings

VARIANTS = {
  "alibi": [],  # the Celerity default: ALiBi, LayerNorm, squared ReLU
  "rope_gqa_swiglu_rms": [
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.n_heads=4",
    "model.n_kv_heads=2",
  ],
  "moe": ["model.experts=4", "model.top_k=2", "model.moe_every=2", "model.n_layers=4"],
}


def random_model(small, overrides, seed=0):
  cfg = small(*overrides)
  model = Decoder(cfg.model, multipliers(cfg.param, cfg.model), nnx.Rngs(params=seed))
  # at init the logits are nearly uniform; larger unembedding weights make argmax ties unlikely
  model.unembed[...] = model.unembed[...] * 30
  return cfg, model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_the_full_forward_at_every_position(small, variant):
  cfg, model = random_model(small, VARIANTS[variant])
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.model.vocab_size)
  full, _ = model(tokens)
  forward = nnx.jit(decode.forward)  # one compile for the prompt, one for every later token
  cache = decode.empty_cache(cfg.model, 2, 24)
  prefill, cache = forward(model, tokens[:, :10], cache, jnp.int32(0))  # a 10-token prompt
  steps = [prefill]
  for position in range(10, 24):  # then one token at a time
    logits, cache = forward(model, tokens[:, position : position + 1], cache, jnp.int32(position))
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  assert float(jnp.abs(cached - full).max()) < 1e-4 * float(jnp.abs(full).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decode_equals_argmax_of_the_full_forward_recomputed(small, variant):
  cfg, model = random_model(small, VARIANTS[variant])
  prompt = [5, 17, 3, 99, 42]
  sampler = Sampler(model, Settings(max_tokens=12), len(prompt), cfg.mesh)
  generated = sampler.generate(prompt).tokens[0]
  assert len(generated) == 12
  # the model is causal, so one full pass over the whole sequence recomputes every position
  logits, _ = model(jnp.asarray([prompt + [int(t) for t in generated]]))
  recomputed = np.asarray(jnp.argmax(logits[0, len(prompt) - 1 : -1], axis=-1))
  np.testing.assert_array_equal(recomputed, generated)


def test_rows_are_sharded_over_the_mesh_and_agree_with_one_device(small):
  cfg, model = random_model(small, VARIANTS["rope_gqa_swiglu_rms"])
  settings = Settings(max_tokens=6, batch=8, temperature=0.0)
  on_mesh = Sampler(model, settings, 3, cfg.mesh)
  assert on_mesh.mesh.size == 8 and not on_mesh.cache_sharding.k[0].is_fully_replicated
  alone = Sampler(model, settings, 3, cfg.mesh, devices=jax.devices()[:1])
  a, b = on_mesh.generate([1, 2, 3]).tokens, alone.generate([1, 2, 3]).tokens
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert all((row == a[0]).all() for row in a)  # greedy: every row the same


def test_sampling_rules(small):
  cfg, model = random_model(small, [])
  logits = jax.random.normal(jax.random.key(0), (4096, 16)) * 3
  keys = jax.random.key(7)
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  drawn = np.asarray(decode.choose(logits, keys, 1.0, 3, 1.0))
  assert all(d in row for d, row in zip(drawn, top3, strict=True))  # top-k: only the k best
  assert len(set(drawn.tolist())) > 3  # ... and not always the same row's best
  greedy = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_array_equal(np.asarray(decode.choose(logits, keys, 1.0, 1, 1.0)), greedy)
  np.testing.assert_array_equal(np.asarray(decode.choose(logits, keys, 1.0, 0, 1e-6)), greedy)
  # nucleus: a token outside the smallest set reaching top_p is never drawn
  probs = np.asarray(jax.nn.softmax(logits, -1))
  drawn = np.asarray(decode.choose(logits, keys, 1.0, 0, 0.5))
  for p, d in zip(probs, drawn, strict=True):
    order = np.argsort(-p)
    needed = int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1
    assert d in order[:needed]
  # the same seed gives the same samples, another seed others
  settings = Settings(max_tokens=8, temperature=1.0, batch=2, seed=3)
  sampler = Sampler(model, settings, 2, cfg.mesh)
  first, again = sampler.generate([1, 2]).tokens, sampler.generate([1, 2]).tokens
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not (first[0] == first[1]).all()  # rows draw independently


def test_generation_stops_at_the_stop_token(small):
  cfg, model = random_model(small, [])
  sampler = Sampler(model, Settings(max_tokens=10), 2, cfg.mesh)
  free = sampler.generate([1, 2]).tokens[0]
  stop = int(free[3])
  cut = sampler.generate([1, 2], stop=stop).tokens[0]
  first = int(np.argmax(free == stop))
  np.testing.assert_array_equal(cut, free[: first + 1])


@pytest.mark.parametrize(
  "args, message",
  [
    (["--max-tokens", "0"], "--max-tokens 0: must be at least 1"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--step", "999"], "--step 999: no complete checkpoint at that step"),
  ],
)
def test_bad_sampling_arguments_are_one_line_errors(trained_text_run, args, message, capsys):
  from celerity_jax.commands import sample
  from celerity_jax.main import run_cli

  argv = [str(trained_text_run), "--prompt", "x", *args]
  assert run_cli(lambda: sample.main(argv)) == 2  # anything but the contract's errors raises
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_sample_command_streams_text_from_a_trained_run(trained_text_run):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "celerity_jax.commands.sample",
      str(trained_text_run),
      "--prompt",
      "def ",
      "--max-tokens",
      "16",
      "--json",
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  record = json.loads(result.stdout)
  assert record["step"] == 8 and record["prompt"] == "def "
  (sample,) = record["samples"]
  assert sample["text"].startswith("def ") and len(sample["ids"]) == 16
  assert record["tokens_per_s"] > 0
