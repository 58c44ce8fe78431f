"""init.from: a run starts from a Hugging Face Llama or Nemotron checkpoint (sharded safetensors,
made by transformers), from this project's own export, or from another run's checkpoint; the
model computes what the checkpoint computed, and training goes on from there."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL
from flax import nnx

from celerity_jax import init_weights, recipes
from celerity_jax.main import main
from celerity_jax.models.decoder import Decoder
from celerity_jax.parametrization import multipliers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(200)]
# SMALL's settings less its shape, which the checkpoint fixes
RUN = [a for a in SMALL if not a.startswith("model.") or a.startswith("model.seq_len")]


def word_tokenizer(path):
  """A tokenizer.json of 202 whole words (the end-of-text token first), for text runs."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.save(str(path / "tokenizer.json"))


def hf_checkpoint(kind: str, out, tokenizer: bool = True):
  """A random tiny `kind` model saved by transformers in several safetensors shards, with every
  weight random (norm gains and biases included, which init leaves at 1 and 0)."""
  torch.manual_seed(0)
  shape = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
  )
  if kind == "llama":
    config = transformers.LlamaConfig(**shape, rope_theta=5000.0, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config)
  elif kind == "llama3":  # Llama 3.1's scaled RoPE; every regime occurs at this original context
    rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    config = transformers.LlamaConfig(**shape, rope_parameters=rope, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
  else:  # transformers' Nemotron rotates half of each head by default
    config = transformers.NemotronConfig(**shape, norm_eps=1e-5)
    model = transformers.NemotronForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.02 * torch.randn_like(p) * 5 + (0.1 if p.ndim == 1 else 0.0))
  model.save_pretrained(out, max_shard_size="40KB")
  if tokenizer:
    word_tokenizer(out)
  return model


def configured(*overrides):
  return recipes.configure("celerity_tiny", [*RUN, *overrides])


def our_logits(cfg, tokens):
  mult = multipliers(cfg.param, cfg.model)
  model = Decoder(cfg.model, mult, nnx.Rngs(params=0))
  params = init_weights.params(cfg, mult, nnx.to_pure_dict(nnx.state(model)))
  graphdef = nnx.graphdef(model)
  logits, _ = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))(jnp.asarray(tokens))
  return np.asarray(logits)


@pytest.mark.parametrize("kind", ["llama", "llama3", "nemotron"])
def test_a_transformers_checkpoint_computes_its_logits_here_and_trains(kind, tmp_path):
  hf = tmp_path / "hf"
  model = hf_checkpoint(kind, hf)
  assert len(list(hf.glob("model-*.safetensors"))) >= 2  # sharded, with its index
  cfg = configured(f"init.from={hf}")
  m = cfg.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_head, m.d_ff) == (32, 2, 4, 2, 8, 96)
  assert m.rope_fraction == (0.5 if kind == "nemotron" else 1.0)
  assert m.rope_factor == (8.0 if kind == "llama3" else 0.0)
  assert cfg.data.tokenizer == str(hf / "tokenizer.json")
  assert cfg.collapse.reference == "none"  # the surrogate's curve is a run's from random weights
  tokens = np.random.default_rng(0).integers(0, 256, (2, 32))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(our_logits(cfg, tokens), theirs, atol=1e-4, rtol=1e-4)

  corpus = tmp_path / "corpus.jsonl"
  rng = np.random.default_rng(1)
  docs = [json.dumps({"text": " ".join(rng.choice(WORDS, 300))}) for _ in range(60)]
  corpus.write_text("\n".join(docs) + "\n")
  run = tmp_path / "run"
  args = [
    "recipe=celerity_tiny",
    *[a for a in RUN if not a.startswith("data.corpus")],
    f"init.from={hf}",
    f"data.paths={corpus}",
    "data.eval_frac=0.2",
    f"data.cache_dir={tmp_path / 'cache'}",
    f"run.dir={run}",
    "train.stop_step=2",
  ]
  assert main(args) == 0
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  saved = json.loads((run / "config.json").read_text())
  assert saved["config"]["init"]["from"] == str(hf)


def test_export_then_import_is_bit_exact_and_a_run_starts_from_another_runs_params(tmp_path):
  """The default architecture (ALiBi) exports through the shipped class, which applies the
  multipliers itself: the import gets every weight back bit for bit. Starting from a run's
  checkpoint takes its params as they are."""
  from celerity_jax import trained as trained_lib
  from celerity_jax.commands.export import export

  first = tmp_path / "first"
  assert main(["recipe=celerity_tiny", *SMALL, f"run.dir={first}", "train.stop_step=4"]) == 0
  source = trained_lib.load(first)
  export(first, None, tmp_path / "hf", "hf")
  for origin in (tmp_path / "hf", first):
    cfg = configured(f"init.from={origin}")
    mult = multipliers(cfg.param, cfg.model)
    got = init_weights.params(cfg, mult, source.params)
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(source.params), jax.tree.leaves(got), strict=True
    ):
      assert np.array_equal(a, b), (origin.name, path)

  # another parameterization's multipliers: the weights are rescaled to compute the same logits
  other = configured(
    f"init.from={first}", "param.alpha_in=4.0", "param.alpha_out=2", "param.l_base=1"
  )
  tokens = np.random.default_rng(0).integers(0, other.model.vocab_size, (2, 16))
  before = np.asarray(source.model()(jnp.asarray(tokens))[0])
  np.testing.assert_allclose(our_logits(other, tokens), before, rtol=1e-5, atol=1e-5)

  # runs from the checkpoint and from the export start from the same params: the same losses,
  # bit for bit, well below where the first run started
  losses = {}
  for origin in (first, tmp_path / "hf"):
    run = tmp_path / f"from_{origin.name}"
    args = ["recipe=celerity_tiny", *RUN, f"run.dir={run}", f"init.from={origin}"]
    assert main([*args, "train.stop_step=2"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses[origin.name] = [r["loss"] for r in rows if "loss" in r]
  assert losses["first"] == losses["hf"] and len(losses["hf"]) == 2
  rows = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
  assert losses["hf"][0] < [r["loss"] for r in rows if "loss" in r][0] - 0.5


def test_a_folded_export_comes_back_within_an_ulp(tmp_path):
  """A Llama-shaped run exports to the stock class with the multipliers folded in (a float32
  product); the import divides them out again: each weight within one ulp of the run's, and the
  re-export of the import is the same file, bit for bit."""
  from celerity_jax import trained as trained_lib
  from celerity_jax.commands.export import export

  llama = ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "param.l_base=1"]
  first = tmp_path / "first"
  args = ["recipe=celerity_tiny", *SMALL, *llama, f"run.dir={first}", "train.stop_step=2"]
  assert main(args) == 0
  export(first, None, tmp_path / "hf", "hf")
  source = trained_lib.load(first)
  cfg = configured(f"init.from={tmp_path / 'hf'}", *llama)
  got = init_weights.params(cfg, multipliers(cfg.param, cfg.model), source.params)
  for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(got), strict=True):
    ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
