"""What a config key declares besides its type and default: its range, whether a resumed run may
change it, and whether a collapse reference run must share it (config.py declares every field with
`key`; validation, the resume check and the collapse monitor read the rules back)."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple


class ConfigError(ValueError):
  """A bad key, value or combination; the CLI prints it and exits with status 2."""


class Check(NamedTuple):
  """A key's range: `ok(value)`, and what it must be (`{key}={value}: must be {text}`)."""

  text: str
  ok: Callable[[object], bool]


POSITIVE = Check("> 0", lambda v: v > 0)
NONNEG = Check(">= 0", lambda v: v >= 0)


def at_least(low) -> Check:
  return Check(f">= {low}", lambda v: v >= low)


def above(low) -> Check:
  return Check(f"> {low}", lambda v: v > low)


def between(low, high, ends: str) -> Check:
  """In the interval from low to high, `ends` its brackets: "[)", "(]", "()" or "[]"."""
  lo_ok = (lambda v: v >= low) if ends[0] == "[" else (lambda v: v > low)
  hi_ok = (lambda v: v <= high) if ends[1] == "]" else (lambda v: v < high)
  return Check(f"in {ends[0]}{low}, {high}{ends[1]}", lambda v: lo_ok(v) and hi_ok(v))


@dataclass(frozen=True)
class Rule:
  """What a config key's field says besides its type and default: its range (`check`; None: any
  value of its type), whether a resumed run may change it (`free`: it changes how the run
  executes or is kept, not its trajectory; checkpoint.config_changes) and, for the collapse
  monitor, the relative tolerance within which a reference run must share it (`matched`)."""

  check: Check | None
  free: bool
  matched: float | None = None


def key(default, check: Check | None = None, *, free: bool, matched: float | None = None):
  """A config field with its rules (Rule); every field of every section is declared with one."""
  return field(default=default, metadata={"rule": Rule(check, free, matched)})


def parse_value(key: str, text: str, tp) -> object:
  """`text` as a value of type `tp` (a key's annotation); ConfigError naming the key if not."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):  # X | None
    if text.lower() in ("none", "null"):
      return None
    inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return parse_value(key, text, inner)
  if origin is Literal:
    choices = typing.get_args(tp)
    if text not in choices:
      raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, choices))}")
    return text
  if tp is bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"{key}={text!r}: expected a bool (true/false)")
  if tp is int:
    try:
      number = float(text.replace("_", ""))
    except ValueError:
      number = None
    if number is None or not number.is_integer():
      raise ConfigError(f"{key}={text!r}: expected an int")
    return int(number)
  if tp is float:
    try:
      number = float(text.replace("_", ""))
    except ValueError:
      number = None
    if number is None or not math.isfinite(number):  # nan/inf would only surface as a NaN loss
      raise ConfigError(f"{key}={text!r}: expected a finite float")
    return number
  return text
