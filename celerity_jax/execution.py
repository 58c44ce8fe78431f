"""How a run's step executes on its devices: the attention path, scanned or unrolled layers, the
gradient-accumulation microbatches and where their gradients are summed.

Every choice here changes speed or memory, never what is computed (up to the order of a sum).
`resolve.resolve` makes them once for the run's platform and records them in `Resolved`
(`--print-config` and config.json show them); the model and the step only read them.

The measures that exist only for CPU speed all live here. Each one's gain at the default shape on
2 cores, the step with the measure off against the step as planned, in one run (docs/results.md,
"CPU speed measures"; `python -m tools.bench_cpu_measures`):
- attention `auto` is blockwise on CPU at every length: a tile's elementwise work stays in
  cache (1.20x);
- layers run unrolled up to SCAN_ABOVE groups: in a scan XLA copies the body's residuals and
  transposes them for the weight gradients (1.22x);
- a dense model's rows per device are split into microbatches of at most
  train.cpu_microbatch_tokens tokens, whose activations stay in cache (2.6x);
- on a mesh that only splits the batch, each device sums its own microbatches' gradients and the
  devices average once, instead of an all-reduce per microbatch (1.24x).
The process-level measures (one CPU device per core: 1.61x; glibc's huge pages: 1.00x at this
shape, 1.07x at ~20M) are set before jax loads, by the entry points (platform.prepare_command).
"""

from __future__ import annotations

from celerity_jax.config import ConfigError

SCAN_ABOVE = 8  # layer groups above which layers run under lax.scan (compile time flat in depth)
PER_DEVICE_ABOVE = 2  # microbatches above which per-device accumulation pays (0.95-0.97x at 2)


def attention_path(
  kind: str, length: int, block: int, platform: str, dtype: str = "bfloat16"
) -> str:
  """model.attention's path for `platform`. `auto`: on CPU blockwise at any length; elsewhere
  XLA's materialized attention up to one block, and above it the Pallas kernels on TPU (where the
  sequence tiles into multiples of 128) or blockwise. `auto` never picks `cudnn` (cuDNN's fused
  attention) or `triton` (Pallas GPU kernels) until a GPU has measured them against blockwise
  (tools/gpu_check.py). A path the platform or dtype cannot run, or a sequence the kernels cannot
  tile, is a config error."""
  path = kind
  if kind == "auto":
    if platform == "cpu":
      path = "blockwise"
    elif length <= block:
      path = "reference"
    else:
      path = "pallas" if platform == "tpu" and pallas_tile(length, block) else "blockwise"
  if path == "pallas":
    if platform == "gpu":  # the kernels are Mosaic (TPU) kernels: on a GPU only the interpreter
      raise ConfigError(
        "model.attention=pallas runs TPU kernels (on CPU interpreted, for tests); on GPU use "
        "model.attention=blockwise, triton, cudnn or auto"
      )
    pallas_tile_or_error(length, block)
  if path in ("cudnn", "triton"):
    if platform != "gpu":
      raise ConfigError(f"model.attention={path} runs on an NVIDIA GPU only, not on {platform}")
    if dtype not in ("bfloat16", "float16"):
      raise ConfigError(
        f"model.attention={path} needs model.dtype=bfloat16 or float16, not {dtype}"
      )
  if path == "cudnn" and length % 2:
    raise ConfigError(f"model.attention=cudnn needs an even model.seq_len, not {length}")
  return path


TRITON_TILE = 64  # the Triton kernels' forward tile: the sequence must be a multiple


def triton_shape_or_error(length: int, head_dim: int) -> None:
  """The shapes the Triton kernels take (models/triton_attention.py), as a config error."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ConfigError(
      f"model.attention=triton needs model.d_head a power of two of at least 16, not {head_dim}"
    )
  if length % TRITON_TILE:
    raise ConfigError(
      f"model.attention=triton needs model.seq_len a multiple of {TRITON_TILE}, not {length}"
    )


def pallas_tile(length: int, block: int) -> int:
  """The Pallas kernels' square tile: the whole sequence if it fits in one block, else the
  largest multiple of 128 (a TPU vector register's lanes) not above `block` dividing it; 0 if
  there is none."""
  if length <= block:
    return length
  return next((s for s in range(block - block % 128, 0, -128) if length % s == 0), 0)


def pallas_tile_or_error(length: int, block: int) -> int:
  tile = pallas_tile(length, block)
  if not tile:
    raise ConfigError(
      f"model.attention=pallas needs model.seq_len={length} to be a multiple of 128 at most "
      f"model.attention_block={block} (or seq_len <= attention_block)"
    )
  return tile


def layer_groups(model) -> int:
  """The decoder's scanned unit: one layer, or for a mixture of experts a group of
  model.moe_every layers whose last is routed."""
  return model.n_layers // model.moe_every if model.experts else model.n_layers


def scan_layers(model) -> bool:
  """model.scan_layers, or when unset, whether the model has more than SCAN_ABOVE groups."""
  if model.scan_layers is not None:
    return model.scan_layers
  return layer_groups(model) > SCAN_ABOVE


def cache_split(model, limit_tokens: int, rows: int, platform: str) -> int:
  """How many parts each device's `rows` per microbatch are split into on CPU: the smallest
  divisor that brings a part to at most `limit_tokens` tokens (one row where a row alone is over
  the limit). 1 elsewhere, with the limit 0, and for mixtures of experts, whose load-balancing
  loss is not a mean over tokens. B and the gradient (a mean over the same rows) are unchanged."""
  if platform != "cpu" or not limit_tokens or model.experts:
    return 1
  fits = (
    m for m in range(1, rows + 1) if rows % m == 0 and rows // m * model.seq_len <= limit_tokens
  )
  return next(fits, rows)


def accumulates_per_device(microbatches: int, mesh_sizes: dict) -> bool:
  """Several devices that only split the batch (every axis but data is 1) each hold whole
  parameters, so above PER_DEVICE_ABOVE microbatches each sums its own rows' gradients and the
  devices average once."""
  devices = 1
  for size in mesh_sizes.values():
    devices *= size
  only_data = all(size == 1 for axis, size in mesh_sizes.items() if axis != "data")
  return microbatches > PER_DEVICE_ABOVE and devices > 1 and only_data
