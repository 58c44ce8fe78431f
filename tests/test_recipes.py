"""The Celerity family recipes, the TPP chooser, FLOPs conventions and the planner."""

import json

import pytest

from celerity_jax import recipes, scaling
from celerity_jax.config import apply_overrides
from celerity_jax.main import main
from celerity_jax.resolve import resolve

# recipe: (paper N, paper FLOPs at 234 TPP, paper 20-TPP batch in sequences of 8192)
PAPER = {
  "celerity_300m": (271e6, 1.47e20, 176),
  "celerity_500m": (503e6, 5.15e20, 240),
  "celerity_900m": (906e6, 1.68e21, 336),
  "celerity_1_8b": (1.81e9, 6.54e21, 464),
  "celerity_3_9b": (3.88e9, 2.89e22, 672),
}


@pytest.mark.parametrize("name", PAPER)
def test_family_matches_the_paper(name):
  n, flops, batch = PAPER[name]
  r20 = resolve(recipes.load(name))
  assert r20.n_params == pytest.approx(n, rel=0.01)
  assert r20.batch_seqs == pytest.approx(batch, rel=0.03)
  cfg = apply_overrides(recipes.load(name), ["scaling.tpp=234"])
  r = resolve(cfg)
  assert r.tau == pytest.approx(0.051, rel=0.05)
  paper_convention = scaling.flops_per_token(cfg.model, causal=False, all_params=True)
  assert paper_convention * r.tokens == pytest.approx(flops, rel=0.06)


