"""CompleteP and SP multipliers, init scales measured on real parameters, group LR multipliers."""

import math

import numpy as np
import pytest
from flax import nnx

from celerity_jax.config import ModelConfig, ParamConfig
from celerity_jax.models.decoder import Decoder
from celerity_jax.models.layers import map_variables
from celerity_jax.parametrization import multipliers

MODEL = ModelConfig(
  vocab_size=512, d_model=512, n_layers=8, n_heads=8, d_head=64, d_ff=2048, seq_len=16
)


def test_completep_multipliers():
  m = multipliers(
    ParamConfig(
      kind="completep", d_base=128, l_base=2, sigma_base=0.08, alpha_in=9.0, alpha_out=1.2
    ),
    MODEL,
  )
  assert m.width == 4 and m.depth == 4
  assert m.hidden_init_std == pytest.approx(0.08 / 2)  # variance sigma^2 / m_N
  assert m.embed_init_std == m.unembed_init_std == 0.08
  assert m.lr == {"embed": 1.0, "hidden": 0.25, "unembed": 1.0, "norm": 1.0}
  assert m.residual_scale == 0.25
  assert m.input_scale == 9.0
  assert m.logit_scale == pytest.approx(1.2 / 4)
  assert m.attn_scale == 1 / 64


def test_sp_multipliers_are_all_one():
  m = multipliers(ParamConfig(kind="sp", d_base=128, l_base=2, sigma_base=0.08), MODEL)
  assert m.hidden_init_std == 0.08
  assert set(m.lr.values()) == {1.0}
  assert m.residual_scale == m.input_scale == m.logit_scale == 1.0
  assert m.attn_scale == pytest.approx(1 / math.sqrt(64))


def test_initialized_parameters_have_the_configured_std():
  mult = multipliers(ParamConfig(kind="completep", d_base=128, sigma_base=0.08), MODEL)
  model = Decoder(MODEL, mult, nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model))
  for name in ("wq", "wk", "wv", "wo"):
    assert np.std(params["blocks"]["attn"][name]) == pytest.approx(0.04, rel=0.02)
  assert np.std(params["blocks"]["mlp"]["wi"]) == pytest.approx(0.04, rel=0.02)
  assert np.std(params["embed"]) == pytest.approx(0.08, rel=0.02)
  assert np.std(params["unembed"]) == pytest.approx(0.08, rel=0.02)
  np.testing.assert_array_equal(params["blocks"]["ln1"]["scale"], 1.0)
  groups = map_variables(nnx.state(model), lambda v: v.get_metadata()["group"])
  assert groups["blocks"]["attn"]["wq"] == "hidden" and groups["blocks"]["ln1"]["bias"] == "norm"
  assert groups["embed"] == "embed" and groups["unembed"] == "unembed"
