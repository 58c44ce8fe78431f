"""The collapse experiment's report as markdown tables and a figure (tools.collapse_experiment;
docs/collapse_long.md carries them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from celerity_jax.collapse.definitions import PUBLISHED_CURVE as PUBLISHED

NAMES = {"qiu": "Qiu et al.", "celerity": "Celerity", "ours": "ours"}


def _yes(holds: bool) -> str:
  return "holds" if holds else "**fails**"


def collapse_table(r: dict) -> list[str]:
  m, mis = r["collapse"]["matched"], r["collapse"]["mismatched"]
  mults = sorted(mis, key=float)
  lines = [
    "| definition | curve | verdict | δ* | Δ < σ on [0.2, 1] / [0.5, 1] "
    "| max Δ / max σ on [0.5, 1] | "
    + " | ".join(f"τ_opt × {k}: verdict, max Δ" for k in mults)
    + " |",
    "|---" * (6 + len(mults)) + "|",
  ]
  for key, j in m.items():
    name, curve = key.split("/")
    mark = " (published)" if PUBLISHED[name] == curve else ""
    cells = [
      f"{NAMES[name]}",
      f"{'held-out' if curve == 'eval' else 'training'}{mark}",
      _yes(j["holds"]),
      f"{j['delta_star']:.2f}",
      f"{j['share_below']:.0%} / {j['share_below_tail']:.0%}",
      f"{j['max_delta_tail']:.4f} / {j['max_sigma_tail']:.4f}",
    ]
    cells += [f"{_yes(mis[k][key]['holds'])}, {mis[k][key]['max_delta_tail']:.4f}" for k in mults]
    lines.append("| " + " | ".join(cells) + " |")
  fits = r["collapse"]["irreducible"]
  lines += [
    "",
    "L0 (L = L0 + a C^−b on the sizes' final losses): "
    + "; ".join(f"{c}: L0 = {x['L0']:.3f}, b = {x['b']:.3f}" for c, x in fits.items()),
  ]
  return lines


def claims_table(r: dict) -> list[str]:
  v = r["verdicts"]
  pct = lambda x: f"{x:+.2%}"  # noqa: E731
  rows = [
    ("1. the family at τ_opt collapses (Qiu et al., held-out)", "holds at δ = 0.5",
     f"δ* = {v['collapse_qiu_eval']['value']:.2f}", v["collapse_qiu_eval"]["holds"]),
    ("2. a mismatched τ breaks it", "fails the rule; max Δ ≥ 2× matched",
     ", ".join(f"×{k}: {x:.1f}×" for k, x in v["mismatch_breaks"]["value"].items()),
     v["mismatch_breaks"]["holds"]),
    ("3. surrogate without the largest member, on it", "MAE ≤ 1%",
     f"{v['surrogate_largest']['value']:.2%}", v["surrogate_largest"]["holds"]),
  ]  # fmt: skip
  for stop in ("0.1", "0.2", "0.3"):
    c = v[f"predict_{stop}"]
    rows.append(
      (
        f"4. largest member's final loss from {float(stop):.0%}",
        f"within {c['mark']:.0%}",
        pct(c["value"]),
        c["holds"],
      )  # fmt: skip
    )
  s = r["sweep"]["stops"]["0.3"]
  rows.append(
    (
      f"5. early-stopped τ × η sweep ({len(r['sweep']['final_loss'])}) picks the best",
      "regret ≤ 1 seed std at 30%",
      f"picked {s['picked']} (best {r['sweep']['best']}), regret {s['regret']:.4f} = "
      f"{s['regret_over_seed_std']:.2f} seed std",
      v["sweep"]["holds"],
    )  # fmt: skip
  )
  rows.append(
    (
      "6. B is at or below the critical batch",
      "B / 2 within 1% of B's seed mean",
      pct(v["batch"]["value"]),
      v["batch"]["holds"],
    )  # fmt: skip
  )
  lines = ["| claim | pre-registered mark | measured | verdict |", "|---|---|---|---|"]
  lines += [f"| {a} | {b} | {c} | {_yes(d)} |" for a, b, c, d in rows]
  return lines


def members_table(r: dict) -> list[str]:
  lines = [
    "| member | N | T | final loss (train / held-out) | seed std | surrogate MAE (size held out)"
    " | from 10% / 20% / 30% |",
    "|---|---|---|---|---|---|---|",
  ]
  for size, m in r["members"].items():
    run = r["runs"][f"{size}_seed0"]
    std = m["final_loss_seed_std_rel"]
    lines.append(
      f"| {size} | {m['n_params']:,} | {m['steps']:,} | {m['final_loss']:.4f} / "
      f"{run['final_eval_loss']:.4f} | {'-' if std is None else f'{std:.2%}'} | "
      f"{m['surrogate_mae']:.2%} | "
      + " / ".join(f"{m['predict_err'][s]:+.2%}" for s in ("0.1", "0.2", "0.3"))
      + " |"
    )
  return lines


def sweep_table(r: dict) -> list[str]:
  s = r["sweep"]
  taus = sorted({k.split("_")[0] for k in s["final_loss"]}, key=lambda x: float(x[3:]))
  lrs = sorted({k.split("_")[1] for k in s["final_loss"]}, key=lambda x: float(x[2:]))
  lines = [
    "| τ / τ_opt \\ η / η_published | " + " | ".join(x[2:] for x in lrs) + " |",
    "|---" * (len(lrs) + 1) + "|",
  ]
  for t in taus:
    cells = []
    for lr in lrs:
      v = s["final_loss"][f"{t}_{lr}"]
      cells.append(f"**{v:.4f}**" if f"{t}_{lr}" == s["best"] else f"{v:.4f}")
    lines.append(f"| {t[3:]} | " + " | ".join(cells) + " |")
  lines.append("")
  for stop, x in s["stops"].items():
    lines.append(
      f"- from {float(stop):.0%}: picked {x['picked']}, regret {x['regret']:.4f} "
      f"({x['regret_over_seed_std']:.2f} seed std), rank correlation {x['rank_corr']:.2f}, "
      f"level errors up to {x['max_abs_level_err']:.1%}, compute saved {x['compute_saved']:.0%}"
    )
  b = r["batch"]
  lines.append(
    f"- batch (size1, seed 0; B = 4's five seeds {b['seed_mean']:.4f} ± {b['seed_std']:.4f}): "
    + "; ".join(
      f"B = {x['batch_seqs']} ({x['steps']:,} steps) {x['final_loss']:.4f} "
      f"({x['vs_seed_mean']:+.2%})"
      for x in sorted(b["runs"].values(), key=lambda x: x["batch_seqs"])
    )
  )
  return lines


def followup_table(r: dict) -> list[str]:
  fu = r.get("followup")
  if not fu:
    return []
  seeds = ", ".join(f"{k} x{n}" for k, n in fu["seeds"].items())
  lines = [
    f"Follow-up family {fu['sizes'][0]}..{fu['sizes'][-1]} (runs: {seeds}):",
    "",
    "| definition | curve | verdict | δ* | Δ < σ on [0.2, 1] / [0.5, 1] "
    "| max Δ / max σ on [0.5, 1] |",
    "|---|---|---|---|---|---|",
  ]
  for key, j in fu["collapse"].items():
    name, curve = key.split("/")
    lines.append(
      f"| {NAMES[name]} | {'held-out' if curve == 'eval' else 'training'} | {_yes(j['holds'])} | "
      f"{j['delta_star']:.2f} | {j['share_below']:.0%} / {j['share_below_tail']:.0%} | "
      f"{j['max_delta_tail']:.4f} / {j['max_sigma_tail']:.4f} |"
    )
  x = fu["largest"]
  ref, sur = x["predict_err_reference"], x["predict_err_surrogate"]
  lines += [
    "",
    f"- {x['size']} ({x['n_params']:,} parameters, {x['steps']:,} steps, final loss "
    f"{x['final_loss']:.4f}): final loss from 10% / 20% / 30% by the next smaller member's curve "
    + " / ".join(f"{ref[k]:+.2%}" for k in ("0.1", "0.2", "0.3"))
    + "; by the surrogate fitted on the smaller members "
    + " / ".join(f"{sur[k]:+.2%}" for k in ("0.1", "0.2", "0.3"))
    + f"; that surrogate's MAE on it {x['surrogate_mae']:.2%} (fit {x['surrogate_fit_mae']:.2%})",
  ]
  return lines


def tables(r: dict) -> str:
  parts = [claims_table(r), collapse_table(r), members_table(r), sweep_table(r), followup_table(r)]
  return "\n\n".join("\n".join(p) for p in parts if p)


def figure(r: dict, curves: dict, path: str) -> None:
  """Held-out normalized curves (Qiu et al.'s normalization) of the matched and mismatched runs,
  and Delta / sigma under each definition on its published curve."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from celerity_jax.collapse import definitions

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  l0 = r["collapse"]["irreducible"]["eval"]["L0"]
  grid = np.asarray(definitions.GRID)
  sizes = {
    name: int(name.split("_")[0].removeprefix("size")) for name in curves if name[:4] == "size"
  }
  colors = plt.cm.viridis(np.linspace(0, 0.85, max(sizes.values())))
  for name, i in sizes.items():
    raw = definitions.on_grid(curves[name], "eval") - l0
    axes[0].plot(grid, raw / raw[-1], color=colors[i - 1], lw=1, alpha=0.8)
  styles = iter((":", "-.", "--", (0, (1, 4))))
  for name in (k for k in curves if k.startswith("mismatch_")):
    raw = definitions.on_grid(curves[name], "eval") - l0
    m = name.removeprefix("mismatch_")
    axes[0].plot(
      grid, raw / raw[-1], color="r", ls=next(styles), lw=1.2, label=f"size1, τ_opt × {m}"
    )
  axes[0].set(xlabel="t / T", ylabel="(L − L0) / (L(T) − L0), held-out", yscale="log")
  axes[0].set_title("matched family (color = size) and mismatched τ")
  axes[0].legend(fontsize=8)
  for (key, j), color in zip(r["collapse"]["matched"].items(), plt.cm.tab10.colors, strict=False):
    name, curve = key.split("/")
    if PUBLISHED[name] != curve:
      continue
    axes[1].plot(grid, j["delta"], color=color, label=f"Δ {NAMES[name]} ({curve})")
    axes[1].plot(grid, j["sigma"], color=color, ls="--", label=f"σ {NAMES[name]}")
  axes[1].set(xlabel="t / T", yscale="log", title="spread across sizes (Δ) and seeds (σ)")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
