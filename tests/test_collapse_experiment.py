"""tools.collapse_experiment end to end on a family small enough for CI: both stages (the sweep,
eta* from it, the family at eta*), the held-out curves, the report under every definition, the
tables and the figure; a second call trains nothing."""

import json

import pytest

from tools import collapse_experiment, collapse_report
from tools.collapse_plan import Family

TINY = Family(
  "tiny",
  ("celerity_nano_1", "celerity_nano_2", "celerity_nano_3"),
  (("celerity_nano_2", 2),),
  (2, 1),
  (1.0, 2.0),
  (1.0,),
  (2.0,),
  16,
  20,
  "unused",
  "unused",
)
SMALL = [
  "data.corpus=synthetic",
  "model.vocab_size=64",
  "model.seq_len=16",
  "model.n_layers=1",
  "train.batch_size=8",
  "scaling.tpp=2",
  "checkpoint.every_steps=100000",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  out = tmp_path_factory.mktemp("collapse")
  mp = pytest.MonkeyPatch()
  mp.setitem(collapse_experiment.FAMILIES, "tiny", TINY)
  argv = ["--family", "tiny", "--workers", "1", "--out", str(out / "runs")]
  argv += ["--figure", str(out / "fig.png"), *SMALL]
  collapse_experiment.main(argv)
  yield out, argv, mp
  mp.undo()


def test_the_experiment_trains_both_stages_and_reports_every_definition(experiment):
  out, _, _ = experiment
  runs = out / "runs"
  eta = json.loads((runs / "eta_star.json").read_text())
  assert eta == {"lr_mult": 1.0, "lr_base": pytest.approx(0.0162)}
  report = json.loads((runs / "report.json").read_text())
  # the sweep (2 x 1), size1 seed 1, size2 and size3 seed 0, size1 at 2B; size1 seed 0 is the
  # sweep's run at (tau_opt, eta*), not trained twice
  trained = sorted(p.name for p in runs.iterdir() if p.is_dir())
  assert trained == sorted(
    ["sweep_tau1_lr1", "sweep_tau2_lr1"]
    + ["size1_seed1", "size2_seed0", "size3_seed0", "batch16_size1", "size2_seed1"]
  )
  assert report["runs"]["size1_seed0"]["final_loss"] == pytest.approx(
    report["runs"][f"sweep_tau1_lr{eta['lr_mult']:g}"]["final_loss"]
  )
  for name, run in report["runs"].items():
    assert run["eval_points"] >= 20, name  # train.eval_every = T // eval_points, and the end
  keys = {f"{d}/{c}" for d in ("qiu", "celerity", "ours") for c in ("eval", "train")}
  assert set(report["collapse"]["matched"]) == keys
  assert set(report["collapse"]["mismatched"]) == {"2"}
  for j in report["collapse"]["matched"].values():
    assert 0 <= j["share_below"] <= 1 and len(j["delta"]) == len(j["grid"])
  assert report["collapse"]["irreducible"]["eval"]["L0"] >= 0
  assert set(report["sweep"]["stops"]) == {"0.1", "0.2", "0.3"}
  s = report["sweep"]["stops"]["0.3"]
  assert s["regret"] >= 0 and s["compute_saved"] == pytest.approx(1 - (2 * 0.3 + 0.7) / 2)
  assert set(report["verdicts"]) >= {"collapse_qiu_eval", "mismatch_breaks", "sweep", "batch"}
  assert set(report["members"]) == {"size1", "size2", "size3"}
  # the follow-up (size2 seed 1 added): size2..3, two sizes, so no L0 fit and no Qiu et al. rule
  assert report["followup"]["seeds"] == {"size2": 2, "size3": 1}
  assert set(report["followup"]["collapse"]) == {
    f"{d}/{c}" for d in ("celerity", "ours") for c in ("eval", "train")
  }
  assert (out / "fig.png").stat().st_size > 10_000
  printed = collapse_report.tables(report)
  assert "| 1. the family at τ_opt collapses (Qiu et al., held-out)" in printed
  assert "| Qiu et al. | held-out (published) |" in printed


def test_a_second_call_trains_nothing(experiment, monkeypatch):
  out, argv, _ = experiment
  from celerity_jax.train import loop

  def refuse(cfg):
    raise AssertionError(f"trained {cfg.run.dir} again")

  monkeypatch.setattr(loop, "run", refuse)
  collapse_experiment.main(argv)
  assert json.loads((out / "runs" / "report.json").read_text())["runs"]
