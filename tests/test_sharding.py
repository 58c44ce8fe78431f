"""Mesh construction, the logical-axis rules and the start-up validation errors."""

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
