"""Mixture of experts: dispatch against explicit loops, routing losses, expert parallelism,
recipes."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from celerity_jax import recipes, scaling
from celerity_jax.config import ConfigError, apply_overrides
from celerity_jax.config_checks import validate
from celerity_jax.models import moe
from celerity_jax.models.layers import Forward, Mlp, mlp_activation
from celerity_jax.parametrization import multipliers
from celerity_jax.resolve import resolve
from celerity_jax.train import loop
from tests.test_train import read_metrics, run_steps

MOE = ["model.experts=8", "model.top_k=2", "model.expert_d_ff=64"]


def expert_weights(n_experts, d, f, kind, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  w = {
    "wi": jax.random.normal(keys[0], (n_experts, d, f)) / math.sqrt(d),
    "wo": jax.random.normal(keys[1], (n_experts, f, d)) / math.sqrt(f),
  }
  if kind == "swiglu":
    w["wg"] = jax.random.normal(keys[2], (n_experts, d, f)) / math.sqrt(d)
  return w


def one_expert(x_D, w, e, kind):
  gate = x_D @ w["wg"][e] if kind == "swiglu" else None
  return mlp_activation(x_D @ w["wi"][e], gate, kind) @ w["wo"][e]


@pytest.mark.parametrize("kind", ["squared_relu", "swiglu"])
def test_dropless_dispatch_equals_a_per_token_loop(kind):
  t, d, f, e, k = 40, 16, 24, 6, 2
  w = expert_weights(e, d, f, kind)
  x = jax.random.normal(jax.random.PRNGKey(1), (t, d))
  experts, gates, _ = moe.route_topk(jax.random.normal(jax.random.PRNGKey(2), (t, e)) * 3, k)
  out = moe.dropless(x, experts, gates, w, kind)
  want = np.stack(
    [
      sum(gates[i, j] * one_expert(x[i], w, int(experts[i, j]), kind) for j in range(k))
      for i in range(t)
    ]
  )
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(gates).sum(-1) == pytest.approx(1.0))  # renormalized top-2


@pytest.mark.parametrize("kind", ["squared_relu", "swiglu"])
def test_one_expert_top1_equals_the_dense_mlp(small, kind):
  for dispatch in ("dropless", "capacity"):
    cfg = small(
      "model.experts=1",
      "model.top_k=1",
      f"model.mlp={kind}",
      f"model.dispatch={dispatch}",
      "model.capacity_factor=1.0",
    ).model
    mult = multipliers(small().param, cfg)
    layer = moe.MoeMlp(cfg, mult, nnx.Rngs(params=0))
    dense = Mlp(cfg, mult, nnx.Rngs(params=1))
    for name in ("wi", "wg", "wo"):
      if hasattr(dense, name):
        getattr(dense, name)[...] = getattr(layer, name)[...][0]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, cfg.d_model))
    y, aux = layer(x, Forward(tokens_BxL=jnp.zeros((2, 32), jnp.int32)))
    np.testing.assert_allclose(y, dense(x), rtol=1e-5, atol=1e-6)
    assert float(aux["dropped"]) == 0.0 and float(aux["balance"]) == pytest.approx(1.0)


def test_capacity_dispatch_drops_exactly_the_overflow():
  # one sequence of 6 tokens, 3 experts, top-2, capacity 2: slots fill first choices in token
  # order, then second choices; everything after an expert's 2nd assignment is dropped
  experts = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [1, 2]])
  gates = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.8, 0.2], [0.9, 0.1], [0.4, 0.6]])
  # first choices: e0 <- t0, t1 (t2 dropped); e1 <- t3, t5; e2 <- t4
  # second choices: e1 (t0) full -> dropped; e2 <- t1 (2nd slot); e1 (t2) dropped; e0 (t3) full
  #   -> dropped; e0 (t4) dropped; e2 (t5) full -> dropped
  kept = {(0, 0), (1, 0), (3, 0), (5, 0), (4, 0), (1, 1)}
  d, f, kind = 8, 12, "squared_relu"
  w = expert_weights(3, d, f, kind)
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, d))
  out, kept_frac = moe.capacity_dispatch(
    x, jnp.asarray(experts)[None], jnp.asarray(gates)[None], w, kind, capacity=2, n_experts=3
  )
  want = np.stack(
    [
      sum(
        gates[i, j] * one_expert(x[0, i], w, experts[i, j], kind)
        for j in range(2)
        if (i, j) in kept
      )
      if any((i, j) in kept for j in range(2))
      else np.zeros(d)
      for i in range(6)
    ]
  )
  np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
  assert float(kept_frac) == pytest.approx(6 / 12)
  _, slots, fits = moe.capacity_slots(jnp.asarray(experts)[None], 3, 2)
  assert np.asarray(slots)[0].tolist() == [0, 1, 2, 0, 0, 1, 2, 1, 3, 3, 4, 2]


def test_load_balance_and_router_z_loss_on_a_hand_computed_routing():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]))
  experts, gates, aux = moe.route_topk(logits, 1)
  assert experts[:, 0].tolist() == [0, 1, 0, 2]
  np.testing.assert_allclose(gates[:, 0], [0.7, 0.6, 0.5, 0.6], rtol=1e-6)  # raw prob at k = 1
  # f = (2, 1, 1) / 4, P = column means (0.375, 0.275, 0.35): E * sum(f P) = 3 * 0.33125
  assert float(aux["balance"]) == pytest.approx(3 * (0.5 * 0.375 + 0.25 * 0.275 + 0.25 * 0.35))
  assert float(aux["router_z"]) == pytest.approx(0.0, abs=1e-6)  # logsumexp of log-probs = 0
  shifted = moe.route_topk(logits + 2.0, 1)[2]["router_z"]
  assert float(shifted) == pytest.approx(4.0, rel=1e-5)  # logsumexp = 2 everywhere
  _, _, even = moe.route_topk(jnp.zeros((8, 4)) + jnp.eye(4)[jnp.arange(8) % 4], 1)
  assert float(even["balance"]) == pytest.approx(1.0, rel=1e-6)  # balanced: the minimum


@pytest.mark.parametrize("vocab,n_experts", [(512, 8), (1000, 16)])
def test_hash_routing_spreads_a_uniform_stream_evenly(vocab, n_experts):
  tokens = jnp.tile(jnp.arange(vocab), 3)  # every id equally often
  table = moe.hash_table(vocab, n_experts)
  load = np.asarray(moe.expert_load(jnp.asarray(table)[tokens][:, None], n_experts))
  assert abs(load - 1 / n_experts).max() <= 1 / vocab + 1e-7  # floor / ceil of V / E ids each
  assert not np.array_equal(table, np.arange(vocab) % n_experts)  # a hash, not token id mod E
  cfg = validate(
    apply_overrides(recipes.load("celerity_moe_nano_1"), ["model.router=hash", "model.top_k=1"])
  )
  r = resolve(cfg)
  assert r.lr_peak.keys() == {"embed", "hidden", "unembed", "norm"}  # no router to train


def test_counts_effective_tpp_and_completep_for_experts():
  cfg = validate(apply_overrides(recipes.load("celerity_moe_nano_3"), []))
  m, dense = cfg.model, recipes.load("celerity_nano_3").model
  counts, dense_counts = scaling.param_counts(m), scaling.param_counts(dense)
  expert = 2 * m.d_model * m.expert_d_ff
  assert counts["active"] == dense_counts["total"] + m.n_layers * m.d_model * m.experts
  assert counts["total"] == counts["active"] + m.n_layers * (m.experts - m.top_k) * expert
  r = resolve(cfg)
  assert r.tokens == pytest.approx(20 * counts["active"])
  assert r.tpp_effective == pytest.approx(20 * 2 / 8)
  assert r.tau == pytest.approx(0.785 * 5**-0.501)
  assert r.flops_per_token == pytest.approx(scaling.flops_per_token(dense) + 6 * 48 * 8 * 2)
  shared = scaling.param_counts(validate(apply_overrides(cfg, ["model.shared_expert=true"])).model)
  assert (
    shared["active"] - counts["active"]
    == m.n_layers * expert
    == (shared["total"] - counts["total"])
  )
  # CompleteP: experts are hidden matrices, the router a readout
  mult = multipliers(cfg.param, m)
  layer = moe.MoeMlp(m, mult, nnx.Rngs(params=0))
  assert (
    layer.wi.get_metadata()["group"] == "hidden"
    and layer.router.get_metadata()["group"] == "router"
  )
  assert float(jnp.std(layer.wi[...])) == pytest.approx(mult.hidden_init_std, rel=0.05)
  assert r.lr_peak["hidden"] == pytest.approx(cfg.optim.lr_base * 256 / 48)
  assert r.lr_peak["router"] == cfg.optim.lr_base and mult.router_scale == pytest.approx(256 / 48)
  assert r.tau_groups["router"] is not None


@pytest.mark.parametrize(
  "overrides,match",
  [
    (["model.top_k=9"], "model.top_k=9"),
    (["model.router=hash"], "model.router=hash"),
    (["model.moe_every=3"], "model.moe_every=3"),
    (["model.capacity_factor=0"], "model.capacity_factor"),
    (["model.experts=-1"], "model.experts"),
  ],
)
def test_bad_moe_settings_are_named(small, overrides, match):
  with pytest.raises(ConfigError, match=match):
    small(*MOE, "model.n_layers=2", *overrides)


ONE_DEVICE = {}  # dispatch -> (losses, params) of 3 steps on one device


@pytest.mark.parametrize(
  "dispatch,mesh",
  [
    ("dropless", ["mesh.expert=4", "mesh.data=2"]),
    ("capacity", ["mesh.expert=4", "mesh.data=2"]),
    ("dropless", ["mesh.expert=4", "mesh.fsdp=2"]),
    ("capacity", ["mesh.expert=2", "mesh.tensor=2", "mesh.data=2"]),
  ],
)
def test_expert_parallel_on_8_devices_equals_one_device(small, dispatch, mesh):
  moe_cfg = [
    *MOE,
    f"model.dispatch={dispatch}",
    "model.capacity_factor=1.0",
    "model.n_layers=2",
    "model.moe_every=2",
    "model.shared_expert=true",
  ]
  if dispatch not in ONE_DEVICE:  # the reference run, shared by every mesh of this dispatch
    ONE_DEVICE[dispatch] = run_steps(small(*moe_cfg), 1, 3)
  losses_1, params_1 = ONE_DEVICE[dispatch]
  losses_8, params_8 = run_steps(small(*moe_cfg, *mesh), 8, 3)
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
  # Adam divides by sqrt(v): summation-order rounding in near-zero gradients becomes up to ~1e-3 of
  # one update (lr ~ 1.6e-2) after three steps; a routing difference would be far larger
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), params_8, params_1
  )
  assert losses_1[-1] < losses_1[0]


def test_moe_metrics_reach_metrics_jsonl(small, tmp_path):
  loop.run(
    small(
      *MOE,
      "model.dispatch=capacity",
      "model.capacity_factor=0.5",
      f"run.dir={tmp_path}",
      "run.log_every=1",
      "train.stop_step=3",
      "mesh.expert=2",
    )
  )
  rows, events = read_metrics(tmp_path)
  last = rows[-1]
  assert len(last["moe_load"]) == 8 and sum(last["moe_load"]) == pytest.approx(1.0, abs=1e-4)
  assert 0.0 < last["moe_dropped"] < 1.0  # capacity 0.5: some tokens must drop
  assert last["moe_balance"] >= 1.0 - 1e-4 and last["moe_router_z"] > 0
  assert last["moe_load_max"] >= 8 * max(last["moe_load"]) - 1e-3  # max over layers >= of the mean
  assert events[0]["n_active"] < events[0]["n_params"] and events[0]["tpp_effective"] == 0.5 * 2 / 8


def test_moe_nano_recipe_loss_falls_and_checkpoints_round_trip(tmp_path, stdlib_cache):
  common = [f"data.cache_dir={stdlib_cache}", "run.progress=false", "run.tensorboard=false"]
  cfg = apply_overrides(recipes.load("celerity_moe_nano_1"), common + [f"run.dir={tmp_path / 'a'}"])
  last = loop.run(cfg)
  rows, _ = read_metrics(tmp_path / "a")
  assert (
    last["step"] == json.loads((tmp_path / "a" / "config.json").read_text())["derived"]["steps"]
  )
  assert last["loss"] < rows[0]["loss"] - 3.0 and last["eval_loss"] < 6.0
  assert last["moe_dropped"] == 0.0  # dropless
  # stop at 20 (a checkpoint at 25 is not reached, so resume starts from step 20's save), resume
  part = apply_overrides(cfg, [f"run.dir={tmp_path / 'b'}", "checkpoint.every_steps=10"])
  loop.run(apply_overrides(part, ["train.stop_step=20"]))
  resumed = loop.run(part)
  rows_b, events_b = read_metrics(tmp_path / "b")
  assert [e["event"] for e in events_b].count("restart") == 1
  assert resumed["loss"] == last["loss"] and resumed["moe_load"] == last["moe_load"]
