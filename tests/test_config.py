"""Config parsing, the CLI's error contract (exit 2, no traceback) and --print-config."""

import json
import subprocess
import sys

import pytest

from celerity_jax import recipes
from celerity_jax.config import ConfigError, apply_overrides
from celerity_jax.config_checks import validate
from celerity_jax.main import main


def run_main(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_overrides_are_parsed_to_field_types():
  cfg = apply_overrides(
    recipes.load("celerity_tiny"),
    [
      "model.d_model=96",
      "optim.lr_base=3e-3",
      "model.scan_layers=false",
      "model.norm=rmsnorm",
      "train.stop_step=1e3",
      "optim.weight_decay=0.1",
      "optim.weight_decay=null",
    ],
  )
  assert cfg.model.d_model == 96 and isinstance(cfg.model.d_model, int)
  assert cfg.optim.lr_base == 3e-3
  assert cfg.model.scan_layers is False
  assert cfg.model.norm == "rmsnorm"
  assert cfg.train.stop_step == 1000
  assert cfg.optim.weight_decay is None


def test_config_is_frozen():
  cfg = recipes.load("celerity_tiny")
  with pytest.raises(AttributeError):
    cfg.model.d_model = 3


def test_unknown_key_names_key_and_close_matches(capsys):
  code, _, err = run_main(capsys, "recipe=celerity_tiny", "model.d_modle=64", "--print-config")
  assert code == 2
  assert "model.d_modle" in err and "model.d_model" in err


def test_bad_value_names_expected_type(capsys):
  code, _, err = run_main(capsys, "model.n_layers=two", "--print-config")
  assert code == 2 and "model.n_layers" in err and "expected an int" in err
  code, _, err = run_main(capsys, "optim.lr_base=fast", "--print-config")
  assert code == 2 and "expected a finite float" in err
  code, _, err = run_main(capsys, "model.n_layers=2.5", "--print-config")
  assert code == 2 and "expected an int" in err


def test_bad_choice_lists_valid_values(capsys):
  code, _, err = run_main(capsys, "model.position=learned", "--print-config")
  assert code == 2 and "alibi" in err and "rope" in err


def test_unknown_recipe_lists_recipes(capsys):
  code, _, err = run_main(capsys, "recipe=celerity_7b", "--print-config")
  assert code == 2 and "celerity_7b" in err and "celerity_tiny" in err and "celerity_1b" in err


def test_malformed_override_and_flag(capsys):
  assert run_main(capsys, "model.d_model")[0] == 2
  assert run_main(capsys, "--print-confg")[0] == 2


@pytest.mark.parametrize(
  "override, key",
  [
    ("model.n_kv_heads=3", "model.n_kv_heads"),  # 1 head is not a multiple of 3
    ("train.stop_frac=1.5", "train.stop_frac"),
    ("model.d_model=0", "model.d_model"),
    ("mesh.fsdp=-1", "mesh"),  # two axes set to -1
    ("train.batch_size=7", "train.batch_size"),  # not divisible on the 8-device mesh
  ],
)
def test_invalid_combinations_exit_2_naming_the_key(capsys, override, key):
  code, _, err = run_main(capsys, override, "--print-config")
  assert code == 2, err
  assert key in err


def test_mesh_that_does_not_match_devices(capsys):
  code, _, err = run_main(capsys, "mesh.data=3", "--print-config")  # 8 fake devices
  assert code == 2 and "8" in err and "mesh" in err


def test_print_config_celerity_1b_lists_derived_quantities(capsys):
  code, out, _ = run_main(capsys, "recipe=celerity_1b", "--print-config")
  assert code == 0
  derived = json.loads(out)["derived"]
  assert abs(derived["n_params"] - 1e9) / 1e9 < 0.05
  for key in (
    "tokens",
    "tpp",
    "batch_tokens",
    "steps",
    "warmup_steps",
    "lr_peak",
    "weight_decay",
    "tau",
    "tau_groups",
    "multipliers",
  ):
    assert key in derived
  mult = derived["multipliers"]
  assert mult["attn_scale"] == pytest.approx(1 / 128)
  assert mult["logit_scale"] == pytest.approx(1.095 / (1152 / 256))
  assert derived["tau"] == pytest.approx(0.785 * 20**-0.501)


def test_cli_subprocess_exit_code_without_traceback():
  proc = subprocess.run(
    [sys.executable, "-m", "celerity_jax.main", "model.d_modle=3"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr and "model.d_model" in proc.stderr


def test_validate_accepts_recipes():
  for name in recipes.available():
    validate(recipes.load(name))
  with pytest.raises(ConfigError):
    validate(apply_overrides(recipes.load("celerity_tiny"), ["scaling.warmup_frac=1.0"]))


def test_out_of_device_memory_is_a_one_line_config_error(capsys):
  """XLA reports an allocation that does not fit as RESOURCE_EXHAUSTED; other errors still raise."""
  from celerity_jax.main import run_cli

  def allocate():
    raise RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68.00GiB.\n"
      "BufferAssignment OOM Debugging.\n..."
    )

  assert run_cli(allocate) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "out of memory" in err and "68.00GiB" in err

  def bug():
    raise RuntimeError("something else")

  with pytest.raises(RuntimeError):
    run_cli(bug)


def test_print_config_is_what_the_run_writes_to_config_json(tmp_path, capsys):
  """One plan: everything --print-config shows (the config and every derived value, the
  platform's execution choices included) is what the run then writes and trains with."""
  from conftest import SMALL

  args = ["recipe=celerity_tiny", *SMALL, f"run.dir={tmp_path / 'run'}", "train.stop_step=2"]
  args += ["train.cpu_microbatch_tokens=32"]  # so that the CPU's cache split is in the plan
  assert main([*args, "--print-config"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["derived"]["microbatches"] > 1 and printed["derived"]["platform"] == "cpu"
  assert main(args) == 0
  written = json.loads((tmp_path / "run" / "config.json").read_text())
  assert {k: written[k] for k in ("config", "derived")} == printed


def test_every_key_carries_its_own_rules():
  """Each field is declared with key_rules.key: its range, whether a resume may change it, and
  whether a collapse reference must match it, read by validation, the resume check and the
  monitor. A field declared without them fails here."""
  import dataclasses

  from celerity_jax import checkpoint, config, key_rules
  from celerity_jax.resolve import FREE_DERIVED, Resolved

  for section in dataclasses.fields(config.Config):
    for f in dataclasses.fields(section.default_factory):
      assert isinstance(f.metadata.get("rule"), key_rules.Rule), f"{section.name}.{f.name}"
  keys = set(config.rules())
  assert set(config.free_keys()) <= keys and set(config.matched_keys()) <= keys
  assert set(FREE_DERIVED) <= {f.name for f in dataclasses.fields(Resolved)}
  assert "mesh.data" in checkpoint.FREE_KEYS and "optim.tau" not in checkpoint.FREE_KEYS
  for key, rule in config.rules().items():  # each range rejects a value outside it, by name
    if rule.check is not None and rule.check.text == "> 0":
      with pytest.raises(ConfigError, match=rf"{key}=0(\.0)?: must be > 0"):
        validate(apply_overrides(recipes.load("celerity_tiny"), [f"{key}=0"]))
