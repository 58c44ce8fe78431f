"""CompleteP keeps activation updates O(1) across width; standard parameterization does not."""

import pytest

from tools import coord_check


def test_completep_is_flat_across_width_and_sp_drifts():
  results = [
    {**coord_check.measure(kind, width, 1, steps=2), "sweep": "width"}
    for kind in ("completep", "sp")
    for width in (1, 4)
  ]
  completep = coord_check.spread(results, "completep", "width")
  sp = coord_check.spread(results, "sp", "width")
  assert completep < 1.5
  assert sp > 3 * completep
  for r in results:
    assert len(r["rms"]) == len(r["delta"]) == len(r["rms_init"]) == 2  # one entry per layer


def test_plot_writes_a_png_with_every_panel(tmp_path):
  results = [
    {
      "kind": kind,
      "sweep": sweep,
      "width": m,
      "depth": m,
      "delta": [1.0, m * scale],
      "rms": [1.0, m * scale],
    }
    for kind, scale in (("completep", 0.0), ("sp", 1.0))
    for sweep in ("width", "depth")
    for m in (1, 2, 4)
  ]
  for r in results:
    r["delta"][-1] = r["delta"][-1] or 1.0
  assert coord_check.spread(results, "sp", "width") == pytest.approx(4.0)
  assert coord_check.spread(results, "completep", "depth") == pytest.approx(1.0)
  coord_check.plot(results, str(tmp_path / "coord.png"))
  assert (tmp_path / "coord.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
