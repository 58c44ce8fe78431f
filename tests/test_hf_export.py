"""Hugging Face export: for every architecture the export supports, transformers (PyTorch, CPU)
loads the directory and computes the JAX model's logits to 1e-4, and its greedy generation
equals ours; the tokenizer encodes and decodes as the run's sentencepiece model does."""

import glob
import json
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from celerity_jax.hf import convert
from celerity_jax.models.decoder import Decoder
from celerity_jax.parametrization import multipliers
from celerity_jax.sampling import Sampler, Settings
from celerity_jax.trained import Trained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = {
  "celerity": ([], "CelerityForCausalLM"),  # ALiBi, LayerNorm, squared ReLU
  "llama": (
    ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_heads=1"],
    "LlamaForCausalLM",
  ),
  # Llama 3.1's scaled RoPE, its original context short enough that every regime occurs
  "llama3": (
    ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.rope_factor=8"]
    + ["model.rope_original_context=64"],
    "LlamaForCausalLM",
  ),
  # LayerNorm, squared ReLU, RoPE on half of each head (as Nemotron-4 and Minitron)
  "nemotron": (["model.position=rope", "model.rope_fraction=0.5"], "NemotronForCausalLM"),
  "rope_layernorm_swiglu": (
    ["model.position=rope", "model.mlp=swiglu", "model.rope_fraction=0.5"]
    + ["model.rope_factor=8", "model.rope_original_context=64"],
    "CelerityForCausalLM",
  ),
}


def random_trained(small, overrides):
  """A model whose every weight, norm gains and biases included, is random (at init the norms
  are 1 and 0, which would hide a mistake in their mapping)."""
  cfg = small("model.n_layers=3", "model.n_heads=4", "param.l_base=1", *overrides)
  model = Decoder(cfg.model, multipliers(cfg.param, cfg.model), nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [
    np.asarray(
      leaf * (1 + 0.3 * jax.random.normal(k, leaf.shape)) + 0.05 * jax.random.normal(k, leaf.shape)
    )
    for leaf, k in zip(leaves, keys, strict=True)
  ]
  params = jax.tree.unflatten(tree, noisy)
  params["unembed"] = params["unembed"] * 20  # separate the top logits, so greedy has no near-ties
  return Trained("random", 0, cfg, {}, params, None)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_computes_our_logits_and_greedy_tokens(small, tmp_path, variant):
  overrides, architecture = VARIANTS[variant]
  trained = random_trained(small, overrides)
  summary = convert.write(trained, tmp_path / "hf")
  assert summary["architecture"] == architecture
  assert summary["model_needs_trust_remote_code"] == (architecture == "CelerityForCausalLM")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "hf", trust_remote_code=summary["model_needs_trust_remote_code"]
  ).eval()
  assert type(hf).__name__ == architecture
  assert sum(p.numel() for p in hf.parameters()) == summary["n_params"]
  model = trained.model()
  tokens = np.asarray(
    jax.random.randint(jax.random.key(2), (2, 32), 0, trained.cfg.model.vocab_size)
  )
  ours = np.asarray(model(jnp.asarray(tokens))[0])
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(ours).max() > 1.0  # logits of a size that makes the comparison mean something
  assert np.abs(ours - theirs).max() <= 1e-4

  prompt = [3, 17, 42, 5]
  sampler = Sampler(model, Settings(max_tokens=10), len(prompt), trained.cfg.mesh)
  greedy = sampler.generate(prompt).tokens[0]
  with torch.no_grad():
    generated = hf.generate(
      torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
    )
  np.testing.assert_array_equal(generated[0, len(prompt) :].numpy(), greedy)


def test_mixtures_of_experts_are_refused_by_name(small, tmp_path):
  trained = random_trained(small, ["model.experts=4"])
  with pytest.raises(ValueError, match="mixture-of-experts models are not supported"):
    convert.write(trained, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def stdlib_texts():
  files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/json/*.py"))
  texts = [open(f, encoding="utf-8").read()[:4000] for f in files]
  return texts + ["def f(x):\n    return 12345 + x  # tab\there", "ünïcode ☃ 𝔘 — 你好", "x" * 50]


def test_export_command_writes_a_model_and_tokenizer_transformers_loads(trained_text_run, tmp_path):
  from celerity_jax import trained as trained_lib

  out = tmp_path / "hf"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "celerity_jax.commands.export",
      str(trained_text_run),
      "--format",
      "hf",
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout)
  assert summary["step"] == 8 and summary["architecture"] == "CelerityForCausalLM"
  assert {"config.json", "model.safetensors", "tokenizer.model", "modeling_celerity.py"} <= set(
    summary["files"]
  )
  run = trained_lib.load(trained_text_run)
  sp = run.tokenizer
  exact = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
  stock = transformers.AutoTokenizer.from_pretrained(out)  # transformers' own conversion
  assert type(exact).__name__ == "CelerityTokenizer"
  for text in stdlib_texts():
    ids = sp.encode([text])[0].tolist()
    assert exact(text)["input_ids"] == [3] + ids  # the document boundary first, as in training
    assert exact.decode([3] + ids, skip_special_tokens=True) == text
    assert stock(text, add_special_tokens=False)["input_ids"] == ids
  # the exported model continues a text as our sampler (tools.sample) does
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
  inputs = exact("def ", return_tensors="pt")
  with torch.no_grad():
    generated = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
  prompt = [3] + sp.encode(["def "])[0].tolist()  # what tools.sample decodes from
  sampler = Sampler(run.model(), Settings(max_tokens=12), len(prompt), run.cfg.mesh)
  ours = sampler.generate(prompt, stop=3).tokens[0].tolist()
  theirs = generated[0, inputs["input_ids"].shape[1] :].tolist()
  assert theirs[: len(ours)] == ours


def test_hf_export_errors_are_one_line(trained_text_run, tmp_path, capsys):
  from celerity_jax.commands import export
  from celerity_jax.main import run_cli

  for args, message in [
    (["--format", "hf"], "export --format hf: give --out DIR"),
    (["--format", "hf", "--out", "gs://bucket/x"], "writes a local directory"),
    (["--format", "onnx"], "invalid choice: 'onnx'"),
  ]:
    assert run_cli(lambda args=args: export.main([str(trained_text_run), *args])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_shipped_alibi_slopes_are_ours():
  """modeling_celerity.py must import only torch and transformers, so it carries its own copy of
  the slope rule: the two agree for every head count, powers of 2 or not."""
  from celerity_jax.hf import modeling_celerity
  from celerity_jax.models.attention import alibi_slopes

  for n in range(1, 33):
    np.testing.assert_array_equal(modeling_celerity.alibi_slopes(n).numpy(), alibi_slopes(n))
