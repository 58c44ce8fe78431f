"""Plan a model family: every derived hyperparameter, FLOPs and estimated wall time per member.

  python -m celerity_jax.commands.plan recipe=celerity_1b [scaling.tpp=80 ...] [--family celerity]
                       [--accelerator v5p|v6e|v5e|h100|h200] [--chips 64] [--mfu 0.4] [--json]
                       [--check-fit [--topology v5p-64]]
  python -m celerity_jax.commands.plan --recipes-markdown     # every recipe, a markdown table

The family is every recipe whose name minus its size suffix (`_1b`, `_1_8b`, `_300m`, `_3`) equals
--family (default: the recipe's own): celerity, celerity_nano, celerity_moe, celerity_moe_nano. The
recipe's overrides apply to each member. FLOPs use the paper's convention with active parameters
(6 N_active D + full attention); wall time = FLOPs / (chips x bf16 peak x MFU). A mixture-of-experts
family also shows its active parameters and effective TPP (what sets tau).

Each member shows the slice its recipe is made for (the recipe's SLICE, or --topology) and its
layout: the mesh axes, remat and sequences per device per microbatch; B and T are resolved on that
slice's chips (on one device for a member without a slice). `--check-fit` compiles each member's
train step for that slice (or for --topology) with celerity_jax.commands.aot and adds whether it
fits, with the peak bytes per chip; this needs libtpu and takes a minute or more per large member.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from celerity_jax.cli import ArgumentParser, run_cli

# dense bf16 peak TFLOP/s per chip (vendor figures)
PEAK_TFLOPS = {"v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "h100": 989.0, "h200": 989.0}


def family_of(recipe: str) -> str:
  return re.sub(r"_(\d+(_\d+)?[mb]|\d+)$", "", recipe)


def plan(argv: list[str]) -> tuple[list[dict], argparse.Namespace]:
  """(one row per family member, the parsed flags)."""
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", default=None)
  parser.add_argument("--accelerator", choices=sorted(PEAK_TFLOPS), default="v5p")
  parser.add_argument("--chips", type=int, default=64)
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--json", action="store_true")
  parser.add_argument(
    "--check-fit",
    action="store_true",
    help="compile each member for its slice (celerity_jax.commands.aot) and say if it fits",
  )
  parser.add_argument(
    "--topology",
    default=None,
    help="with --check-fit: this slice for every member instead of the recipe's",
  )
  args, rest = parser.parse_known_args(argv)

  from celerity_jax import recipes, scaling
  from celerity_jax.cli import parse, recipe_name
  from celerity_jax.commands import tpu_chips
  from celerity_jax.config import ConfigError
  from celerity_jax.resolve import resolve

  cfg, _ = parse(rest)  # validates the recipe and overrides
  if args.chips < 1 or not 0 < args.mfu <= 1:
    raise ConfigError(f"--chips {args.chips} must be >= 1 and --mfu {args.mfu} in (0, 1]")
  name = recipe_name(rest)
  family = args.family or family_of(name)
  overrides = [a for a in rest if not a.startswith("recipe=")]
  rows = []
  peak = PEAK_TFLOPS[args.accelerator] * 1e12 * args.chips * args.mfu
  for member in (m for m in recipes.available() if family_of(m) == family):
    member_cfg = recipes.configure(member, overrides)
    target = args.topology or recipes.target_slice(member)
    try:
      chips = tpu_chips.chip_count(target) if target else 1
    except ValueError as e:
      raise ConfigError(str(e)) from None
    r = resolve(member_cfg, n_devices=chips, platform="tpu" if target else "")
    flops = scaling.flops_per_token(member_cfg.model, causal=False, all_params=True) * r.tokens
    rows.append(
      {
        "recipe": member,
        "N": r.n_params,
        "N_active": r.n_active,
        "D": r.tokens,
        "TPP": r.tpp,
        "TPP_eff": r.tpp_effective,
        "B_seqs": r.batch_seqs,
        "B_tokens": r.batch_tokens,
        "T": r.steps,
        "warmup": r.warmup_steps,
        "eta_hidden": r.eta_hidden,
        "eta_embed": r.lr_peak["embed"],
        "lambda": r.weight_decay,
        "tau": r.tau,
        "flops": flops,
        "hours": flops / peak / 3600,
        "slice": target,
        "layout": layout(member_cfg),
        "fit": None,
      }
    )
    if args.check_fit and rows[-1]["slice"]:
      rows[-1]["fit"] = check_fit(member_cfg, rows[-1]["slice"])
  del cfg
  rows.sort(key=lambda row: row["N"])
  return rows, args


def layout(cfg) -> str:
  """Mesh axes other than 1 (-1: the rest of the slice), remat, rows per microbatch."""
  mesh = " ".join(f"{k}={v}" for k, v in vars(cfg.mesh).items() if v != 1 and k != "slices")
  t = cfg.train
  micro = f"rows={t.microbatch_rows}" if t.microbatch_rows else f"micro={t.microbatches}"
  return f"{mesh} remat={cfg.model.remat} {micro}"


def check_fit(cfg, slice_name: str) -> dict:
  """celerity_jax.commands.aot's verdict for cfg on a slice: fits, peak and HBM bytes per chip."""
  from celerity_jax.commands import aot_compile, tpu_chips

  rep = aot_compile.report(cfg, tpu_chips.resolve_topology(slice_name))
  m = rep["memory"]
  return {
    "fits": m["fits"],
    "peak_bytes": m.get("peak_bytes") or m.get("needed_bytes"),
    "hbm_bytes": m["hbm_bytes"],
    "batch_seqs": rep["recipe_shape"]["batch_seqs"],
  }


