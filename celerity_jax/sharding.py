"""Device mesh and the ONE table mapping logical axes to mesh axes.

Every parameter names its logical axes (models/layers.param); activations name theirs at
`constrain` calls. Params, optimizer state and batches get NamedShardings from `RULES`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from celerity_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp", "expert"),  # every non-model-parallel axis splits the batch
  "length": None,
  "act_embed": None,  # d_model of activations stays whole
  "act_vocab": "tensor",
  "embed": "fsdp",  # params' d_model axis: FSDP (ZeRO-3) sharding
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",
  "vocab": "tensor",
  "norm": None,
  "layers": None,  # the stacked-layer axis of scanned blocks
  "expert": "expert",  # MoE experts: expert parallelism
  "router": None,  # the router's expert logits stay whole
}


class ShardingError(ConfigError):
  """A mesh, batch or parameter shape that cannot be sharded as configured."""


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Total size of every mesh axis: resolves the one -1 axis over a slice's devices and checks
  that a slice's axes cover exactly its devices; `data` includes the slices (slices x data)."""
  sizes = dataclasses.asdict(mesh_cfg)
  slices = sizes.pop("slices")
  if n_devices % slices:
    raise ShardingError(f"mesh.slices={slices} does not divide the {n_devices} devices")
  per_slice = n_devices // slices
  where = f"{per_slice} devices" + (f" per slice ({slices} slices)" if slices > 1 else "")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  for name, value in sizes.items():
    if value == -1:
      if per_slice % fixed:
        raise ShardingError(f"mesh: {where} do not divide by the fixed axes {sizes}")
      sizes[name] = per_slice // fixed
  if math.prod(sizes.values()) != per_slice:
    raise ShardingError(
      f"mesh {sizes} has {math.prod(sizes.values())} devices but "
      f"{per_slice} are available"
      + (" per slice" if slices > 1 else "")
      + f"; set mesh.* so the product is {per_slice}"
    )
  sizes["data"] *= slices
  return sizes


def device_grid(mesh_cfg, devices) -> np.ndarray:
  """Devices laid out on MESH_AXES by the hardware's topology (jax's mesh_utils): inside a slice
  the axes follow the TPU torus (elsewhere the device order); slices are stacked along `data`, so
  only data parallelism crosses the slower data-center network (DCN). A slice is a TPU slice
  (`slice_index`) or, on GPU and CPU, a process."""
  sizes, slices = mesh_shape(mesh_cfg, len(devices)), mesh_cfg.slices
  ici = [sizes[a] // slices if a == "data" else sizes[a] for a in MESH_AXES]
  if slices == 1:
    return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  on_tpu = devices[0].platform == "tpu"
  granules = {d.slice_index if on_tpu else d.process_index for d in devices}
  if len(granules) != slices:
    kind = "TPU slices" if on_tpu else "processes (each is a slice off TPU)"
    raise ShardingError(
      f"mesh.slices={slices} but the {len(devices)} devices are in "
      f"{len(granules)} {kind}; set mesh.slices={len(granules)}"
    )
  dcn = [slices if a == "data" else 1 for a in MESH_AXES]
  return mesh_utils.create_hybrid_device_mesh(
    ici, dcn, devices, process_is_granule=not on_tpu, allow_split_physical_axes=True
  )


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(
    device_grid(mesh_cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def data_parallel_size(mesh_sizes: dict[str, int]) -> int:
  axes = RULES["batch"]
  return math.prod(mesh_sizes[a] for a in axes)


def logical_spec(axes: tuple[str | None, ...], where: str = "") -> P:
  """PartitionSpec for logical axes; an axis without a rule is an error, never silently
  replicated."""
  out, used = [], set()
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in RULES:
      raise ShardingError(
        f"{where}: logical axis {name!r} has no rule in sharding.RULES "
        f"(known: {', '.join(sorted(RULES))})"
      )
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
      raise ShardingError(
        f"{where}: dimension {dim} is not divisible by mesh axes {flat} "
        f"of total size {parts}; change the model or mesh.* sizes"
      )


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
    spec_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return nnx.to_pure_dict(specs)


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state, params_specs):
  """Optimizer moments shard like their params; counters and scalars are replicated."""
  return optax.tree_map_params(
    optimizer,
    lambda _, spec: spec,
    abstract_opt_state,
    params_specs,
    transform_non_params=lambda _: P(),
  )


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


@functools.cache  # the loop places every step's batch: build the sharding once per mesh
def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(("batch", "length"), "batch"))


def process_rows(mesh: Mesh, n_rows: int) -> np.ndarray:
  """The global batch rows this process's devices hold, ascending: what its data source reads.
  Processes that hold the same rows (model axes across hosts) read the same rows."""
  shards = batch_sharding(mesh).addressable_devices_indices_map((n_rows, 1)).values()
  return np.asarray(sorted({r for rows, _ in shards for r in range(*rows.indices(n_rows))}))


def place_batch(local_batch: dict, mesh: Mesh, n_rows: int) -> dict:
  """Global arrays of `n_rows` rows from this process's rows of each key (process_rows; every
  row in a single process): each process contributes only the rows its devices hold."""
  return {
    key: jax.make_array_from_process_local_data(
      batch_sharding(mesh), value, (n_rows, *value.shape[1:])
    )
    for key, value in local_batch.items()
  }


def make_constrain(mesh: Mesh):
  """Activation sharding constraint by logical axes, for use inside the jitted step."""

  def constrain(x, axes):
    return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_spec(axes, "activation"))
    )

  return constrain
