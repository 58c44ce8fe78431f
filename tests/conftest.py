"""Test setup: 8 fake CPU devices and a persistent compilation cache, before jax initializes."""

import logging
import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never run on a Compute Engine VM with credentials to find: the Cloud Storage clients
# (google.auth for gcsfs, tensorstore's own) are told there is no metadata server, at a port that
# refuses at once, instead of probing 169.254.169.254 / metadata.google.internal, which on a
# network that drops packets costs each new client (one per thread in gcsfs) seconds of timeouts.
# Set before anything imports google.auth (it reads them once) and inherited by subprocesses.
os.environ.update(
  {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
  }
)
# transformers loads exports from local directories only: never ask the Hugging Face Hub
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
for noisy in ("google.auth", "gcsfs"):  # "no credentials" warnings, one per client
  logging.getLogger(noisy).setLevel(logging.ERROR)

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from celerity_jax import recipes  # noqa: E402
from celerity_jax.config import apply_overrides  # noqa: E402
from celerity_jax.config_checks import validate  # noqa: E402

# A model small enough to compile and step in about a second, shardable on a 2x2x2 mesh.
SMALL = [
  "model.d_model=32",
  "model.n_layers=2",  # (the CLI re-derives it from d_model through the family rule: keep 2)
  "model.n_heads=2",
  "model.d_head=16",
  "model.d_ff=128",
  "model.vocab_size=256",
  "model.seq_len=32",
  "train.batch_size=16",
  "scaling.tpp=0.5",
  "run.progress=false",
  "run.tensorboard=false",
  "param.d_base=32",
  "data.corpus=synthetic",
  "train.eval_every=0",
]


def small_config(*overrides: str):
  """celerity_tiny's rules on a small shape; T is about 60 steps of 16 x 32 tokens."""
  return validate(apply_overrides(recipes.load("celerity_tiny"), SMALL + list(overrides)))


@pytest.fixture
def small():
  return small_config


@pytest.fixture(scope="module")
def gcs():
  """A local Cloud Storage emulator (tests/gcs_emulator.py) for this module, with every client
  pointed at it; yields a gcsfs client without a listing cache, for polling. A client left without
  its variable would go to the real service and hang on credentials, hence the check."""
  import gcs_emulator
  import gcsfs

  with gcs_emulator.running() as port, pytest.MonkeyPatch.context() as mp:
    for key, value in gcs_emulator.environment(port).items():
      mp.setenv(key, value)
    assert os.environ["STORAGE_EMULATOR_HOST"] == os.environ["TENSORSTORE_GCS_HTTP_URL"]
    yield gcsfs.GCSFileSystem(use_listings_cache=False)


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
  """One data cache per test session, so the stdlib tokenizer and stores are built once."""
  return tmp_path_factory.mktemp("stdlib_cache")


@pytest.fixture(scope="session")
def trained_text_run(tmp_path_factory, stdlib_cache):
  """A small model trained 8 steps on the stdlib corpus (its tokenizer beside it in run.dir), for
  sampling and export; ALiBi, LayerNorm and squared ReLU, as Celerity trains."""
  from celerity_jax.train import loop

  run_dir = tmp_path_factory.mktemp("text_run")
  loop.run(
    small_config(
      "data.corpus=stdlib",
      f"data.cache_dir={stdlib_cache}",
      "model.vocab_size=512",
      f"run.dir={run_dir}",
      "train.stop_step=8",
    )
  )
  return run_dir


@pytest.fixture(scope="session")
def bad_input_corpus(tmp_path_factory):
  """The bad-input tables' corpus and its token cache, built once (tests/bad_inputs.py)."""
  from bad_inputs import build_corpus

  return build_corpus(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="session")
def bad_input_run(tmp_path_factory):
  """The bad-input tables' finished run (tests/bad_inputs.py)."""
  from bad_inputs import build_finished_run

  return build_finished_run(tmp_path_factory.mktemp("finished") / "run")


def write_store(path: str, docs, eos_id: int, meta: dict) -> dict:
  """A token store of `docs` (token arrays) at `path`, as a shard's builder writes one."""
  from celerity_jax.data import store

  writer = store.Writer(path, eos_id)
  for ids in docs:
    writer.add(ids)
  return writer.finish(meta)
