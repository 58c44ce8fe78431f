"""The collapse experiment's report, computed offline from its finished runs
(tools.collapse_experiment; docs/collapse_long.md holds the pre-registered claims and marks).

Collapse is judged under each definition of celerity_jax/collapse/definitions.py on the held-out
and on the smoothed training curves; predictions use the training curves, as the monitor and
the sweep command do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from celerity_jax.collapse import definitions, predict, surrogate
from celerity_jax.collapse.curves import Curve, load_run
from tools.collapse_plan import Family, alias, family, seeds_of, sweep, sweep_name

STOPS = (0.1, 0.2, 0.3)
# Pre-registered marks (docs/collapse_long.md, committed before the first run)
MARKS = {
  "mismatch_over_matched": 2.0,  # max Delta over [0.5, 1], mismatched / matched: at least
  "surrogate_mae": 0.01,  # the largest member, surrogate fit without it: at most
  "predict": {"0.1": 0.03, "0.2": 0.02, "0.3": 0.01},  # |final-loss error| from each stop
  "sweep_stop": 0.3,  # the sweep's regret at this stop must be within one seed std
  "batch_half": 0.01,  # B / 2 against B's seed mean: within
}


def mismatched(f: Family) -> list[float]:
  """The first size at tau_opt x these (the sweep's runs at eta*), the other sizes matched."""
  return [m for m in f.tau_mults if m != 1.0]


def load(f: Family, out: Path, base: list[str]) -> tuple[dict[str, Curve], float]:
  """Every run's curve by its name (finished runs only) and eta* / PUBLISHED_LR."""
  lr_mult = json.loads((out / "eta_star.json").read_text())["lr_mult"]
  names = [r.name for r in [*sweep(f, base), *family(f, lr_mult, base)]]
  dirs = {n: n for n in names} | alias(f, lr_mult)
  return {n: load_run(out / d, require_finished=True) for n, d in dirs.items()}, lr_mult


def matched(f: Family, c: dict[str, Curve]) -> dict[str, list[Curve]]:
  """The registered family: {sizeI: its runs, seed 0 first}."""
  return {
    f"size{i + 1}": [c[f"size{i + 1}_seed{s}"] for s in range(seeds_of(f, i))]
    for i in range(len(f.sizes))
  }


def collapse(f: Family, c: dict[str, Curve], lr_mult: float) -> dict:
  """Every definition on both curves, for the matched family and each mismatched one."""
  fam = matched(f, c)
  out = {"irreducible": {}, "matched": {}, "mismatched": {}}
  for curve in ("eval", "train"):
    fit = definitions.irreducible(fam, curve)
    out["irreducible"][curve] = fit
    for name, d in definitions.DEFINITIONS.items():
      key = f"{name}/{curve}"
      out["matched"][key] = definitions.judge(fam, d, curve, fit["L0"])
      for m in mismatched(f):
        mis = fam | {"size1": [c[sweep_name(m, lr_mult)]]}
        j = definitions.judge(mis, d, curve, fit["L0"], noise=fam)
        out["mismatched"].setdefault(f"{m:g}", {})[key] = j
  return out


def followup(f: Family, c: dict[str, Curve]) -> dict | None:
  """The family without its smallest member, with the runs added after the first results
  (docs/collapse_long.md, "Follow-up"): collapse under every definition, and the largest
  member's final loss predicted by the next smaller member's curve and by the surrogate fitted on
  the smaller members' runs."""
  if not f.more:
    return None
  sizes: dict[int, list[Curve]] = {}
  for name, x in c.items():
    if name.startswith("size") and "_seed" in name and name != "size1_seed0":
      i, s = (int(v) for v in name.removeprefix("size").split("_seed"))
      if i > 1:
        sizes.setdefault(i, []).append((s, x))
  fam = {f"size{i}": [x for _, x in sorted(v)] for i, v in sorted(sizes.items())}
  out = {"sizes": list(fam), "seeds": {k: len(v) for k, v in fam.items()}, "collapse": {}}
  for curve in ("eval", "train"):
    l0 = definitions.irreducible(fam, curve)["L0"] if len(fam) >= 3 else None
    for name, d in definitions.DEFINITIONS.items():
      if d.irreducible and l0 is None:  # L0 needs three sizes' final losses
        continue
      out["collapse"][f"{name}/{curve}"] = definitions.judge(fam, d, curve, l0)
  *smaller, largest = fam
  member, reference = fam[largest][0], fam[smaller[-1]][0]
  constants, objective = surrogate.fit([x for k in smaller for x in fam[k]])
  out["largest"] = {
    "size": largest,
    "n_params": member.n_params,
    "steps": member.steps,
    "final_loss": member.final_loss,
    "surrogate_fit_mae": objective,
    "surrogate_mae": surrogate.mae(member, constants),
    "predict_err_reference": {},
    "predict_err_surrogate": {},
  }
  for s in STOPS:
    part = predict.truncate(member, s)
    out["largest"]["predict_err_reference"][f"{s:g}"] = (
      predict.predict_final_loss(part, reference=reference) / member.final_loss - 1
    )
    out["largest"]["predict_err_surrogate"][f"{s:g}"] = (
      predict.predict_final_loss(part, constants=constants) / member.final_loss - 1
    )
  return out


def family_b(f: Family, c: dict[str, Curve]) -> list[Curve]:
  """The pre-registered runs at the family's B: the sweep and the matched family (without the
  batch checks and the follow-up's runs)."""
  pool = [x for name, x in c.items() if name.startswith("sweep_")]
  return pool + [x for g in matched(f, c).values() for x in g if all(x is not y for y in pool)]


def members(f: Family, c: dict[str, Curve]) -> dict:
  """Each size's seed 0: the surrogate fit on every run at the family's B of the other sizes,
  its MAE on the member and the final loss predicted from each stop."""
  fam, pool = matched(f, c), family_b(f, c)
  rows = {}
  for size, runs in fam.items():
    member = runs[0]
    constants, objective = surrogate.fit([x for x in pool if x.n_params != member.n_params])
    finals = np.array([x.final_loss for x in runs])
    rows[size] = {
      "n_params": member.n_params,
      "steps": member.steps,
      "final_loss": member.final_loss,
      "final_loss_seed_std_rel": float(finals.std(ddof=1) / finals.mean())
      if len(runs) > 1
      else None,
      "surrogate_fit_mae_others": objective,
      "surrogate_mae": surrogate.mae(member, constants),
      "constants": constants._asdict(),
      "predict_err": {
        f"{s:g}": predict.predict_final_loss(predict.truncate(member, s), constants=constants)
        / member.final_loss
        - 1
        for s in STOPS
      },
    }
  return rows


def sweep_report(f: Family, c: dict[str, Curve], seed_std: float) -> dict:
  """The tau x eta grid ranked from each stop by the shipped surrogate (as the sweep command
  ranks); regret against the grid's true best, in nats and in seed stds of the final loss."""
  shipped = surrogate.load_constants()
  grid = {(m, k): c[sweep_name(m, k)] for m in f.tau_mults for k in f.lr_mults}
  true = {key: x.final_loss for key, x in grid.items()}
  best = min(true, key=true.get)
  out = {
    "final_loss": {f"tau{m:g}_lr{k:g}": v for (m, k), v in true.items()},
    "best": f"tau{best[0]:g}_lr{best[1]:g}",
    "seed_std": seed_std,
    "stops": {},
  }
  n = len(grid)
  for stop in STOPS:
    pred = {
      key: predict.predict_final_loss(predict.truncate(x, stop), constants=shipped)
      for key, x in grid.items()
    }
    pick = min(pred, key=pred.get)
    regret = true[pick] - true[best]
    ranks = np.argsort(np.argsort([true[k] for k in grid]))
    pranks = np.argsort(np.argsort([pred[k] for k in grid]))
    out["stops"][f"{stop:g}"] = {
      "picked": f"tau{pick[0]:g}_lr{pick[1]:g}",
      "regret": regret,
      "regret_over_seed_std": regret / seed_std,
      "rank_corr": float(np.corrcoef(ranks, pranks)[0, 1]),
      "max_abs_level_err": max(abs(pred[k] / true[k] - 1) for k in grid),
      "compute_saved": 1 - (n * stop + 1 - stop) / n,
    }
  return out


def batch_report(f: Family, c: dict[str, Curve]) -> dict:
  base = np.array([x.final_loss for x in matched(f, c)["size1"]])
  rows = {
    name: {
      "batch_seqs": int(name.removeprefix("batch").split("_")[0]),
      "steps": x.steps,
      "final_loss": x.final_loss,
      "vs_seed_mean": x.final_loss / base.mean() - 1,
    }
    for name, x in c.items()
    if name.startswith("batch")
  }
  return {"seed_mean": float(base.mean()), "seed_std": float(base.std(ddof=1)), "runs": rows}


def verdicts(r: dict, f: Family) -> dict:
  def claim(value, mark, holds):
    return {"value": value, "mark": mark, "holds": bool(holds)}

  m, mis = r["collapse"]["matched"], r["collapse"]["mismatched"]
  largest = r["members"][f"size{len(f.sizes)}"]
  ratios = {
    k: v["qiu/eval"]["max_delta_tail"] / m["qiu/eval"]["max_delta_tail"] for k, v in mis.items()
  }
  half = min(r["batch"]["runs"].values(), key=lambda x: x["batch_seqs"])
  s = r["sweep"]["stops"][f"{MARKS['sweep_stop']:g}"]
  out = {
    "collapse_qiu_eval": claim(
      m["qiu/eval"]["delta_star"], "holds at delta 0.5", m["qiu/eval"]["holds"]
    ),
    "mismatch_breaks": claim(
      ratios,
      MARKS["mismatch_over_matched"],
      all(not v["qiu/eval"]["holds"] for v in mis.values())
      and min(ratios.values()) >= MARKS["mismatch_over_matched"],
    ),
    "surrogate_largest": claim(
      largest["surrogate_mae"],
      MARKS["surrogate_mae"],
      largest["surrogate_mae"] <= MARKS["surrogate_mae"],
    ),
  }
  for stop, mark in MARKS["predict"].items():
    err = largest["predict_err"][stop]
    out[f"predict_{stop}"] = claim(err, mark, abs(err) <= mark)
  out["sweep"] = claim(s["regret_over_seed_std"], 1.0, s["regret_over_seed_std"] <= 1.0)
  out["batch"] = claim(
    half["vs_seed_mean"], MARKS["batch_half"], abs(half["vs_seed_mean"]) <= MARKS["batch_half"]
  )
  return out


def analyse(f: Family, out: Path, base: list[str]) -> tuple[dict, dict[str, Curve]]:
  """The report, and the curves the figure draws (matched runs by name, mismatch_M)."""
  c, lr_mult = load(f, out, base)
  report = {
    "family": f.name,
    "lr_mult": lr_mult,
    "runs": {
      name: {
        "n_params": x.n_params,
        "steps": x.steps,
        "tau": x.tau,
        "seed": x.seed,
        "final_loss": x.final_loss,
        "final_eval_loss": float(x.eval_loss[-1]),
        "eval_points": int(len(x.eval_loss)),
      }
      for name, x in c.items()
    },
    "collapse": collapse(f, c, lr_mult),
    "members": members(f, c),
  }
  report["followup"] = followup(f, c)
  report["batch"] = batch_report(f, c)
  report["sweep"] = sweep_report(f, c, report["batch"]["seed_std"])
  report["marks"] = MARKS
  report["verdicts"] = verdicts(report, f)
  drawn = {k: x for k, x in c.items() if k.startswith("size")}
  drawn |= {f"mismatch_{m:g}": c[sweep_name(m, lr_mult)] for m in mismatched(f)}
  return report, drawn
