"""A run's data sources and their weights, and which source each row of each batch comes from.

One source is `data.paths` (or the built-in corpus). Several are a mixture file, `data.mixture`:

  [sources.web]                 # a name: letters, digits, _ and -
  paths = "gs://bucket/web/*.parquet"   # as data.paths; relative to the file's folder
  weight = 64.75                # relative: weights need not sum to 1 or 100
  text_field = "text"           # optional; default data.text_field
  exclude = {"meta.redpajama_set_name" = ["RedPajamaC4"]}   # optional: records to skip

and `data.weights=web:60,code:15` overrides weights by name.

Rows are assigned by weight in closed form, with no randomness and no replay: the sources sit at
the leaves of a balanced binary tree; at a node whose two sides weigh A and B, the node's n-th row
goes left when floor((n+1)A/(A+B)) > floor(nA/(A+B)) and arrives there as row floor(nA/(A+B)) (else
as row n - floor(nA/(A+B)) on the right). Among any N consecutive rows a source's count is within
depth (ceil(log2 sources)) of N x its weight, every prefix of the run, far inside a binomial
draw's spread; and a source's k-th row reads its k-th window of its own shuffled order, so each
source is read in its own order without gaps or repeats until its epoch ends.

A change of weights on resume starts a new segment at the rows consumed so far: rows before it keep
their sources, each source continues from the windows it had reached (`Segments`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celerity_jax.config import ConfigError

QUANTUM = 1 << 20  # weights are integers out of this: exact integer arithmetic at any row count
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
SOURCE_KEYS = {"paths", "weight", "text_field", "exclude"}


@dataclass(frozen=True)
class Source:
  name: str
  paths: str  # "" = the built-in corpus (data.corpus)
  weight: float
  text_field: str
  exclude: dict | None = None  # {field (dotted): [values]}: records skipped (corpus.documents)


def sources(data_cfg) -> list[Source]:
  """The run's sources (one without data.mixture), with data.weights applied."""
  if data_cfg.mixture and data_cfg.paths:
    raise ConfigError(
      "data.paths and data.mixture are both set: name the files in the mixture's sources, or "
      "give data.paths alone"
    )
  if not data_cfg.mixture:
    name = "data" if data_cfg.paths else data_cfg.corpus
    found = [Source(name, data_cfg.paths, 1.0, data_cfg.text_field)]
  else:
    found = _read(data_cfg.mixture, data_cfg.text_field)
  if data_cfg.weights:
    given = _parse_weights(data_cfg.weights)
    names = {s.name for s in found}
    unknown = sorted(set(given) - names)
    if unknown:
      raise ConfigError(
        f"data.weights: unknown source {', '.join(unknown)} (the sources are "
        f"{', '.join(sorted(names))})"
      )
    found = [
      Source(s.name, s.paths, given.get(s.name, s.weight), s.text_field, s.exclude) for s in found
    ]
  return found


def _parse_weights(spec: str) -> dict[str, float]:
  out = {}
  for item in (i.strip() for i in spec.split(",") if i.strip()):
    name, sep, value = item.partition(":")
    try:
      weight = float(value)
    except ValueError:
      weight = None
    if not sep or weight is None:
      raise ConfigError(f"data.weights: {item!r} is not NAME:WEIGHT (e.g. web:60,code:15)")
    _check_weight(f"data.weights: {name.strip()}", weight)
    out[name.strip()] = weight
  return out


def _check_weight(where: str, weight) -> float:
  if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
    raise ConfigError(f"{where}: weight {weight!r} must be a number above 0")
  if not np.isfinite(weight):
    raise ConfigError(f"{where}: weight {weight!r} must be finite")
  return float(weight)


def _read(path: str, default_field: str) -> list[Source]:
  file = Path(path).expanduser()
  try:
    table = tomllib.loads(file.read_text())
  except OSError as e:
    raise ConfigError(f"data.mixture: cannot read {path}: {e.strerror or e}") from None
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"data.mixture: {path} is not valid TOML: {e}") from None
  extra = set(table) - {"sources"}
  if extra or not isinstance(table.get("sources"), dict) or not table["sources"]:
    raise ConfigError(
      f"data.mixture: {path} must hold [sources.NAME] tables and nothing else"
      + (f" (found {', '.join(sorted(extra))})" if extra else "")
    )
  found = []
  for name, entry in table["sources"].items():
    where = f"data.mixture: {path}: [sources.{name}]"
    if not NAME.match(name):
      raise ConfigError(f"{where}: a name is letters, digits, _ and - only")
    if not isinstance(entry, dict):
      raise ConfigError(f"{where}: not a table")
    unknown = set(entry) - SOURCE_KEYS
    if unknown:
      raise ConfigError(f"{where}: unknown key {', '.join(sorted(unknown))}")
    for needed in ("paths", "weight"):
      if needed not in entry:
        raise ConfigError(f"{where}: no {needed}")
    paths = entry["paths"]
    if isinstance(paths, list):
      paths = ",".join(paths)
    if not isinstance(paths, str) or not paths.strip():
      raise ConfigError(f"{where}: paths must name files, directories or globs")
    paths = ",".join(_relative_to(file.parent, p.strip()) for p in paths.split(",") if p.strip())
    field = entry.get("text_field", default_field)
    if not isinstance(field, str) or not field:
      raise ConfigError(f"{where}: text_field must be a field name")
    exclude = entry.get("exclude")
    if exclude is not None and not (
      isinstance(exclude, dict)
      and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in exclude.values())
    ):
      raise ConfigError(f'{where}: exclude must be {{"field" = ["value", ...]}}')
    found.append(Source(name, paths, _check_weight(where, entry["weight"]), field, exclude))
  return found


