"""The collapse experiment's families and the runs each one needs (tools.collapse_experiment).

A family is its sizes (the members collapse, the surrogate and the predictions are judged on), an
optional smaller extra member, the seeds that measure the noise floor and the runs at other TPPs
that let the surrogate fit its TPP dependence. Every run's name says what it is:
  matched_X      X at tau_opt(20), seed 0           seedS_X       X with train.seed=S
  mismatched_X   the first size at 3 tau_opt and the third at tau_opt / 3 (the second matched)
  taulow_X       the first size at tau_opt / 3 (with the two above: an early-stopped tau sweep)
  halfbatch_X    the first size at B / 2, seeds 0-2 (same tokens and tau; kept out of every fit)
  tppP_X         X at P TPP and tau_opt(P)        fault_X       resumed at t = 0.6 with LR x 3
"""

from __future__ import annotations

from dataclasses import dataclass

FAULT_AT, FAULT_LR = 0.6, 3.0
TPP = 20.0


@dataclass(frozen=True)
class Family:
  name: str
  sizes: tuple[str, ...]  # recipes, smallest first
  extra: str | None  # a smaller member trained alongside, reported as a family with one more size
  seeds: tuple[int, ...]  # further seeds of sizes[0]; sizes[1] gets seed 1
  fit_tpps: tuple[tuple[str, tuple[int, ...]], ...]  # (recipe, TPPs) for the surrogate fit
  out: str  # default output directory
  figure: str  # default figure path
  title: str


FAMILIES = {
  "nano": Family(
    "nano",
    ("celerity_nano_2", "celerity_nano_3", "celerity_nano_4"),
    "celerity_nano_1",
    (1, 2, 3, 4),
    (("celerity_nano_1", (10, 40, 80)), ("celerity_nano_2", (10, 40))),
    "runs/collapse",
    "docs/collapse.png",
    "nano family, 20 TPP, B = 32",
  ),
  "gpu": Family(
    "gpu",
    tuple(f"celerity_gpu_{s}" for s in ("10m", "25m", "50m", "85m", "150m")),
    None,
    (1, 2, 3, 4),
    (("celerity_gpu_10m", (10, 40, 80)), ("celerity_gpu_25m", (10, 40))),
    "runs/collapse_gpu",
    "docs/collapse_gpu.png",
    "GPU family, 20 TPP, the batch law's B",
  ),
}


def short(recipe: str) -> str:
  return recipe.removeprefix("celerity_")


def tau_opt(tpp: float = TPP) -> float:
  from celerity_jax import scaling
  from celerity_jax.config import ScalingConfig

  s = ScalingConfig()
  return scaling.tau_opt(tpp, s.tau_c, s.tau_m)


def config(recipe: str, overrides: list[str]):
  from celerity_jax import recipes

  return recipes.configure(recipe, overrides)


def resolved(recipe: str, overrides: list[str]):
  import jax

  from celerity_jax.resolve import resolve

  return resolve(config(recipe, overrides), len(jax.devices()))


def half_batch(recipe: str, base: list[str]) -> list[str]:
  """B / 2, with half the rows per microbatch where the recipe sets them (so B / 2 is still a
  multiple of rows x devices)."""
  rows = config(recipe, base).train.microbatch_rows
  half = [f"train.batch_size={resolved(recipe, base).batch_seqs // 2}"]
  return half + ([f"train.microbatch_rows={max(1, rows // 2)}"] if rows else [])


def plan(f: Family, base: list[str]) -> dict[str, tuple[str, list[str]]]:
  """name -> (recipe, overrides) for every run without a fault that the fits may use."""
  first, second, third = f.sizes[:3]
  p = {f"matched_{short(r)}": (r, []) for r in ((f.extra,) if f.extra else ()) + f.sizes}
  p |= {f"seed{s}_{short(first)}": (first, [f"train.seed={s}"]) for s in f.seeds}
  p[f"seed1_{short(second)}"] = (second, ["train.seed=1"])
  p |= {
    f"mismatched_{short(first)}": (first, [f"optim.tau={3 * tau_opt():.6g}"]),
    f"mismatched_{short(third)}": (third, [f"optim.tau={tau_opt() / 3:.6g}"]),
    f"taulow_{short(first)}": (first, [f"optim.tau={tau_opt() / 3:.6g}"]),
    f"halfbatch_{short(first)}": (first, half_batch(first, base)),
  }
  for recipe, tpps in f.fit_tpps:
    p |= {f"tpp{t}_{short(recipe)}": (recipe, [f"scaling.tpp={t}"]) for t in tpps}
  return p


def mismatched(f: Family) -> list[str]:
  """The run names of the mismatched-tau family: first size at 3 tau_opt, second at tau_opt,
  third at tau_opt / 3."""
  first, second, third = (short(r) for r in f.sizes[:3])
  return [f"mismatched_{first}", f"matched_{second}", f"mismatched_{third}"]


def half_batch_seeds(f: Family, base: list[str]) -> dict[str, tuple[str, list[str]]]:
  """Seeds 1-2 of the first size at B / 2: only for the half-batch comparison (kept out of every
  fit, so the surrogate constants come from plan()'s runs alone)."""
  first = f.sizes[0]
  half = half_batch(first, base)
  return {f"halfbatch_seed{s}_{short(first)}": (first, [*half, f"train.seed={s}"]) for s in (1, 2)}


def fault_overrides(recipe: str, overrides: list[str]) -> list[str]:
  """The fault: every group's LR x FAULT_LR from the resume on (tau held, so lambda / FAULT_LR)."""
  lr = config(recipe, overrides).optim.lr_base
  return [f"optim.lr_base={FAULT_LR * lr:.6g}"]


def fault_runs(f: Family) -> dict[str, str]:
  """name -> recipe: the smallest and the largest size, each resumed at FAULT_AT with the fault."""
  return {f"fault_{short(r)}": r for r in (f.sizes[0], f.sizes[-1])}


def budget(f: Family, base: list[str]) -> tuple[list[dict], dict]:
  """Every run with its N, D, B, T and training FLOPs (a fault run counts its resumed part), and
  the totals: what --dry-run prints and what the corpus must hold."""
  runs = [(name, r, o, 1.0) for name, (r, o) in plan(f, base).items()]
  runs += [(name, r, o, 1.0) for name, (r, o) in half_batch_seeds(f, base).items()]
  runs += [(name, r, [], 1.0 - FAULT_AT) for name, r in fault_runs(f).items()]
  rows = []
  for name, recipe, overrides, frac in runs:
    x = resolved(recipe, [*base, *overrides])
    rows.append(
      {
        "name": name,
        "recipe": recipe,
        "overrides": overrides,
        "n_params": x.n_params,
        "tokens": x.tokens,
        "batch_seqs": x.batch_seqs,
        "steps": x.steps,
        "flops": frac * x.tokens * x.flops_per_token,
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
