"""The Colab notebook runs top to bottom (papermill, a fresh kernel on one CPU device, tiny
settings) and produces its figures; it is committed without outputs."""

import json
import os
import pathlib
import re

import pytest

papermill = pytest.importorskip("papermill")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "tpu" / "colab.ipynb"
CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"


def test_the_notebook_is_committed_without_outputs():
  notebook = json.loads(NOTEBOOK.read_text())
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
  tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
  assert len(tagged) == 1  # papermill injects the test's settings after this cell


@pytest.mark.slow
def test_the_notebook_trains_plots_predicts_sweeps_and_samples(tmp_path, stdlib_cache, monkeypatch):
  # the kernel sees one CPU device, as a Colab CPU runtime does, and shares the tests' jit cache
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(CACHE))
  tiny = [f"data.cache_dir={stdlib_cache}", "scaling.tpp=6", "model.seq_len=64"]
  executed = tmp_path / "executed.ipynb"
  papermill.execute_notebook(
    str(NOTEBOOK),
    str(executed),
    parameters={
      "WORK": str(tmp_path / "work"),
      "FAMILY": ["celerity_nano_1", "celerity_nano_2"],
      "OVERRIDES": tiny,
      "SWEEP_TAUS": [0.06, 0.5],
    },
    kernel_name="python3",
    cwd=str(tmp_path),
    progress_bar=False,
  )  # raises PapermillExecutionError naming the cell on any error
  cells = json.loads(executed.read_text())["cells"]
  outputs = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the collapse picture and the sweep, inline
  text = "".join("".join(o.get("text", "")) for o in outputs)
  assert "celerity_nano_1: N = " in text and "celerity_nano_2: N = " in text
  assert "predicted from t <= 0.3" in text and "tokens/s" in text
  # the sweep (celerity_jax.commands.sweep): the winner has the lowest predicted final loss, and the
  # compute is 0.3 of each of the two settings plus the rest of the winner: (2 x 0.3 + 0.7) / 2
  rows = re.findall(
    r"tau = ([\d.]+): loss at t = 0.3: ([\d.]+), predicted final ([\d.]+)(.*)", text
  )
  assert [float(r[0]) for r in rows] == [0.06, 0.5]
  winners = [r for r in rows if "<- winner" in r[3]]
  assert len(winners) == 1 and float(winners[0][2]) == min(float(r[2]) for r in rows)
  assert all(abs(float(r[2]) / float(r[1]) - 1) < 0.6 for r in rows)
  assert "compute used: 65% of running every setting to the end" in text
  work = tmp_path / "work"
  for figure in ("collapse.png", "sweep.png"):
    assert (work / figure).stat().st_size > 10_000
  assert len(list((work / "sweep").glob("setting_*/metrics.jsonl"))) == 2
  assert os.environ["XLA_FLAGS"] == ""