def _relative_to(folder: Path, item: str) -> str:
  if "://" in item or Path(item).expanduser().is_absolute():
    return item
  return str(folder / item)


def quantize(weights: list[float]) -> list[int]:
  """Weights as positive integers summing to QUANTUM (largest remainder; none rounds to 0)."""
  total = sum(weights)
  exact = [w / total * QUANTUM for w in weights]
  out = [int(e) for e in exact]
  for i in sorted(range(len(exact)), key=lambda i: out[i] - exact[i])[: QUANTUM - sum(out)]:
    out[i] += 1
  for i in range(len(out)):
    if out[i] == 0:
      out[i] = 1
      out[out.index(max(out))] -= 1
  return out


def _split(n: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
  """(goes left, rank on its side) of node ranks n at a node weighing a | b."""
  before = (n * a) // (a + b)
  left = ((n + 1) * a) // (a + b) > before
  return left, np.where(left, before, n - before)


def assign(n: np.ndarray, weights: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """(source, rank within the source) of rows n (0-based within one segment)."""
  n = np.asarray(n, np.int64)
  source, rank = np.zeros(len(n), np.int64), np.zeros(len(n), np.int64)

  def descend(lo, hi, where, ranks):
    if hi - lo == 1:
      source[where], rank[where] = lo, ranks
      return
    mid = (lo + hi) // 2
    left, side_rank = _split(ranks, sum(weights[lo:mid]), sum(weights[mid:hi]))
    descend(lo, mid, where[left], side_rank[left])
    descend(mid, hi, where[~left], side_rank[~left])

  descend(0, len(weights), np.arange(len(n)), n)
  return source, rank


def counts(n_rows: int, weights: list[int]) -> list[int]:
  """Rows of each source among the first n_rows of a segment."""
  out = [0] * len(weights)

  def descend(lo, hi, n):
    if hi - lo == 1:
      out[lo] = n
      return
    mid = (lo + hi) // 2
    a, b = sum(weights[lo:mid]), sum(weights[mid:hi])
    left = n * a // (a + b) if a + b else 0  # 0 + 0: none of these sources in the segment
    descend(lo, mid, left)
    descend(mid, hi, n - left if a + b else 0)

  descend(0, len(weights), int(n_rows))
  return out


def _present(names: list[str], weights: dict) -> list[int]:
  """A segment's quantized weights over `names`; 0 for a source it did not have (a resume on
  other data: the run's earlier rows came from sources it no longer reads)."""
  here = [name for name in names if name in weights]
  q = dict(zip(here, quantize([float(weights[n]) for n in here]), strict=True)) if here else {}
  return [q.get(name, 0) for name in names]


class Segments:
  """The run's weights over its rows: [[start row, {name: weight}], ...], the first at row 0."""

  def __init__(self, names: list[str], segments: list):
    self.names = names
    self.starts = [int(start) for start, _ in segments]
    self.weights = [_present(names, w) for _, w in segments]
    self.bases = [[0] * len(names)]  # rows of each source before each segment
    for k in range(1, len(segments)):
      done = counts(self.starts[k] - self.starts[k - 1], self.weights[k - 1])
      self.bases.append([b + d for b, d in zip(self.bases[-1], done, strict=True)])

  def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source index, the source's own row) of global rows."""
    rows = np.asarray(rows, np.int64)
    source, rank = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    segment = np.searchsorted(self.starts, rows, side="right") - 1
    for k in np.unique(segment):
      at = segment == k
      s, r = assign(rows[at] - self.starts[k], self.weights[k])
      source[at], rank[at] = s, r + np.asarray(self.bases[k])[s]
    return source, rank

  def rows_per_source(self, n_rows: int) -> list[int]:
    """Rows of each source among the run's first n_rows."""
    k = int(np.searchsorted(self.starts, n_rows, side="right") - 1) if n_rows else 0
    done = counts(max(0, n_rows - self.starts[k]), self.weights[k])
    return [b + d for b, d in zip(self.bases[k], done, strict=True)]
