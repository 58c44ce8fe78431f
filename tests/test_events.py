"""events.judge, the loop's rules for events, warnings and halts, without a run."""

import pytest

from celerity_jax.config import CollapseConfig, TrainConfig
from celerity_jax.train import events

TRAIN, COLLAPSE = TrainConfig(), CollapseConfig()


def values(**changes):
  return {"loss": 3.0, "loss_smooth": 3.1, "nonfinite": 0, "bad_steps": 0, **changes}


def judge(step, row, previous, train=TRAIN, collapse=COLLAPSE):
  return events.judge(step, row, previous, frac=step / 100, train_cfg=train, collapse_cfg=collapse)


def test_a_spike_is_an_event_and_a_warning_on_its_first_step_only():
  quiet = judge(9, values(loss_spike=0), {})
  assert (quiet.events, quiet.warnings, quiet.halt) == ([], [], None)
  first = judge(10, values(loss_spike=1), quiet.flags)
  assert first.events == [
    {"event": "loss_spike", "step": 10, "frac": 0.1, "loss": 3.0, "loss_smooth": 3.1}
  ]
  assert len(first.warnings) == 1 and "loss spike at step 10" in first.warnings[0]
  assert first.halt is None
  still = judge(11, values(loss_spike=1), first.flags)  # the same spike goes on
  assert (still.events, still.warnings) == ([], [])
  again = judge(13, values(loss_spike=1), judge(12, values(loss_spike=0), still.flags).flags)
  assert [e["step"] for e in again.events] == [13]  # a new rising edge


@pytest.mark.parametrize("policy,halts", [("warn", False), ("halt", True)])
def test_a_collapse_alert_warns_or_halts_per_policy(policy, halts):
  collapse = CollapseConfig(policy=policy)
  verdict = judge(40, values(collapse_alert=1, collapse_residual=-0.08), {}, collapse=collapse)
  assert [e["event"] for e in verdict.events] == ["collapse_alert"]
  assert verdict.events[0]["collapse_residual"] == -0.08
  if halts:
    assert verdict.warnings == []
    assert verdict.halt.code == events.HALT_COLLAPSE == 5 and verdict.halt.cause == "collapse"
    assert "off the collapse reference at step 40" in verdict.halt.message
  else:
    assert verdict.halt is None and "off the collapse reference at step 40" in verdict.warnings[0]


def test_a_spike_and_an_alert_on_one_step_are_both_logged_spike_first():
  verdict = judge(
    5, values(loss_spike=1, collapse_alert=1), {}, collapse=CollapseConfig(policy="halt")
  )
  assert [e["event"] for e in verdict.events] == ["loss_spike", "collapse_alert"]
  assert verdict.halt.cause == "collapse" and verdict.flags == {
    "loss_spike": 1,
    "collapse_alert": 1,
  }


@pytest.mark.parametrize(
  "policy,bad_steps,max_bad,halts",
  [
    ("halt", 1, 100, True),  # halt at the first non-finite step
    ("skip", 1, 3, False),  # skipped: the state is kept, training goes on
    ("skip", 3, 3, True),  # until train.max_bad_steps in a row
  ],
)
def test_non_finite_steps_halt_per_policy(policy, bad_steps, max_bad, halts):
  train = TrainConfig(on_nonfinite=policy, max_bad_steps=max_bad)
  verdict = judge(
    7, values(nonfinite=1, bad_steps=bad_steps, loss_spike=1), {"loss_spike": 0}, train=train
  )
  if halts:
    assert verdict.halt.code == events.HALT_NONFINITE == 4
    assert f"at step 7 ({bad_steps} in a row, policy {policy})" in verdict.halt.message
    assert verdict.events == [] and verdict.flags == {"loss_spike": 0}  # nothing else judged
  else:
    assert verdict.halt is None and [e["event"] for e in verdict.events] == ["loss_spike"]
