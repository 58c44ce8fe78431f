"""tools/gpu_check.py, the one-shot GPU check, on this CPU: its tiny mode runs every cell's code
path end to end (a device call must never be the first run of it), every cell of the GPU plan
resolves for one GPU, and its verdicts fail where they should."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from celerity_jax.cli import parse
from celerity_jax.config import ConfigError
from celerity_jax.resolve import resolve
from tools import gpu_check, gpu_report, gpu_wheels

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.gpu_check",
      "--tiny",
      "--out",
      str(out),
      "--work",
      str(out / "w"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.txt")


def test_tiny_mode_runs_every_cell_and_passes_its_checks(tiny):
  proc, report, text_file = tiny
  assert proc.returncode == 0, proc.stderr[-3000:]
  status = {name: c["status"] for name, c in report["cells"].items()}
  gpu_only = [n for n in status if n.endswith(("cudnn", "triton"))]
  assert len(gpu_only) == 4 and all(status[n] == "refused" for n in gpu_only)  # not on a CPU
  assert "runs on an NVIDIA GPU only" in report["cells"][gpu_only[0]]["message"]
  assert {s for n, s in status.items() if n not in gpu_only} == {"ok"}
  names = [c["name"] for c in report["checks"]]
  assert len(names) == 11 and all(c["passed"] for c in report["checks"])
  # every path but cuDNN computes attention in bf16 within tolerance (Triton's kernels interpreted)
  assert [n.split(",")[0] for n in names if n.startswith("attention")] == [
    "attention reference",
    "attention blockwise",
    "attention triton",
  ]
  assert names[0] == "float32 GPU vs CPU, loss of steps 1-30, max relative"
  paths = {(r["seq_len"], r["attention"]) for r in report["speed"]}
  assert {(64, "blockwise"), (128, "blockwise"), (64, "reference")} <= paths
  assert all(r["tokens_per_s"] > 0 and r["mfu_measured_matmul"] > 0 for r in report["speed"])
  text = text_file.read_text()
  assert text.strip() == proc.stdout.strip() and "pass" in text and "FAIL" not in text
  assert "1b_64_cudnn" in text and "refused" in text


def test_every_cell_of_the_gpu_plan_resolves_for_one_gpu():
  cells = [c for c in gpu_check.plan(tiny=False) if c.kind in ("run", "speed")]
  assert len(cells) == 14
  for cell in cells:
    cfg, _ = parse(cell.args)
    r = resolve(cfg, 1, platform="gpu")
    if cell.name.startswith("1b_"):
      assert (r.batch_tokens, r.microbatches, cfg.model.d_model, cfg.model.n_layers) == (
        16384,
        2,
        1152,
        26,
      ), cell.name
      assert r.attention == cell.name.split("_")[2] and cfg.model.dtype == "bfloat16"
    if cell.kind == "run":
      assert r.batch_seqs == 320 and r.attention == "blockwise"


def test_verdicts_fail_on_a_diverging_twin_and_a_run_cut_short(tiny, tmp_path):
  _, report, _ = tiny
  cells = json.loads(json.dumps(report["cells"]))
  cpu = cells["twin_cpu"]["result"]
  cpu["loss"]["7"] *= 1 + 3 * gpu_report.REL_30
  cpu["alerts"] = cpu["alerts"][1:]
  failed = [c["name"] for c in gpu_report.correctness(cells, False) if not c["passed"]]
  assert failed == [
    "float32 GPU vs CPU, loss of steps 1-30, max relative",
    "monitor alerts GPU vs CPU (the steps that alert)",
  ]
  # on a GPU a path that cannot run is a failure, as is one off by more than the tolerance
  cells["attention"]["result"]["triton"]["dk"] = 10 * gpu_report.ATTENTION_REL
  on_gpu = [c["name"] for c in gpu_report.correctness(cells, True) if not c["passed"]]
  assert [n for n in on_gpu if n.startswith("attention")] == [
    "attention cudnn, bf16 vs float32 reference, out and grads",
    "attention triton, bf16 vs float32 reference, out and grads",
  ]
  # the GPU mode's own figures: the chip's peak by its name, the GPU family's hours at 50m's rate
  gpu = {**json.loads(json.dumps(report)), "mode": "gpu"}
  gpu["cells"]["env"]["result"]["device_kind"] = "NVIDIA H200"
  gpu_report.finish(gpu, 0.0)
  assert gpu["peak_bf16_tflops"] == 989.4 and gpu["family"]["runs"] == 28
  assert all(r["mfu_peak"] == r["tflops"] / 989.4 for r in gpu["speed"])
  assert "the GPU collapse family (28 runs" in gpu_report.text(gpu)
  # no budget: every cell is skipped, the report says so, and the exit status is 1
  out = tmp_path / "out"
  code = gpu_check.main(["--tiny", "--out", str(out), "--budget-s", "0", "--work", str(tmp_path)])
  skipped = json.loads((out / "gpu_check.json").read_text())
  assert code == 1 and {c["status"] for c in skipped["cells"].values()} == {"skipped"}
  assert (
    "not run or failed: twin_gpu, twin_cpu, attention, bf16, tf32"
    in (out / "gpu_check.txt").read_text()
  )


def test_wheels_for_an_offline_image_are_what_the_runtime_lock_pins_and_the_image_lacks(tmp_path):
  pip_list = "Package    Version\n---------- -------\njax        0.11.2\nFlax 0.12.1\nnumpy 2.5.2\n"
  freeze = "jax==0.11.2\nflax==0.12.1\nnumpy @ file:///numpy.whl\n"
  names = "jax, jaxlib, flax, numpy, zipp."
  for listing in (pip_list, freeze, names):
    assert {"jax", "flax", "numpy"} <= gpu_wheels.image_packages(listing)
  wanted = gpu_wheels.missing(REPO / "requirements.lock", gpu_wheels.image_packages(names))
  pinned = {w.split("==")[0] for w in wanted}
  assert {"grain", "optax", "orbax-checkpoint"} <= pinned
  assert not {"jax", "jaxlib", "flax", "numpy", "zipp"} & pinned  # the image's own stay
  (tmp_path / "have.txt").write_text("torch==2.11\n")
  have = ["--have", str(tmp_path / "have.txt"), "--out", str(tmp_path)]
  with pytest.raises(ConfigError, match="lists no jax"):
    gpu_wheels.main(have)
