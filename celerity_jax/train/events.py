"""What one step's metrics mean for the run, as a pure function of (values, the previous step's
flags): events logged on their first step (a loss spike, a collapse alert), warnings, and halts.

The loop calls `judge` once per fetched step and acts on the verdict; nothing here touches files,
devices or other processes, so every rule is tested without a run. The metrics are replicated,
so every process reaches the same verdict at the same step without a vote.
"""

from __future__ import annotations

from dataclasses import dataclass

HALT_NONFINITE = 4  # exit statuses (docs/usage.md: the exit status table)
HALT_COLLAPSE = 5
FLAGS = ("loss_spike", "collapse_alert")  # reported on their rising edge only
DETAIL = ("loss", "loss_smooth", "collapse_residual", "final_loss_estimate")


class RunHalted(Exception):
  """The run stopped itself (non-finite losses, a collapse alert under policy halt); `code` is the
  exit status."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


@dataclass(frozen=True)
class Halt:
  cause: str  # "nonfinite" or "collapse"
  code: int
  message: str


@dataclass(frozen=True)
class Verdict:
  flags: dict  # this step's FLAGS values: the next call's `previous`
  events: list  # metrics.jsonl event rows, in order
  warnings: list  # lines for stderr
  halt: Halt | None


def judge(
  step: int, values: dict, previous: dict, *, frac: float, train_cfg, collapse_cfg
) -> Verdict:
  """The verdict on step `step`'s metrics `values` (a log row's fields), at `frac` = t of the
  schedule; `previous` holds the flags of the step before (empty at the start of a process)."""
  if values["nonfinite"] and (
    train_cfg.on_nonfinite == "halt" or values["bad_steps"] >= train_cfg.max_bad_steps
  ):
    return Verdict(
      dict(previous),
      [],
      [],
      Halt(
        "nonfinite",
        HALT_NONFINITE,
        f"non-finite loss or gradient at step {step} ({int(values['bad_steps'])} in a row, "
        f"policy {train_cfg.on_nonfinite})",
      ),
    )
  flags, events, warnings, halt = {}, [], [], None
  for key in FLAGS:
    flags[key] = now = int(values.get(key, 0))
    if not now or previous.get(key, 0):
      continue
    detail = {k: values[k] for k in DETAIL if k in values}
    events.append({"event": key, "step": step, "frac": frac, **detail})
    text = ", ".join(f"{k} {v:.4g}" for k, v in detail.items())
    off = (
      f"off the collapse reference at step {step} ({text}; |residual| > "
      f"{collapse_cfg.threshold} for {collapse_cfg.patience} steps)"
    )
    if key == "loss_spike":
      warnings.append(
        f"celerity_jax: warning: loss spike at step {step} ({text}; smoothed loss "
        f"above {collapse_cfg.spike_factor}x its minimum)"
      )
    elif collapse_cfg.policy == "halt":
      halt = Halt("collapse", HALT_COLLAPSE, off)
    else:
      warnings.append(f"celerity_jax: warning: {off}")
  return Verdict(flags, events, warnings, halt)
