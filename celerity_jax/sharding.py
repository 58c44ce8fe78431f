"""Device mesh and the ONE table mapping logical axes to mesh axes.

Every parameter names its logical axes (models/layers.param); activations name theirs at
`constrain` calls. Params, optimizer state and batches get NamedShardings from `RULES`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from celerity_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),   # every non-model-parallel axis splits the batch
    "length": None,
    "act_embed": None,                     # d_model of activations stays whole
    "act_vocab": "tensor",
    "embed": "fsdp",                       # params' d_model axis: FSDP (ZeRO-3) sharding
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "layers": None,                        # the stacked-layer axis of scanned blocks
    "expert": "expert",                    # MoE experts: expert parallelism
    "router": None,                        # the router's expert logits stay whole
}


class ShardingError(ConfigError):
  """A mesh, batch or parameter shape that cannot be sharded as configured."""


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Resolves the one -1 axis and checks the mesh covers exactly the devices."""
  sizes = dataclasses.asdict(mesh_cfg)
  fixed = math.prod(v for v in sizes.values() if v != -1)
  for name, value in sizes.items():
    if value == -1:
      if n_devices % fixed:
        raise ShardingError(f"mesh: {n_devices} devices do not divide by the fixed axes {sizes}")
      sizes[name] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ShardingError(f"mesh {sizes} has {math.prod(sizes.values())} devices but "
                        f"{n_devices} are available; set mesh.* so the product is {n_devices}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh_sizes: dict[str, int]) -> int:
  axes = RULES["batch"]
  return math.prod(mesh_sizes[a] for a in axes)


def logical_spec(axes: tuple[str | None, ...], where: str = "") -> P:
  """PartitionSpec for logical axes; an axis without a rule is an error, never silently replicated."""
  out, used = [], set()
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in RULES:
      raise ShardingError(f"{where}: logical axis {name!r} has no rule in sharding.RULES "
                          f"(known: {', '.join(sorted(RULES))})")
    mesh_axes = RULES[name]
    flat = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    if used & set(flat):
      raise ShardingError(f"{where}: logical axes {axes} map mesh axis {used & set(flat)} twice")
    used |= set(flat)
    out.append(mesh_axes)
  return P(*out)


def _check_divisible(shape, spec: P, mesh: Mesh, where: str):
  for dim, mesh_axes in zip(shape, spec, strict=True):
    flat = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    parts = math.prod(mesh.shape[a] for a in flat)
    if dim % parts:
      raise ShardingError(f"{where}: dimension {dim} is not divisible by mesh axes {flat} "
                          f"of total size {parts}; change the model or mesh.* sizes")


def param_specs(abstract_state, mesh: Mesh) -> dict:
  """Pure-dict tree of PartitionSpecs for an nnx.State of abstract params.

  Scanned blocks carry one more dimension than their logical axes: the leading `layers` axis.
  """
  from flax import nnx

  def spec_of(path, variable):
    where = "param " + "/".join(str(getattr(k, "key", k)) for k in path)
    axes = tuple(variable.get_metadata()["axes"])
    if len(variable.shape) == len(axes) + 1:
      axes = ("layers",) + axes
    if len(variable.shape) != len(axes):
      raise ShardingError(f"{where}: shape {variable.shape} does not match logical axes {axes}")
    spec = logical_spec(axes, where)
    _check_divisible(variable.shape, spec, mesh, where)
    return spec

  specs = jax.tree_util.tree_map_with_path(
      spec_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state, params_specs):
  """Optimizer moments shard like their params; counters and scalars are replicated."""
  return optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_opt_state, params_specs,
                               transform_non_params=lambda _: P())


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(("batch", "length"), "batch"))


def check_batch(batch_size: int, microbatches: int, mesh: Mesh):
  dp = data_parallel_size(dict(mesh.shape))
  if batch_size % microbatches or (batch_size // microbatches) % dp:
    raise ShardingError(
        f"train.batch_size={batch_size} with train.microbatches={microbatches}: each microbatch "
        f"({batch_size / microbatches:g} sequences) must divide by the data-parallel size {dp} "
        f"(mesh data x fsdp x expert)")


def make_constrain(mesh: Mesh):
  """Activation sharding constraint by logical axes, for use inside the jitted step."""
  def constrain(x, axes):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes, "activation")))
  return constrain
