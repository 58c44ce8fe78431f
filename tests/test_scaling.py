"""Scaling math against every reference value of docs/method.md sections 1-3."""

import math

import pytest

from celerity_jax import recipes, scaling
from celerity_jax.config import ModelConfig, ScalingConfig, apply_overrides
from celerity_jax.resolve import resolve

# 610M study model: d_model 2048, d_base 256 -> eta_hidden = eta_base / 8; 80 TPP, D = 48.5e9.
B_610M = 504 * 2048
D_610M = 48.5e9


def test_tau_610m_example():
  assert B_610M == 1_032_192
  assert scaling.tau(B_610M, 1.62e-2 / 8, 0.1, D_610M) == pytest.approx(0.105, abs=5e-4)


@pytest.mark.parametrize(
  "eta_base, expected",
  [
    (1.01e-3, 1.682),
    (2.02e-3, 0.841),
    (4.05e-3, 0.421),
    (8.09e-3, 0.210),
    (1.62e-2, 0.105),
    (3.24e-2, 0.053),
    (6.48e-2, 0.026),
  ],
)
def test_tau_table(eta_base, expected):
  # the table rounds eta to 3 significant figures, so tau matches to the digits printed
  assert scaling.tau(B_610M, eta_base / 8, 0.1, D_610M) == pytest.approx(
    expected, rel=5e-3, abs=5e-4
  )


def test_tau_llama2():
  assert scaling.tau(4e6, 3e-4, 0.1, 2e12) == pytest.approx(0.067, abs=5e-4)
  assert scaling.tau(4e6, 1.5e-4, 0.1, 2e12) == pytest.approx(0.13, abs=5e-3)


def test_weight_decay_inverts_tau():
  steps = round(D_610M / B_610M)
  lam = scaling.weight_decay(1.62e-2 / 8, 0.105, steps)
  assert scaling.tau(B_610M, 1.62e-2 / 8, lam, steps * B_610M) == pytest.approx(0.105)
  assert lam == pytest.approx(0.1, rel=0.01)


@pytest.mark.parametrize("tpp, tau", [(20, 0.175), (80, 0.087), (234, 0.051)])
def test_tau_opt_fits_celerity_bands(tpp, tau):
  cfg = ScalingConfig()
  assert scaling.tau_opt(tpp, cfg.tau_c, cfg.tau_m) == pytest.approx(tau, rel=0.05)


# name: (d_model, d_head, layers, params, 20-TPP batch in sequences of 8192)
CELERITY = {
  "300M": (640, 64, 13, 271e6, 176),
  "500M": (896, 64, 17, 503e6, 240),
  "900M": (1152, 128, 23, 906e6, 336),
  "1.8B": (1536, 128, 30, 1.81e9, 464),
  "3.9B": (2048, 128, 40, 3.88e9, 672),
}


def celerity_model(d, h, layers):
  return ModelConfig(
    vocab_size=128_256,
    d_model=d,
    n_layers=layers,
    n_heads=d // h,
    d_head=h,
    d_ff=8 * d,
    seq_len=8192,
  )


@pytest.mark.parametrize("name", CELERITY)
def test_celerity_param_counts_and_batch_law(name):
  d, h, layers, params, batch = CELERITY[name]
  n = scaling.param_counts(celerity_model(d, h, layers))["total"]
  assert n == pytest.approx(params, rel=0.01)
  cfg = ScalingConfig()
  b_seqs = scaling.batch_tokens(20 * n, cfg.batch_coef, cfg.batch_exp, cfg.batch_anchor) / 8192
  assert b_seqs == pytest.approx(batch, rel=0.03)


def test_power_lines_exponent_rotates_the_batch_law_about_its_anchor():
  cfg = ScalingConfig()
  celerity = [
    scaling.batch_tokens(d, cfg.batch_coef, 0.5, cfg.batch_anchor) for d in (5.41e9, 8e10)
  ]
  power = [scaling.batch_tokens(d, cfg.batch_coef, 0.383, cfg.batch_anchor) for d in (5.41e9, 8e10)]
  assert power[0] == pytest.approx(celerity[0])  # same B where it was tuned
  assert power[1] / power[0] == pytest.approx((8e10 / 5.41e9) ** 0.383)
  assert celerity[1] == pytest.approx(cfg.batch_coef * 8e10**0.5)


