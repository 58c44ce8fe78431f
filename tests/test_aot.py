"""celerity_jax.commands.aot: the loop's train step compiled for TPU topologies on this CPU machine
(libtpu, from the test extra, provides compile-only TPU devices; nothing runs on a TPU)."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import CACHE

from celerity_jax.commands import aot, aot_compile, aot_fit, hlo_collectives, tpu_chips
from celerity_jax.main import parse

# celerity_tiny's rules on a shape whose dims are multiples of TPU tiles (8 x 128), so arrays carry
# no layout padding and the argument bytes can be predicted exactly
ALIGNED = [
  "recipe=celerity_tiny",
  "model.d_model=256",
  "model.n_layers=2",  # (given: the family rule would derive 8 from d_model)
  "model.n_heads=2",
  "model.d_head=128",
  "model.d_ff=1024",
  "model.vocab_size=1024",
  "param.d_base=256",
  "train.batch_size=64",
]
TPU_SCALAR_BYTES = 512  # a TPU buffer takes at least 512 bytes; the state has a few scalars


def per_device_bytes(tree) -> tuple[int, int]:
  """(bytes one device holds by the shardings, number of scalar leaves), from shapes alone."""
  leaves = jax.tree.leaves(tree)
  held = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
  return held, sum(1 for x in leaves if x.shape == ())


@pytest.mark.parametrize(
  "topology, mesh",
  [
    ("v5e:2x2", ["mesh.data=1", "mesh.fsdp=-1"]),
    ("v5p:2x2x1", ["mesh.data=2", "mesh.fsdp=2"]),
    ("v6e:2x2", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]),
  ],
)
def test_the_loop_step_compiles_for_a_topology_and_holds_the_sharded_state(topology, mesh):
  cfg, _ = parse(ALIGNED + mesh)
  chip, devices = aot_compile.topology_devices(topology)
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  cached = set(os.listdir(CACHE)) if CACHE.exists() else set()
  step = aot_compile.compile_step(cfg, devices)
  # TPU executables stay out of the persistent cache (later CPU runs could not load them); the
  # shape is new to this session, so a leak would add an entry
  assert (set(os.listdir(CACHE)) if CACHE.exists() else set()) == cached
  training, compiled, _, error = step
  assert compiled is not None, error
  state, batch = aot_compile.abstract_inputs(training, cfg)
  state_bytes, scalars = per_device_bytes(state)
  batch_bytes, _ = per_device_bytes(batch)
  fsdp = training.mesh.shape["fsdp"] * training.mesh.shape["tensor"]
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert state_bytes < whole / fsdp * 1.01  # params + Adam moments, split over the shards
  argument = compiled.memory_analysis().argument_size_in_bytes
  assert 0 <= argument - (state_bytes + batch_bytes) <= scalars * TPU_SCALAR_BYTES

  rep = aot_compile.report(
    cfg, topology, devices=(chip, devices), step=step
  )  # one compile for both
  m = rep["memory"]
  assert m["fits"] and m["argument_bytes"] == argument and 0 < m["peak_bytes"] < m["hbm_bytes"]
  assert m["hbm_bytes"] == chip.hbm_bytes
  layers = cfg.model.n_layers
  # FSDP gathers each block's weights inside the scanned layers: forward and backward, per layer
  assert rep["collectives"]["all-gather"]["count"] >= 2 * layers
  bound = rep["bound"]
  assert bound["step_s"] == max(bound["compute_s"], bound["hbm_s"], bound["ici_s"]) > 0
  assert 0 < bound["mfu_at_bound"] <= 1


def test_long_context_attention_compiles_as_pallas_kernels_inside_the_sharded_step():
  """At 1024 tokens with 512-token tiles `auto` picks the Pallas kernels on TPU; Mosaic compiles
  the forward, dk/dv and dq kernels per device inside shard_map (heads split over tensor), and the
  step holds no 1024 x 1024 scores."""
  long = ALIGNED + ["model.seq_len=1024", "train.batch_size=16", "mesh.data=2", "mesh.tensor=2"]
  cfg, _ = parse(long)
  _, devices = aot_compile.topology_devices("v6e:2x2")
  training, compiled, _, error = aot_compile.compile_step(cfg, devices)
  assert compiled is not None, error
  text = compiled.as_text()
  # per layer: the forward (again in the backward if remat recomputes it), dk/dv and dq
  assert text.count('custom_call_target="tpu_custom_call"') >= 3 * cfg.model.n_layers
  assert "1024,1024]" not in text


def test_a_model_too_large_for_the_chip_is_a_result_with_the_numbers(capsys):
  huge = [
    "recipe=celerity_tiny",
    "model.d_model=8192",
    "model.n_layers=2",
    "model.n_heads=64",
    "model.d_head=128",
    "model.d_ff=32768",
    "model.vocab_size=32768",
    "train.batch_size=8",
    "mesh.data=-1",
  ]
  assert aot.main([*huge, "--topology", "v5e:2x2", "--json"]) == 1
  out = capsys.readouterr()
  m = json.loads(out.out)["memory"]
  assert not m["fits"] and m["needed_bytes"] > m["hbm_bytes"] > 15e9
  assert m["over_bytes"] == pytest.approx(m["needed_bytes"] - m["hbm_bytes"])
  assert "Traceback" not in out.err
  assert aot.main([*huge, "--topology", "v5e:2x2"]) == 1
  assert "DOES NOT FIT" in capsys.readouterr().out


def test_expert_parallel_moe_compiles_with_all_to_all():
  cfg, _ = parse(
    ["recipe=celerity_moe_nano_1", "mesh.data=1", "mesh.expert=4", "model.dispatch=capacity"]
  )
  rep = aot_compile.report(cfg, "v5e:2x2")
  assert rep["memory"]["fits"] and rep["collectives"]["all-to-all"]["count"] > 0


def test_bad_topologies_and_settings_exit_2_with_one_line(capsys):
  for argv in (
    ["--topology", "v5litepod-6"],
    ["--topology", "v9z:2x2"],
    ["--topology", "v5p-4x4"],
    ["--topology", "v5e:2x2", "mesh.tensor=3"],
    ["--topology", "v5e:2x2", "model.nope=1"],
  ):
    assert aot.main(["recipe=celerity_tiny", *argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_with_libtpu_installed_a_cpu_run_prints_no_tpu_noise():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
  code = "import celerity_jax, jax; print(jax.devices()[0].platform)"
  result = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0 and result.stdout.strip() == "cpu"
  assert result.stderr == ""


def test_collectives_in_loops_count_once_per_trip():
  hlo = """HloModule m