def test_every_recipe_resolves_and_prints_its_config(capsys):
  import jax

  for name in recipes.available():
    b = recipes.load(name).train.batch_size
    if 0 < b < len(jax.devices()):  # the long family's 4 sequences: at most 4 data-parallel
      assert main([f"recipe={name}", "--print-config"]) == 2
      assert "JAX_NUM_CPU_DEVICES=N sets N" in capsys.readouterr().err
      continue
    assert main([f"recipe={name}", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["n_params"] > 0


def test_chinchilla_tpp_chooser():
  chosen = scaling.chinchilla_tpp(0.38)
  assert chosen["tpp"] == pytest.approx(234, rel=0.02)
  assert chosen["compute_ratio"] == pytest.approx(1.67, rel=0.01)
  assert scaling.chinchilla_tpp(1.0)["tpp"] == pytest.approx(20.0)
  with pytest.raises(ValueError, match="k_n"):
    scaling.chinchilla_tpp(0.1)


def test_planner_lists_the_family_with_the_overrides(capsys):
  from celerity_jax.commands import plan

  assert (
    plan.main(
      [
        "recipe=celerity_1b",
        "scaling.tpp=80",
        "--json",
        "--chips",
        "8",
        "--accelerator",
        "h100",
        "--mfu",
        "0.5",
      ]
    )
    == 0
  )
  rows = json.loads(capsys.readouterr().out)
  names = [r["recipe"] for r in rows]
  assert {"celerity_300m", "celerity_1b", "celerity_3_9b"} <= set(names)
  assert [r["N"] for r in rows] == sorted(r["N"] for r in rows)
  big = rows[-1]
  assert big["TPP"] == 80 and big["tau"] == pytest.approx(0.087, rel=0.05)
  assert big["hours"] == pytest.approx(big["flops"] / (8 * 989e12 * 0.5) / 3600)
  assert plan.main(["recipe=celerity_1b", "scaling.tppp=2"]) == 2


def test_the_last_recipe_given_wins_in_main_and_in_the_planner(capsys):
  """As for every key, a later recipe= overrides an earlier one (a wrapper script's default)."""
  from celerity_jax.commands import plan

  assert main(["recipe=celerity_1b", "recipe=celerity_nano_2", "--print-config"]) == 0
  assert json.loads(capsys.readouterr().out)["config"]["run"]["dir"] == "runs/celerity_nano_2"
  assert plan.main(["recipe=celerity_1b", "recipe=celerity_nano_2", "--json"]) == 0
  assert {r["recipe"] for r in json.loads(capsys.readouterr().out)} == {
    f"celerity_nano_{i}" for i in range(1, 5)
  }


def test_nano_family_spans_8x_and_tiny_is_its_largest_member():
  import dataclasses

  nanos = [m for m in recipes.available() if m.startswith("celerity_nano_")]
  sizes = [resolve(recipes.load(m)).n_params for m in nanos]
  assert len(nanos) >= 4 and max(sizes) / min(sizes) >= 8
  assert sizes == sorted(sizes)
  tiny, largest = recipes.load("celerity_tiny"), recipes.load(nanos[-1])
  # the family trains at the critical batch; the default run keeps the batch law's B (fewer steps)
  assert largest.train.batch_size == 32 and tiny.train.batch_size == 0
  law = dataclasses.replace(largest.train, batch_size=0)
  assert dataclasses.replace(tiny, run=largest.run, train=law) == dataclasses.replace(
    largest, train=law
  )
  assert resolve(tiny).batch_seqs > 5 * resolve(largest).batch_seqs


def test_a_nano_recipe_trains_to_its_horizon(tmp_path, stdlib_cache):
  from celerity_jax.train import loop

  cfg = apply_overrides(
    recipes.load("celerity_nano_1"),
    [
      f"run.dir={tmp_path}",
      f"data.cache_dir={stdlib_cache}",
      "run.progress=false",
      "run.tensorboard=false",
    ],
  )
  last = loop.run(cfg)
  steps = json.loads((tmp_path / "config.json").read_text())["derived"]["steps"]
  assert last["step"] == steps and last["frac"] == 1.0
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  first = next(r for r in rows if "event" not in r)
  assert last["loss"] < first["loss"] - 3.0 and last["eval_loss"] < 6.0


def test_planner_shows_each_members_slice_and_layout_and_checks_the_fit(capsys):
  """Pod recipes name their slice and ship a layout; B is resolved on the slice's chips
  (celerity_1b: 32 v5p chips, one row per device per microbatch: 352 sequences in 11
  microbatches)."""
  from celerity_jax.commands import plan

  assert plan.main(["recipe=celerity_1b", "--json"]) == 0
  rows = {r["recipe"]: r for r in json.loads(capsys.readouterr().out)}
  one = rows["celerity_1b"]
  assert one["slice"] == "v5p-64" and "remat=dots rows=1" in one["layout"]
  assert one["B_seqs"] == 352 and one["fit"] is None
  assert rows["celerity_300m"]["slice"] == "v5litepod-8"
  cfg = recipes.load("celerity_nano_2")
  verdict = plan.check_fit(cfg, "v5litepod-4")
  assert verdict["fits"] and 0 < verdict["peak_bytes"] < verdict["hbm_bytes"] < 20e9
  assert plan.main(["recipe=celerity_1b", "--topology", "v9x-8"]) == 2  # one line, exit 2


def test_the_recipe_table_in_the_docs_is_what_the_planner_prints():
  """docs/collapse.md shows every recipe with its derived numbers; they come from the code, so a
  changed recipe or law that leaves the page stale fails here (regenerate with the command)."""
  from pathlib import Path

  from celerity_jax.commands import plan

  page = (Path(__file__).resolve().parent.parent / "docs" / "collapse.md").read_text()
  shown = page.split("<!-- recipes: begin -->\n", 1)[1].split("\n<!-- recipes: end -->", 1)[0]
  assert shown == plan.recipes_markdown(), (
    "docs/collapse.md is stale: python -m celerity_jax.commands.plan --recipes-markdown"
  )


def test_gpu_family_spans_16x_at_20_tpp_and_its_experiment_plan_is_complete(capsys):
  """The GPU family (tools.collapse_experiment --family gpu): five sizes from 9M to 150M at the
  batch law's B and tau_opt; the experiment's sweep has the taus and LRs its names say, the batch
  checks their B with tau held, and the corpus must hold the largest D."""
  from tools import collapse_experiment
  from tools.collapse_plan import FAMILIES, PUBLISHED_LR, budget, resolved, sweep

  f, one_gpu = FAMILIES["gpu"], ["train.microbatch_rows=2"]  # 8 devices x 2 rows = 1 GPU x 16
  rows, totals = budget(f, one_gpu)
  by_name = {r["name"]: r for r in rows}
  names = ["sweep_tau1_lr1", *(f"size{i}_seed0" for i in range(2, 6))]
  sizes = [by_name[n]["n_params"] for n in names]
  assert sizes == sorted(sizes) and 9e6 < sizes[0] and sizes[-1] < 1.5e8
  assert sizes[-1] / sizes[0] > 15
  for recipe in f.sizes:
    x = resolved(recipe, one_gpu)
    assert recipes.load(recipe).train.batch_size == 0  # the law's B, rounded
    assert x.tokens == 20 * x.n_params and x.tau == pytest.approx(x.tau_opt, rel=1e-6)
    assert abs(x.batch_seqs / x.batch_seqs_law - 1) < 0.09 and x.steps > 500
  first = resolved(f.sizes[0], one_gpu)
  grid = sweep(f, one_gpu)
  assert len(grid) == 16 and {r.recipe for r in grid} == {f.sizes[0]}
  for r in grid:
    m, k = (float(v) for v in r.name.removeprefix("sweep_tau").split("_lr"))
    x = resolved(r.recipe, [*one_gpu, *r.overrides])
    assert x.tau == pytest.approx(m * first.tau_opt, rel=1e-5)
    assert x.eta_hidden / first.eta_hidden == pytest.approx(k * 0.0162 / PUBLISHED_LR, rel=1e-5)
  half = by_name[f"batch{first.batch_seqs // 2}_size1"]
  assert half["tokens"] == by_name["sweep_tau1_lr1"]["tokens"] and half["steps"] > first.steps
  assert totals["max_tokens"] == by_name["size5_seed0"]["tokens"]
  collapse_experiment.main(["--family", "gpu", "--dry-run", *one_gpu])
  out = capsys.readouterr().out
  assert f"{len(rows)} runs" in out and "the corpus must hold 2,969,472,000 training tokens" in out


def test_a_size_override_re_derives_the_family_shape():
  """Overriding a size key calls the family rule with it, so the rules that follow from it hold
  (layers, heads, d_ff, the experts' width); a key given explicitly still wins."""
  from celerity_jax.cli import parse

  def shape(*args):
    m = parse(list(args))[0].model
    return m.d_model, m.n_layers, m.n_heads, m.d_head, m.d_ff, m.expert_d_ff

  assert shape("recipe=celerity_nano_2") == (32, 1, 2, 16, 256, 0)
  assert shape("recipe=celerity_nano_2", "model.d_model=96") == (96, 3, 6, 16, 768, 0)
  assert shape("recipe=celerity_nano_2", "model.d_model=96", "model.n_heads=3")[2] == 3
  assert shape("recipe=celerity_nano_2", "model.d_head=8") == (32, 1, 4, 8, 256, 0)
  assert shape("recipe=celerity_moe_nano_2", "model.d_model=64") == (64, 2, 4, 16, 512, 256)
  assert shape("recipe=celerity_1b", "model.d_model=1536")[2:5] == (12, 128, 12288)


USER_RECIPES = """
import dataclasses
from celerity_jax.recipes import Recipe
from celerity_jax.recipes.family import nano

mine = Recipe("mine", nano, {"d_model": 48, "batch_size": 16}, about="a user's member")
as_config = dataclasses.replace(nano("plain", d_model=16))
def as_function():
  return nano("made", d_model=16)
def not_a_config():
  return 3
"""


def test_a_users_own_recipe_file_runs_without_touching_the_package(tmp_path, capsys):
  from celerity_jax.cli import parse

  path = tmp_path / "my_recipes.py"
  path.write_text(USER_RECIPES)
  cfg = parse([f"recipe={path}:mine", "model.d_model=64"])[0]
  assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.batch_size) == (64, 2, 16)
  assert parse([f"recipe={path}:as_config"])[0].model.d_model == 16
  assert parse([f"recipe={path}:as_function"])[0].run.dir == "runs/made"
  (tmp_path / "broken.py").write_text("import no_such_module\n")
  cases = {
    f"{path}:nope": "no 'nope'",
    f"{path}:not_a_config": "not a Config",
    f"{path}": "recipe=" + str(path) + ":NAME",
    f"{tmp_path}/missing.py:x": "no such file",
    f"{tmp_path}/broken.py:x": "ModuleNotFoundError",
  }
  for spec, named in cases.items():
    assert main([f"recipe={spec}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err
