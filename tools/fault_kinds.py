"""The faults the fault-injection campaign injects (tools.fault_campaign), each at two severities.

A fault is a list of segments that a run, branched from a clean run's checkpoint at the injection
step, resumes through: each segment is the project's own resume with changed settings
(`checkpoint.allow_config_change=true`), up to a step or to the end. Nothing edits the monitor's
input; data faults resume on other files (`data.paths`), with the run's own tokenizer.

  lr_up / lr_down   every LR x k / k for the rest of the run, tau held (lambda / k, k)
  lr_burst          every LR x k for BURST_FRAC of T, then back
  batch_restart     B x k for the rest, lambda pinned at the planned value: tau x k (the
                    paper's incident: a restart under a new allocation)
  wd_change         lambda x k for the rest (tau / k)
  wd_off            lambda = 0 for WINDOW_FRAC of T (mild) or the rest (strong)
  opt_reset         Adam's moments lost on a restart: once (mild), or at every restart, one each
                    WINDOW_FRAC of T (strong)
  data_repeat       WINDOW_FRAC of T on a small part of the corpus, read over and over
  data_shuffle      WINDOW_FRAC of T on documents with their lines (mild) or tokens (strong)
                    shuffled
  source_swap       the rest on other text: other Python code (mild), English prose (strong)
  bf16_master       params kept in bf16 (optim.master_weights) for WINDOW_FRAC of T or the rest
  clip_tight        the rest with the gradient's global norm clipped to CLIP (mild, strong)
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

WINDOW_FRAC = 0.10  # a window fault's length, and the strong opt_reset's spacing
BURST_FRAC = 0.04  # an LR burst's length
FACTORS = {  # kind -> (mild, strong) factor k
  "lr_up": (2.0, 4.0),
  "lr_down": (2.0, 4.0),
  "lr_burst": (4.0, 16.0),
  "batch_restart": (2, 4),
  "wd_change": (3.0, 10.0),
}
# clip_tight's thresholds: under Adam (scale-invariant) a clip changes the step only where the
# clipped per-coordinate gradient, about CLIP / sqrt(N), nears Adam's eps (1e-8)
CLIP = (1e-4, 1e-7)
REPEAT_TOKENS = (64_000, 8_000)  # data_repeat's part of the corpus (mild, strong), in tokens
SHUFFLE_TOKENS = 400_000  # documents in each shuffled file
SWAP_TOKENS = 2_000_000  # at most, in each swapped-in file
SEVERITIES = ("mild", "strong")


@dataclass(frozen=True)
class Segment:
  until: int | None  # the step it stops at; None: the run's end
  overrides: tuple[str, ...] = ()
  restore_optimizer: bool = True


@dataclass(frozen=True)
class Planned:
  """What a fault is sized from: the clean run's settings and the campaign's data files."""

  steps: int  # T
  batch: int  # B (sequences)
  lr_base: float
  weight_decay: float  # the resolved lambda
  data_dir: Path  # fault_sources' files
  tokenizer: str  # the clean runs' tokenizer file


KINDS = (
  "lr_up",
  "lr_down",
  "lr_burst",
  "batch_restart",
  "wd_change",
  "wd_off",
  "opt_reset",
  "data_repeat",
  "data_shuffle",
  "source_swap",
  "bf16_master",
  "clip_tight",
)

DESCRIBE = {
  "lr_up": "LR x2 / x4 for the rest (tau held)",
  "lr_down": "LR /2 / /4 for the rest (tau held)",
  "lr_burst": "LR x4 / x16 for 4% of T",
  "batch_restart": "restart at B x2 / x4, lambda kept (tau x2 / x4)",
  "wd_change": "lambda x3 / x10 for the rest (tau /3 / /10)",
  "wd_off": "lambda = 0 for 10% of T / the rest",
  "opt_reset": "Adam state lost once / at every 10% of T",
  "data_repeat": "10% of T on 64k / 8k tokens of the corpus",
  "data_shuffle": "10% of T on line- / token-shuffled documents",
  "source_swap": "the rest on other Python code / English prose",
  "bf16_master": "bf16 master weights for 10% of T / the rest",
  "clip_tight": "gradient norm clipped to 1e-4 / 1e-7 for the rest",
}


def segments(kind: str, severity: str, at: int, p: Planned) -> list[Segment]:
  """The segments a run resumes through from step `at`, the injection step."""
  strong = severity == "strong"
  k = FACTORS.get(kind, (None, None))[strong]
  window = max(1, round(WINDOW_FRAC * p.steps))
  end = min(at + window, p.steps - 1)  # a window ends before the run does
  data = lambda name: (f"data.paths={p.data_dir / name}", f"data.tokenizer={p.tokenizer}")  # noqa: E731
  back = Segment(None, (f"data.tokenizer={p.tokenizer}",))
  if kind == "lr_up":
    return [Segment(None, (f"optim.lr_base={p.lr_base * k:.6g}",))]
  if kind == "lr_down":
    return [Segment(None, (f"optim.lr_base={p.lr_base / k:.6g}",))]
  if kind == "lr_burst":
    burst = max(1, round(BURST_FRAC * p.steps))
    return [Segment(at + burst, (f"optim.lr_base={p.lr_base * k:.6g}",)), Segment(None)]
  if kind == "batch_restart":
    return [
      Segment(None, (f"train.batch_size={p.batch * k}", f"optim.weight_decay={p.weight_decay:.6g}"))
    ]
  if kind == "wd_change":
    return [Segment(None, (f"optim.weight_decay={p.weight_decay * k:.6g}",))]
  if kind == "wd_off":
    off = ("optim.weight_decay=0",)
    return [Segment(None, off)] if strong else [Segment(end, off), Segment(None)]
  if kind == "opt_reset":
    if not strong:
      return [Segment(None, restore_optimizer=False)]
    starts = list(range(at, p.steps, window))
    return [
      Segment(starts[i + 1] if i + 1 < len(starts) else None, restore_optimizer=False)
      for i in range(len(starts))
    ]
  if kind == "data_repeat":
    return [Segment(end, data(f"repeat_{severity}.jsonl")), back]
  if kind == "data_shuffle":
    return [Segment(end, data(f"shuffle_{severity}.jsonl")), back]
  if kind == "source_swap":
    return [Segment(None, data(f"swap_{severity}.jsonl"))]
  if kind == "bf16_master":
    bf16 = ("optim.master_weights=bfloat16",)
    return [Segment(None, bf16)] if strong else [Segment(end, bf16), Segment(None)]
  if kind == "clip_tight":
    return [Segment(None, (f"optim.clip_norm={CLIP[strong]:g}",))]
  raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")


def _stdlib_documents(seed: int) -> list[str]:
  from celerity_jax.data.corpus import documents, stdlib_files

  docs = list(documents(stdlib_files()))
  random.Random(seed).shuffle(docs)
  return docs


def _held_out(text: str) -> bool:
  from celerity_jax.config import DataConfig
  from celerity_jax.data.shards import held_out

  return held_out(text.encode("utf-8", "replace"), DataConfig().eval_frac)


def _take(docs, tokenizer, budget: int) -> list[str]:
  """Training documents (not held out) from the front of `docs` until they hold `budget`
  tokens."""
  out, have = [], 0
  for doc in docs:
    if have >= budget:
      break
    if _held_out(doc):
      continue
    n = len(tokenizer.encode([doc])[0])
    out.append(doc)
    have += n
  return out


def _write(path: Path, texts: list[str], pool: list[str]):
  """`texts` as JSONL, plus one held-out document from `pool` if none of them is held out (a
  source needs one; it is never trained on)."""
  if not any(_held_out(t) for t in texts):
    texts = [*texts, next(d for d in pool if _held_out(d))]
  tmp = path.with_suffix(".tmp")
  with tmp.open("w") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")
  tmp.replace(path)


def fault_sources(out: Path, tokenizer_path: str, seed: int = 0) -> dict[str, Path]:
  """Writes (once) the files the data faults resume on, as JSONL with a `text` field: parts of
  the stdlib corpus (repeat_*), shuffled copies of its documents (shuffle_*), and other text
  (swap_mild: numpy's Python source; swap_strong: installed packages' METADATA, mostly English
  prose and Markdown). Returns name -> path."""
  from celerity_jax.data import tokenizer as tokenizer_lib

  out.mkdir(parents=True, exist_ok=True)
  names = [f"{k}_{s}" for k in ("repeat", "shuffle", "swap") for s in SEVERITIES]
  paths = {n: out / f"{n}.jsonl" for n in names}
  if all(p.is_file() for p in paths.values()):
    return paths
  tok = tokenizer_lib.load(tokenizer_path)
  docs = _stdlib_documents(seed)
  rng = random.Random(seed + 1)
  for severity, budget in zip(SEVERITIES, REPEAT_TOKENS, strict=True):
    _write(paths[f"repeat_{severity}"], _take(docs, tok, budget), docs)
  part = _take(docs[len(docs) // 2 :], tok, SHUFFLE_TOKENS)
  lines = []
  for doc in part:
    rows = doc.splitlines()
    rng.shuffle(rows)
    lines.append("\n".join(rows))
  _write(paths["shuffle_mild"], lines, docs)
  shuffled = []
  for doc in part:
    ids = list(tok.encode([doc])[0])
    rng.shuffle(ids)
    shuffled.append(tok.decode(ids))
  _write(paths["shuffle_strong"], shuffled, docs)
  site = Path(sysconfig.get_paths()["purelib"])
  numpy = [p.read_text(errors="replace") for p in sorted((site / "numpy").rglob("*.py"))]
  prose = [p.read_text(errors="replace") for p in sorted(site.glob("*.dist-info/METADATA"))]
  _write(paths["swap_mild"], _take([d for d in numpy if d.strip()], tok, SWAP_TOKENS), docs)
  _write(paths["swap_strong"], _take([d for d in prose if d.strip()], tok, SWAP_TOKENS), docs)
  return paths