%cond (p: (s32[])) -> pred[] {
  %c = s32[] constant(5)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[])) -> (s32[]) {
  %g = bf16[8,128]{1,0} all-gather(%x), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'},
  dimensions={0}
  ROOT %t = (s32[]) tuple(%i)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[]) while(%init), condition=%cond, body=%body
  %r = f32[1024]{0} all-reduce(%a), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %o = f32[4] copy(%a)
}
"""
  found = hlo_collectives.collectives(hlo, 8)
  gather = found["all-gather"]
  assert gather["count"] == 5 and gather["bytes"] == 5 * 8 * 128 * 2
  assert gather["traffic"] == pytest.approx(5 * 8 * 128 * 2 * 3 / 4)  # a ring of 4
  assert found["all-reduce"]["count"] == 1
  assert found["all-reduce"]["traffic"] == pytest.approx(2 * 4096 * 7 / 8)


@pytest.mark.parametrize(
  "accelerator, topology, chips",
  [
    ("v5litepod-8", "v5e:2x4", 8),
    ("v5litepod-16", "v5e:4x4", 16),
    ("v6e-32", "v6e:4x8", 32),
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-128", "v5p:4x4x4", 64),
  ],
)
def test_accelerator_types_name_the_topology_libtpu_builds(accelerator, topology, chips):
  """Cloud TPU types count TensorCores on v5p (two per chip) and chips on v5e and v6e."""
  assert tpu_chips.topology_for(accelerator) == topology
  assert len(aot_compile.topology_devices(tpu_chips.resolve_topology(accelerator))[1]) == chips


def test_fit_candidates_keep_the_batch_near_the_law_and_the_model_divisible():
  """celerity_1b on a v5p-64 (32 chips): B = 340.6 sequences by the law; 9 heads allow no tensor
  parallelism on 32 chips; every layout kept rounds B within 5%, the others say by how much."""
  cfg, _ = parse(["recipe=celerity_1b"])
  chip = tpu_chips.CHIPS["v5p"]
  kept, rejected = aot_fit.candidates(cfg, chip, 32, 1, 0.05)
  law = aot_fit.law_batch_seqs(cfg)
  assert law == pytest.approx(340.6, abs=0.1)
  assert kept and all(abs(r.batch_seqs / law - 1) <= 0.05 for _, _, r, _ in kept)
  assert {layout.tensor for layout, *_ in kept} == {1}
  assert {r.batch_seqs for _, _, r, _ in kept} == {352}  # granule 32: 352 (+3.4%), not 320
  assert {(layout.rows, r.microbatches) for layout, _, r, _ in kept} == {(1, 11), (11, 1)}
  assert any("-6.0% from the law's 340.6 (allowed 5.0%)" in why for _, why in rejected)
  runs = [guess["run_s"] for *_, guess in kept]
  assert runs == sorted(runs) and kept[0][0].remat == "none"
  # a slice that cannot come within 5%: the closest B it allows, reported as such
  kept, _ = aot_fit.candidates(cfg, chip, 128, 1, 0.05)
  assert {r.batch_seqs for _, _, r, _ in kept} == {384}  # +12.8%, the nearest multiple of 128
  # a fixed batch is kept exactly: only granules that divide it
  fixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=320))
  kept, _ = aot_fit.candidates(fixed, chip, 32, 1, 0.05)
  assert {r.batch_seqs for _, _, r, _ in kept} == {320}
  assert {layout.rows for layout, *_ in kept} == {1, 2, 5, 10}


def test_fit_finds_a_layout_that_fits_where_the_default_does_not(capsys):
  """A fixed 4096 x 2048 batch, pure data parallel without remat, does not fit a v5e chip (512 rows
  needed ~26 GB with materialized attention and a B x L x L mask; blockwise attention and a
  constant mask bring them to 6.2 GB); the search finds a layout that fits (keeping B) and says
  why it rejected the others. A second
  celerity_jax.commands.aot
  runs at the same time in another process: libtpu's lock file does not stop it."""
  big = [*ALIGNED[:-1], "model.seq_len=2048", "train.batch_size=4096"]
  other = subprocess.Popen(
    [sys.executable, "-m", "celerity_jax.commands.aot", *big, "--topology", "v5e:2x2", "--json"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(1)
  assert aot.main([*big, "--topology", "v5litepod-4", "--fit", "--keep", "1", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  out, err = other.communicate(timeout=300)
  assert other.returncode == 1, err[-2000:]
  default = json.loads(out)["memory"]
  assert not default["fits"] and default["needed_bytes"] > default["hbm_bytes"]
  best = result["best"]
  assert (
    best["memory"]["fits"] and best["memory"]["peak_bytes"] <= 0.95 * best["memory"]["hbm_bytes"]
  )
  assert best["recipe_shape"]["batch_seqs"] == 4096 and best["batch"]["change"] == 0
  assert (
    best["layout"] != "mesh.data=4 mesh.fsdp=1 mesh.tensor=1 mesh.expert=1 model.remat=none "
    "train.microbatch_rows=1024"
  )
  cfg, _ = parse(big + best["overrides"])  # the printed overrides reproduce it
  assert aot_compile.report(cfg, "v5e:2x2")["memory"]["peak_bytes"] == best["memory"]["peak_bytes"]
  kinds = {r["kind"] for r in result["rejected"]}
  assert "slower" in kinds and kinds <= {"memory", "dominated", "slower", "budget", "batch"}
  assert all("GB per device" in r["reason"] for r in result["rejected"] if r["kind"] == "memory")


@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:1x1x1"])
def test_one_chip_topologies_build_a_single_device(topology):
  """One chip of any generation (what a one-GPU recipe is checked against: the GPU family's
  memory figure comes from v5p:1x1x1)."""
  assert len(aot_compile.topology_devices(topology)[1]) == 1