def test_warmup_is_min_of_ten_percent_and_375m_tokens():
  b = 1_000_000
  assert scaling.warmup_steps(1e9, b, 0.1, 375e6) == 100  # 10% of D
  assert scaling.warmup_steps(1e11, b, 0.1, 375e6) == 375  # capped at 375M tokens


def test_round_batch_to_granule():
  assert scaling.round_batch(337.4, 16) == 336
  assert scaling.round_batch(3, 16) == 16


def test_flops_conventions():
  m = ModelConfig(
    vocab_size=1000, d_model=64, n_layers=2, n_heads=1, d_head=64, d_ff=512, seq_len=128
  )
  matmul = 2 * (4 * 64 * 64 + 2 * 64 * 512) + 64 * 1000
  attention = 12 * 2 * 128 * 64
  assert scaling.flops_per_token(m, causal=False) == 6 * matmul + attention
  assert scaling.flops_per_token(m, causal=True) == 6 * matmul + attention / 2


def test_resolve_celerity_1b_is_self_consistent():
  r = resolve(recipes.load("celerity_1b"), n_devices=1)
  assert r.tokens == pytest.approx(20 * r.n_params)
  assert r.batch_tokens == r.batch_seqs * 8192
  assert r.steps == round(r.tokens / r.batch_tokens)
  assert r.warmup_steps == round(min(0.1 * r.tokens, 375e6) / r.batch_tokens)
  assert r.eta_hidden == pytest.approx(1.62e-2 * 256 / 1152)
  # lambda derived from tau gives tau back: tau = B / (eta_hidden lambda D)
  assert 1 / (r.eta_hidden * r.weight_decay * r.steps) == pytest.approx(r.tau)
  assert r.tau_groups["norm"] is None
  assert r.tau_groups["embed"] == pytest.approx(r.tau * 256 / 1152)


def test_explicit_weight_decay_sets_tau_and_stop_frac_keeps_horizon():
  base = recipes.load("celerity_tiny")
  r0 = resolve(base)
  r = resolve(apply_overrides(base, ["optim.weight_decay=0.1", "train.stop_frac=0.3"]))
  assert r.weight_decay == 0.1
  assert r.tau == pytest.approx(1 / (r.eta_hidden * 0.1 * r.steps))
  assert r.steps == r0.steps and r.stop_step == math.ceil(0.3 * r0.steps)


def test_microbatch_rows_fix_each_devices_load_and_let_the_count_follow_b():
  """train.microbatch_rows=R: B rounds to data-parallel x R, and the microbatch count is what is
  left, so one recipe holds the same activations per device on any slice."""
  from celerity_jax.config import ConfigError

  base = apply_overrides(recipes.load("celerity_1b"), ["mesh.data=1", "mesh.fsdp=-1"])
  for devices, rows, batch, micro in ((32, 1, 352, 11), (64, 1, 320, 5), (8, 2, 336, 21)):
    cfg = apply_overrides(base, [f"train.microbatch_rows={rows}"])
    r = resolve(cfg, n_devices=devices, platform="tpu")  # (on CPU the cache split adds more)
    assert (r.batch_seqs, r.microbatches) == (batch, micro)
    assert r.batch_seqs == r.data_parallel * rows * r.microbatches
  fixed = apply_overrides(base, ["train.microbatch_rows=4", "train.batch_size=256"])
  assert resolve(fixed, n_devices=16, platform="tpu").microbatches == 4
  with pytest.raises(
    ConfigError, match="multiple of data-parallel size 48 x train.microbatch_rows 4"
  ):
    resolve(fixed, n_devices=48)
  from celerity_jax.config_checks import validate

  with pytest.raises(ConfigError, match="set one of them"):
    validate(apply_overrides(base, ["train.microbatch_rows=2", "train.microbatches=4"]))
