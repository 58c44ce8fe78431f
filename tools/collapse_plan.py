"""The collapse experiment's families and the runs each one needs (tools.collapse_experiment).

Two stages, so that the family trains at the LR its smallest member prefers (muTransfer's recipe):
  sweep   the first size, seed 0, at every (tau_opt x m, eta_published x k) of the grid
  family  every size at tau_opt and eta* (the grid's best final loss at tau_opt), seed 0 (the
          first size's is the sweep's run); seeds 1.. of the first two sizes (sigma); the first
          size at B x (1/2, 2, 4) with tau held (is B at or below the critical batch?)
Runs in `more` (a follow-up registered after the first results) join the family stage. The
mismatched-tau families reuse the sweep: the first size at tau_opt x m (eta*), the other sizes
matched. Every run evaluates a fixed held-out set (the first `eval_rows` rows of one order) at
`eval_points` evenly spaced steps. Run names say what a run is:
  sweep_tau{m}_lr{k}   size{i}_seed{s}   batch{B}_size1
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PUBLISHED_LR = 1.62e-2  # the family rule's optim.lr_base (the published width-256 proxy value)


@dataclass(frozen=True)
class Family:
  name: str
  sizes: tuple[str, ...]  # recipes at one depth, smallest first
  # (recipe, seeds) added after the first results (a follow-up), at eta*: more seeds of a size,
  # or a new size (numbered after `sizes`)
  more: tuple[tuple[str, int], ...]
  seeds: tuple[int, int]  # seeds of the first and of the second size (seed 0 included)
  tau_mults: tuple[float, ...]  # the sweep's grid, x tau_opt
  lr_mults: tuple[float, ...]  # ... and x PUBLISHED_LR
  batch_mults: tuple[float, ...]  # the first size at these multiples of B (tau held)
  eval_rows: int  # the held-out set: this many rows of the fixed held-out order
  eval_points: int  # held-out evaluations per run (train.eval_every = T // eval_points)
  out: str
  figure: str


FAMILIES = {
  "long": Family(
    "long",
    tuple(f"celerity_long_{i}" for i in range(1, 5)),
    (("celerity_long_3", 3), ("celerity_long_5", 1)),
    (5, 3),
    (0.25, 0.5, 1.0, 2.0),
    (0.25, 0.5, 1.0, 2.0),
    (0.5, 2.0, 4.0),
    128,
    128,
    "runs/collapse_long",
    "docs/collapse_long.png",
  ),
  "gpu": Family(
    "gpu",
    tuple(f"celerity_gpu_{s}" for s in ("10m", "25m", "50m", "85m", "150m")),
    (),
    (5, 3),
    (0.25, 0.5, 1.0, 2.0),
    (0.25, 0.5, 1.0, 2.0),
    (0.5, 2.0),
    512,
    128,
    "runs/collapse_gpu",
    "docs/collapse_gpu.png",
  ),
}


@dataclass(frozen=True)
class Run:
  name: str
  recipe: str
  overrides: tuple[str, ...]  # what makes it this run; the experiment adds eval and base keys
  stage: str  # "sweep" | "family"


def seeds_of(f: Family, i: int) -> int:
  """Seeds of size i (0 = the smallest) in the registered design."""
  return f.seeds[i] if i < len(f.seeds) else 1


def size_index(f: Family, recipe: str) -> int:
  """0 for the smallest; members added in `more` count on after `sizes`."""
  if recipe in f.sizes:
    return f.sizes.index(recipe)
  new = [r for r, _ in f.more if r not in f.sizes]
  return len(f.sizes) + new.index(recipe)


def config(recipe: str, overrides: list[str]):
  from celerity_jax import recipes

  return recipes.configure(recipe, list(overrides))


def resolved(recipe: str, overrides: list[str]):
  import jax

  from celerity_jax.resolve import resolve

  return resolve(config(recipe, overrides), len(jax.devices()))


def sweep_name(tau_mult: float, lr_mult: float) -> str:
  return f"sweep_tau{tau_mult:g}_lr{lr_mult:g}"


def sweep(f: Family, base: list[str]) -> list[Run]:
  """The first size at every (tau, eta) of the grid, seed 0."""
  opt = resolved(f.sizes[0], base).tau_opt
  return [
    Run(
      sweep_name(m, k),
      f.sizes[0],
      (f"optim.tau={m * opt:.6g}", f"optim.lr_base={k * PUBLISHED_LR:.6g}"),
      "sweep",
    )
    for m in f.tau_mults
    for k in f.lr_mults
  ]


def family(f: Family, lr_mult: float, base: list[str]) -> list[Run]:
  """The runs at tau_opt and eta* = lr_mult x PUBLISHED_LR (the first size's seed 0 is the
  sweep's run)."""
  lr = f"optim.lr_base={lr_mult * PUBLISHED_LR:.6g}"
  runs = []
  for i, recipe in enumerate(f.sizes):
    for s in range(1 if i == 0 else 0, seeds_of(f, i)):
      runs.append(Run(f"size{i + 1}_seed{s}", recipe, (lr, f"train.seed={s}"), "family"))
  for recipe, n in f.more:
    i = size_index(f, recipe)
    had = seeds_of(f, i) if recipe in f.sizes else 0
    for s in range(had, n):
      runs.append(Run(f"size{i + 1}_seed{s}", recipe, (lr, f"train.seed={s}"), "family"))
  first = f.sizes[0]
  b = resolved(first, base).batch_seqs
  for mult in f.batch_mults:
    runs.append(
      Run(f"batch{round(b * mult)}_size1", first, (lr, *batch(first, base, mult)), "family")
    )
  return runs


def batch(recipe: str, base: list[str], mult: float) -> list[str]:
  """B x mult with tau held (lambda follows B), microbatch rows scaled where the recipe sets
  them."""
  b = resolved(recipe, base).batch_seqs
  rows = config(recipe, base).train.microbatch_rows
  out = [f"train.batch_size={round(b * mult)}"]
  return out + ([f"train.microbatch_rows={max(1, round(rows * min(mult, 1)))}"] if rows else [])


def eval_overrides(f: Family, recipe: str, overrides: list[str]) -> list[str]:
  """The same held-out rows at every B (eval_rows // B batches) at eval_points evenly spaced
  steps."""
  x = resolved(recipe, overrides)
  return [
    f"data.eval_batches={max(1, f.eval_rows // x.batch_seqs)}",
    f"train.eval_every={max(1, x.steps // f.eval_points)}",
  ]


def lr_star(f: Family, out: Path) -> float:
  """eta* / PUBLISHED_LR: the sweep's lowest final loss among its tau_opt runs; the sweep must be
  finished."""
  from celerity_jax.collapse.curves import load_run

  finals = {
    k: load_run(out / sweep_name(1.0, k), require_finished=True).final_loss for k in f.lr_mults
  }
  return min(finals, key=finals.get)


def alias(f: Family, lr_mult: float) -> dict[str, str]:
  """Logical names that are another run's directory: the first size's matched seed 0."""
  return {"size1_seed0": sweep_name(1.0, lr_mult)}


def stage_record(out: Path, lr_mult: float):
  (out / "eta_star.json").write_text(
    json.dumps({"lr_mult": lr_mult, "lr_base": lr_mult * PUBLISHED_LR}) + "\n"
  )


def budget(f: Family, base: list[str], lr_mult: float = 1.0) -> tuple[list[dict], dict]:
  """Every run with its N, D, B, T and training FLOPs, and the totals: what --dry-run prints and
  what the corpus must hold (the family stage at eta = lr_mult x PUBLISHED_LR)."""
  rows = []
  for r in [*sweep(f, base), *family(f, lr_mult, base)]:
    x = resolved(r.recipe, [*base, *r.overrides])
    rows.append(
      {
        "name": r.name,
        "stage": r.stage,
        "n_params": x.n_params,
        "tokens": x.tokens,
        "batch_seqs": x.batch_seqs,
        "steps": x.steps,
        "flops": x.tokens * x.flops_per_token,
      }
    )
  totals = {
    "runs": len(rows),
    "flops": sum(r["flops"] for r in rows),
    "max_tokens": max(r["tokens"] for r in rows),
  }
  return rows, totals


def check_corpus(recipe: str, base: list[str], needed_tokens: float) -> int:
  """Builds (or reuses) the token stores the runs will read and fails, before any training, if
  the training split holds fewer than `needed_tokens`: a run that repeats its data bends its
  curve, which would be read as a failure of the collapse."""
  from celerity_jax.data import DataError
  from celerity_jax.data.prepare import prepare

  cfg = config(recipe, base)
  if cfg.data.corpus == "synthetic" and not cfg.data.paths:
    return 0
  have = sum(b.train.n_tokens for b in prepare(cfg.data, cfg.model.vocab_size).sources)
  if have < needed_tokens:
    source = f"data.paths={cfg.data.paths}" if cfg.data.paths else "the built-in stdlib corpus"
    raise DataError(
      f"{source} holds {have:,} training tokens; the largest run needs {needed_tokens:,.0f} "
      f"(D = TPP x N) without repeating data: pass a larger corpus in data.paths"
    )
  return have
