"""Device grids follow the hardware: TPU chips by their torus coordinates, slices stacked on the
data axis, checked with fake devices that carry coordinates and slice indices; and which batch rows
a process reads."""

import dataclasses
import random

import jax
import numpy as np
import pytest

from celerity_jax import sharding
from celerity_jax.config import MeshConfig


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What jax's mesh_utils reads from a TPU device."""

  id: int
  coords: tuple
  slice_index: int
  process_index: int
  device_kind: str
  core_on_chip: int = 0
  platform: str = "tpu"


def tpu_slice(kind, shape, slice_index=0, first_id=0, host_shape=(2, 2, 1)):
  """The chips of one slice, x fastest; a host holds a 2x2 block of chips as on v4/v5p/v5e."""
  chips = []
  for z in range(shape[2]):
    for y in range(shape[1]):
      for x in range(shape[0]):
        host = (
          x // host_shape[0]
          + (y // host_shape[1]) * (shape[0] // host_shape[0])
          + z * (shape[0] // host_shape[0]) * (shape[1] // host_shape[1])
        )
        chips.append(FakeTpu(first_id + len(chips), (x, y, z), slice_index, host, kind))
  return chips


def neighbours(a, b) -> bool:
  return sum(abs(i - j) for i, j in zip(a.coords, b.coords, strict=True)) == 1


def tensor_pairs_are_neighbours(grid) -> bool:
  pairs = grid.reshape(-1, grid.shape[2], grid.shape[3]).transpose(0, 2, 1).reshape(-1, 2)
  return all(neighbours(a, b) for a, b in pairs)


@pytest.mark.parametrize(
  "kind,shape", [("TPU v5 lite", (4, 4, 1)), ("TPU v4", (2, 2, 2)), ("TPU v5p", (2, 2, 2))]
)
def test_tensor_parallel_partners_are_physical_neighbours(kind, shape):
  chips = tpu_slice(kind, shape)
  random.Random(0).shuffle(chips)  # the device list's order is not the torus order
  cfg = MeshConfig(data=-1, fsdp=1, tensor=2)
  grid = sharding.device_grid(cfg, chips)
  assert grid.shape == (len(chips) // 2, 1, 2, 1)
  assert sorted(d.id for d in grid.flat) == sorted(d.id for d in chips)
  assert tensor_pairs_are_neighbours(grid)
  # what a plain reshape of the device list would have given
  assert not tensor_pairs_are_neighbours(np.asarray(chips, object).reshape(grid.shape))


def test_slices_are_stacked_on_the_data_axis():
  chips = tpu_slice("TPU v5 lite", (2, 2, 1), 0) + tpu_slice("TPU v5 lite", (2, 2, 1), 1, 4)
  random.Random(1).shuffle(chips)
  cfg = MeshConfig(data=-1, fsdp=2, tensor=2, slices=2)
  assert sharding.mesh_shape(cfg, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  grid = sharding.device_grid(cfg, chips)
  assert grid.shape == (2, 2, 2, 1)
  assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
  assert tensor_pairs_are_neighbours(grid)  # only the data axis crosses the slow network


def test_slice_count_must_match_the_hardware():
  chips = tpu_slice("TPU v5 lite", (2, 2, 1), 0) + tpu_slice("TPU v5 lite", (2, 2, 1), 1, 4)
  with pytest.raises(sharding.ShardingError, match="in 2 TPU slices; set mesh.slices=2"):
    sharding.device_grid(MeshConfig(data=-1, slices=4), chips)
  with pytest.raises(sharding.ShardingError, match="does not divide the 8 devices"):
    sharding.device_grid(MeshConfig(data=-1, slices=3), chips)
  with pytest.raises(sharding.ShardingError, match="4 are available per slice"):
    sharding.device_grid(MeshConfig(data=1, fsdp=2, slices=2), chips)
  # off TPU a slice is a process: one process cannot be two slices
  with pytest.raises(sharding.ShardingError, match=r"in 1 processes \(each is a slice off TPU\)"):
    sharding.make_mesh(MeshConfig(data=-1, slices=2))


def test_one_process_reads_every_row():
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16), np.arange(16))
  assert jax.process_count() == 1