def table(rows: list[dict], args) -> str:
  from celerity_jax.scaling import fmt_count

  moe = any(r["N_active"] != r["N"] for r in rows)
  head = (
    f"{'recipe':<20}{'N':>8}"
    + (f"{'N act':>8}" if moe else "")
    + f"{'D':>8}{'TPP':>6}"
    + (f"{'TPPeff':>7}" if moe else "")
    + f"{'B seq':>7}{'B tok':>8}{'T':>8}{'warm':>6}"
    f"{'eta_h':>9}{'eta_emb':>9}{'lambda':>8}{'tau':>7}{'FLOPs':>10}{'hours':>9}"
  )
  lines = [f"wall time on {args.chips} x {args.accelerator} at MFU {args.mfu:g}", head]
  for r in rows:
    lines.append(
      f"{r['recipe']:<20}{fmt_count(r['N']):>8}"
      + (f"{fmt_count(r['N_active']):>8}" if moe else "")
      + f"{fmt_count(r['D']):>8}{r['TPP']:>6g}"
      + (f"{r['TPP_eff']:>7.3g}" if moe else "")
      + f"{r['B_seqs']:>7}{fmt_count(r['B_tokens']):>8}{r['T']:>8,}{r['warmup']:>6}"
      f"{r['eta_hidden']:>9.2e}{r['eta_embed']:>9.2e}{r['lambda']:>8.3g}"
      f"{r['tau']:>7.3f}{r['flops']:>10.3g}{r['hours']:>9.3g}"
    )
  lines.append(f"\n{'recipe':<20}{'slice':<14}{'layout':<42}fits (peak / HBM per chip, B on it)")
  for r in rows:
    fit = r["fit"]
    verdict = (
      "not checked (--check-fit)"
      if fit is None and r["slice"]
      else ""
      if fit is None
      else f"{'yes' if fit['fits'] else 'NO'}: {fit['peak_bytes'] / 1e9:.1f} / "
      f"{fit['hbm_bytes'] / 1e9:.1f} GB, B = {fit['batch_seqs']}"
    )
    lines.append(f"{r['recipe']:<20}{r['slice'] or 'any':<14}{r['layout']:<42}{verdict}")
  return "\n".join(lines)


def recipes_markdown() -> str:
  """Every recipe as a row of a markdown table (docs/collapse.md holds this output; a test checks
  that it is current): what it is, its slice, and what it resolves to there at its own TPP."""
  from celerity_jax import recipes
  from celerity_jax.commands import tpu_chips
  from celerity_jax.resolve import resolve
  from celerity_jax.scaling import fmt_count

  rows = []
  for name in recipes.available():
    recipe, cfg = recipes.get(name), recipes.load(name)
    chips = tpu_chips.chip_count(recipe.slice) if recipe.slice else 1
    r = resolve(cfg, chips, platform="tpu" if recipe.slice else "")
    n = fmt_count(r.n_params) + (f" ({fmt_count(r.n_active)})" if r.n_active != r.n_params else "")
    line = (
      f"| `{name}` | {recipe.about} | {recipe.slice or 'any'} | {n} | {fmt_count(r.tokens)} "
      f"| {r.batch_seqs} × {cfg.model.seq_len} | {r.steps:,} | {r.tau:.3g} |"
    )
    rows.append((family_of(name), r.n_params, name, line))
  head = [
    "| recipe | what it is | slice | N (active) | D | B × context | T | τ |",
    "|---|---|---|---|---|---|---|---|",
  ]
  return "\n".join(head + [line for *_, line in sorted(rows)])


def main(argv: list[str]) -> int:
  def show():
    if argv == ["--recipes-markdown"]:
      print(recipes_markdown())
      return
    rows, args = plan(argv)
    print(json.dumps(rows, indent=2) if args.json else table(rows, args))

  return run_cli(show)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
