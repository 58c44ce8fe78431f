"""Mesh construction, the logical-axis rules and the start-up validation errors."""

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from celerity_jax import sharding
from celerity_jax.config import ConfigError, MeshConfig
from celerity_jax.resolve import resolve
from celerity_jax.train import state as state_lib


def test_mesh_fills_the_free_axis_and_rejects_wrong_sizes():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  with pytest.raises(sharding.ShardingError, match="8 are available"):
    sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
  with pytest.raises(sharding.ShardingError, match="do not divide"):
    sharding.make_mesh(MeshConfig(data=-1, tensor=3))


def test_logical_axis_without_rule_is_an_error():
  assert sharding.logical_spec(("embed", "mlp")) == P("fsdp", "tensor")
  with pytest.raises(sharding.ShardingError, match="'hiddenz' has no rule"):
    sharding.logical_spec(("embed", "hiddenz"), "param x")
  with pytest.raises(sharding.ShardingError, match="twice"):
    sharding.logical_spec(("heads", "mlp"))


def test_every_microbatch_splits_into_whole_sequences_per_device(small):
  """resolve is the one guard: B must split into microbatches of whole sequences on every
  data-parallel device of the mesh the step is built on (data x fsdp = 4 here)."""
  mesh_keys = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.microbatches=2"]
  assert resolve(small(*mesh_keys, "train.batch_size=16"), 8).microbatches == 2
  with pytest.raises(ConfigError, match="data-parallel size 4 x train.microbatches 2 = 8"):
    resolve(small(*mesh_keys, "train.batch_size=12"), 8)


def test_param_and_optimizer_shardings(small):
  cfg = small()
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  setup = state_lib.build(cfg, resolve(cfg, 8), mesh)
  specs = jax.tree.map(lambda s: s.spec, setup.state_shardings.params)
  assert specs["blocks"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)  # layers, D, N, H
  assert specs["blocks"]["mlp"]["wo"] == P(None, "tensor", "fsdp")
  assert specs["embed"] == P("tensor", "fsdp")
  assert specs["blocks"]["ln1"]["scale"] == P(None, None)
  adam = setup.state_shardings.opt_state[0]
  assert adam.mu["blocks"]["attn"]["wq"].spec == specs["blocks"]["attn"]["wq"]
  assert adam.count.spec == P()


def test_undivisible_parameter_names_the_parameter(small):
  cfg = small("model.n_heads=3")  # 3 heads on a tensor axis of 2
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with pytest.raises(
    sharding.ShardingError, match=r"param blocks/attn/w[kqv]: dimension 3 is not divisible"
  ):
    state_lib.build(cfg, resolve(cfg, 8), mesh)


@pytest.mark.parametrize(
  "overrides,devices,platform,want",
  [
    # 16 rows x 32 tokens on one device: 512 tokens, within any limit down to 512
    (["train.cpu_microbatch_tokens=512"], 1, "cpu", 1),
    (["train.cpu_microbatch_tokens=256"], 1, "cpu", 2),  # 8 rows of 32
    (["train.cpu_microbatch_tokens=100"], 1, "cpu", 8),  # 2 rows (3 do not divide 16)
    (["train.cpu_microbatch_tokens=10"], 1, "cpu", 16),  # one row is over the limit: 1 row
    (["train.cpu_microbatch_tokens=100", "train.microbatches=2"], 1, "cpu", 8),  # 2 x 4
    (["train.cpu_microbatch_tokens=64"], 8, "cpu", 1),  # 2 rows per device
    (["train.cpu_microbatch_tokens=32"], 8, "cpu", 2),
    (["train.cpu_microbatch_tokens=100"], 1, "tpu", 1),  # only on CPU
    (["train.cpu_microbatch_tokens=0"], 1, "cpu", 1),  # off
    (["train.cpu_microbatch_tokens=100", "model.experts=4"], 1, "cpu", 1),  # MoE: balance loss
  ],
)
def test_split_for_cache_keeps_the_batch_and_bounds_a_microbatch(
  small, overrides, devices, platform, want
):
  cfg = small("train.batch_size=16", *overrides)
  before = resolve(
    small("train.batch_size=16", *overrides, "train.cpu_microbatch_tokens=0"),
    devices,
    platform=platform,
  )
  after = resolve(cfg, devices, platform=platform)
  assert after.microbatches == want
  assert after.batch_seqs == before.batch_seqs == 16
  same = dataclasses.replace(after, microbatches=before.microbatches)
  assert dataclasses.replace(same, accumulate_per_device=before.accumulate_per_device) == before
