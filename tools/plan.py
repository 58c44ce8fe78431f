"""Plan a model family: every derived hyperparameter, FLOPs and estimated wall time per member.

  python -m tools.plan recipe=celerity_1b [scaling.tpp=80 ...] [--family celerity]
                       [--accelerator v5p|v6e|v5e|h100|h200] [--chips 64] [--mfu 0.4] [--json]

The family is every recipe whose name starts with --family (default: the recipe name up to its first
underscore); the recipe's overrides apply to each member. FLOPs use the paper's convention
(6 N D + full attention); wall time = FLOPs / (chips x bf16 peak x MFU).
"""
from __future__ import annotations

import argparse
import json
import sys

# dense bf16 peak TFLOP/s per chip (vendor figures)
PEAK_TFLOPS = {"v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "h100": 989.0, "h200": 989.0}


def plan(argv: list[str]) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", default=None)
  parser.add_argument("--accelerator", choices=sorted(PEAK_TFLOPS), default="v5p")
  parser.add_argument("--chips", type=int, default=64)
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--json", action="store_true")
  args, rest = parser.parse_known_args(argv)

  import recipes
  from celerity_jax import scaling
  from celerity_jax.config import apply_overrides, validate
  from celerity_jax.main import parse
  from celerity_jax.resolve import resolve

  cfg, _ = parse(rest)                                  # validates the recipe and overrides
  name = next((a.split("=", 1)[1] for a in rest if a.startswith("recipe=")), recipes.DEFAULT)
  family = args.family or name.split("_")[0]
  overrides = [a for a in rest if not a.startswith("recipe=")]
  rows = []
  peak = PEAK_TFLOPS[args.accelerator] * 1e12 * args.chips * args.mfu
  for member in (m for m in recipes.available() if m.startswith(family)):
    member_cfg = validate(apply_overrides(recipes.load(member), overrides))
    r = resolve(member_cfg, n_devices=1)
    flops = scaling.flops_per_token(member_cfg.model, causal=False, all_params=True) * r.tokens
    rows.append({"recipe": member, "N": r.n_params, "D": r.tokens, "TPP": r.tpp,
                 "B_seqs": r.batch_seqs, "B_tokens": r.batch_tokens, "T": r.steps,
                 "warmup": r.warmup_steps, "eta_hidden": r.eta_hidden,
                 "eta_embed": r.lr_peak["embed"], "lambda": r.weight_decay, "tau": r.tau,
                 "flops": flops, "hours": flops / peak / 3600})
  del cfg
  rows.sort(key=lambda row: row["N"])
  return rows, args


def table(rows: list[dict], args) -> str:
  from celerity_jax.scaling import fmt_count
  head = (f"{'recipe':<16}{'N':>8}{'D':>8}{'TPP':>6}{'B seq':>7}{'B tok':>8}{'T':>8}{'warm':>6}"
          f"{'eta_h':>9}{'eta_emb':>9}{'lambda':>8}{'tau':>7}{'FLOPs':>10}{'hours':>9}")
  lines = [f"wall time on {args.chips} x {args.accelerator} at MFU {args.mfu:g}", head]
  for r in rows:
    lines.append(f"{r['recipe']:<16}{fmt_count(r['N']):>8}{fmt_count(r['D']):>8}{r['TPP']:>6g}"
                 f"{r['B_seqs']:>7}{fmt_count(r['B_tokens']):>8}{r['T']:>8,}{r['warmup']:>6}"
                 f"{r['eta_hidden']:>9.2e}{r['eta_embed']:>9.2e}{r['lambda']:>8.3g}"
                 f"{r['tau']:>7.3f}{r['flops']:>10.3g}{r['hours']:>9.3g}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  from celerity_jax.main import run_cli
  def show():
    rows, args = plan(argv)
    print(json.dumps(rows, indent=2) if args.json else table(rows, args))
  return run_cli(show)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
