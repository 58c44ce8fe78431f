"""run.wandb: the rows of metrics.jsonl go to a wandb run (offline mode, read back from wandb's
own files), and a resumed run continues the same wandb run."""

import json
import struct

import pytest
from conftest import SMALL

from celerity_jax.main import main

wandb = pytest.importorskip("wandb")

BLOCK = 32768  # wandb's run file: LevelDB log records in 32 KiB blocks after a 7-byte header


def records(path):
  """The protobuf records of a wandb run file (the LevelDB log format: a 7-byte record header of
  checksum, length and type; FULL = 1, FIRST = 2, MIDDLE = 3, LAST = 4)."""
  from wandb.proto import wandb_internal_pb2 as pb

  data, pos, parts = path.read_bytes(), 7, b""
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    left = BLOCK - pos % BLOCK
    if left < 7:  # a block's tail too short for a header is padding
      pos += left
      continue
    length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
    if length == 0 and kind == 0:
      break
    parts += data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = pb.Record()
      record.ParseFromString(parts)
      parts = b""
      yield record


def history(run_dir) -> tuple[set, dict]:
  """(the run ids in run_dir's wandb files, {step: {key: value}} over all of them)."""
  ids, steps = set(), {}
  for path in sorted(run_dir.glob("wandb/*run-*/run-*.wandb")):
    for record in records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        ids.add(record.run.run_id)
      elif kind == "history":
        items = {
          (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item
        }
        step = items.pop("_step")
        steps.setdefault(step, {}).update(items)
  return ids, steps


def test_the_wandb_run_holds_the_metrics_rows_and_a_resume_continues_it(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  run = tmp_path / "run"
  args = ["recipe=celerity_tiny", *SMALL, f"run.dir={run}", "run.wandb=celerity-test"]
  assert main([*args, "train.stop_step=4", "checkpoint.every_steps=2"]) == 0
  assert main([*args, "train.stop_step=8", "checkpoint.every_steps=2"]) == 0  # resumes at 4
  ids, steps = history(run)
  assert ids == {json.loads((run / "wandb.json").read_text())["id"]}
  # one file per process start, one wandb run
  assert len(list(run.glob("wandb/*run-*/run-*.wandb"))) == 2
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  metric_rows = [r for r in rows if "event" not in r]
  assert [r["step"] for r in metric_rows] == list(range(1, 9))
  for row in metric_rows:
    for key, value in row.items():
      if isinstance(value, (int, float)) and key not in ("step", "tokens_per_s"):
        assert steps[row["step"]][key] == pytest.approx(value, rel=1e-6), (row["step"], key)
  assert steps[4]["event/restart/restarts"] == 1
  assert max(steps) == 8


def test_wandb_missing_is_one_line(tmp_path, monkeypatch, capsys):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
  )
  run = tmp_path / "run"
  assert main(["recipe=celerity_tiny", *SMALL, f"run.dir={run}", "run.wandb=p"]) == 2
  assert "run.wandb=p: the wandb package is not installed" in capsys.readouterr().err
  assert not run.exists()
