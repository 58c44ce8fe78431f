"""Bad input to the tools (tests/bad_inputs.py states the contract each row checks): export,
sample, predict and the other commands, and runs as a crash leaves them."""

import pytest
from bad_inputs import CORPUS_FILES, FILES, RUN, check, write

TOOL_CASES = [
  # tools: the same contract
  (
    "export missing step",
    "celerity_jax.tools.export",
    ["{run}", "--step", "7", "--out", "{tmp}/p.npz"],
    2,
    "--step 7",
    None,
  ),
  (
    "export unwritable out",
    "celerity_jax.tools.export",
    ["{run}", "--out", "/proc/celerity/p.npz"],
    2,
    "/proc/celerity/p.npz",
    None,
  ),
  ("export not a run", "celerity_jax.tools.export", ["{tmp}"], 2, "checkpoints", None),
  ("export bad flag", "celerity_jax.tools.export", ["{run}", "--stpe", "3"], 2, "--stpe", None),
  (
    "plan zero chips",
    "celerity_jax.tools.plan",
    ["recipe=celerity_1b", "--chips", "0"],
    2,
    "--chips",
    None,
  ),
  (
    "plan zero mfu",
    "celerity_jax.tools.plan",
    ["recipe=celerity_1b", "--mfu", "0"],
    2,
    "--mfu",
    None,
  ),
  (
    "bench_step bad key",
    "celerity_jax.tools.bench_step",
    ["model.d_modle=3"],
    2,
    "model.d_modle",
    None,
  ),
  (
    "bench_data bad key",
    "celerity_jax.tools.bench_data",
    ["data.thread=3"],
    2,
    "data.thread",
    None,
  ),
  (
    "bench_checkpoint bad key",
    "celerity_jax.tools.bench_checkpoint",
    ["optim.lr=3"],
    2,
    "optim.lr",
    None,
  ),
  (
    "bench_moe bad key",
    "celerity_jax.tools.bench_moe",
    ["model.expert=3"],
    2,
    "model.expert",
    None,
  ),
  (
    "coord_check bad flag",
    "celerity_jax.tools.coord_check",
    ["--widths", "x"],
    2,
    "--widths",
    None,
  ),
  ("tokenize bad key", "celerity_jax.tools.tokenize", ["data.pth=x"], 2, "data.pth", None),
  ("predict missing run", "celerity_jax.tools.predict", ["{tmp}/nope"], 2, "nope", None),
  ("aot bad topology", "celerity_jax.tools.aot", ["--topology", "v9z:2x2"], 2, "v9z", None),
  (
    "critical_batch bad batches",
    "celerity_jax.tools.critical_batch",
    ["recipe=celerity_nano_1", "--batches", "8,x", "--out", "{tmp}/cb"],
    2,
    "--batches",
    None,
  ),
  (
    "sweep bad grid",
    "celerity_jax.tools.sweep",
    ["recipe=celerity_nano_1", "--grid", "optim.lr_base=0.1", "--out", "{tmp}/sw"],
    2,
    "optim.lr_base=0.1",
    None,
  ),
  (
    "sweep one setting",
    "celerity_jax.tools.sweep",
    ["recipe=celerity_nano_1", "--set", "optim.tau=0.1", "--out", "{tmp}/sw"],
    2,
    "at least two settings",
    None,
  ),
  (
    "collapse_experiment corpus too small",
    "celerity_jax.tools.collapse_experiment",
    ["--family", "gpu", "--out", "{tmp}/ce", *FILES[-4:-1], *CORPUS_FILES],
    3,
    "training tokens; the largest run needs 2,140,441,600",
    None,
  ),
  # nothing replaced without a word (exports), nothing generated from a NaN (sample)
  (
    "export hf into its own run dir",
    "celerity_jax.tools.export",
    ["{run}", "--format", "hf", "--out", "{run}", "--overwrite"],
    2,
    "is a run directory",
    None,
  ),
  (
    "export hf into a non-empty dir",
    "celerity_jax.tools.export",
    ["{run}", "--format", "hf", "--out", "{tmp}/hf"],
    2,
    "the directory is not empty (notes.txt)",
    write("hf/notes.txt", "mine"),
  ),
  (
    "export hf overwrite a foreign dir",
    "celerity_jax.tools.export",
    ["{run}", "--format", "hf", "--out", "{tmp}/hf", "--overwrite"],
    2,
    "not a Hugging Face export",
    write("hf/notes.txt", "mine"),
  ),
  (
    "export npz over a file",
    "celerity_jax.tools.export",
    ["{run}", "--out", "{tmp}/p.npz"],
    2,
    "exists; pass --overwrite",
    write("p.npz", "mine"),
  ),
  (
    "sample nan temperature",
    "celerity_jax.tools.sample",
    ["{run}", "--prompt-ids", "5,6", "--temperature", "nan"],
    2,
    "--temperature nan",
    None,
  ),
  (
    "sample seed past 64 bits",
    "celerity_jax.tools.sample",
    ["{run}", "--prompt-ids", "5", "--seed", str(2**64)],
    2,
    "--seed 18446744073709551616",
    None,
  ),
  # readers of a run: what a crash leaves, and values no run can have
  ("predict nan stop", "celerity_jax.tools.predict", ["{run}", "--stop", "nan"], 2, "--stop", None),
  (
    "predict torn config.json",
    "celerity_jax.tools.predict",
    ["{run}"],
    2,
    "run/config.json: not a run's config.json",
    lambda tmp: (tmp / "run" / "config.json").write_text('{"config": {"model": {'),
  ),
  (
    "predict before any logged point",
    "celerity_jax.tools.predict",
    ["{run}", "--stop", "0.02"],
    2,
    "no logged points in t = [0.01, 0.02]",
    None,
  ),
  (
    "reference run with torn config.json",
    "celerity_jax.main",
    [*RUN, "collapse.reference={run}"],
    2,
    "run/config.json: not a run's config.json",
    lambda tmp: (tmp / "run" / "config.json").write_text("{"),
  ),
  (
    "critical_batch nan tolerance",
    "celerity_jax.tools.critical_batch",
    ["recipe=celerity_nano_1", "--tolerance", "nan", "--out", "{tmp}/cb"],
    2,
    "--tolerance nan",
    None,
  ),
  (
    "critical_batch bad key",
    "celerity_jax.tools.critical_batch",
    ["recipe=celerity_nano_1", "optim.taw=1", "--out", "{tmp}/cb"],
    2,
    "optim.taw",
    None,
  ),
]


@pytest.mark.parametrize(
  "name,module,args,status,named,setup", TOOL_CASES, ids=[c[0] for c in TOOL_CASES]
)
def test_bad_tool_input(
  name, module, args, status, named, setup, tmp_path, bad_input_corpus, bad_input_run
):
  check(module, args, status, named, setup, tmp_path, bad_input_corpus, bad_input_run)
