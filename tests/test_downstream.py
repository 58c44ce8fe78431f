"""Downstream evaluation: the celerity lm-eval backend scores a local multiple-choice task as
lm-eval's own Hugging Face backend does on the run's export (per request, to 1e-4; the same
accuracies), and its command's errors are one line."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

QUESTIONS = [
  ("import os\nimport", [" sys", " the", " 42"], 0),
  ("def main(", ["):", "self", " banana"], 0),
  ("for i in", [" range(", " apple", " :"], 0),
  ("class Foo", ["(object):", " bar baz", "!!"], 0),
  ("return", [" None", " x", " 7)"], 1),
  ("if __name__ ==", [' "__main__":', " 3", " None"], 0),
]


def local_task(root, name="celerity_mc"):
  """A multiple-choice task of our own: a JSONL file and the YAML that names it."""
  data = root / "mc.jsonl"
  rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / f"{name}.yaml").write_text(
    f"task: {name}\n"
    "dataset_path: json\n"
    f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    "test_split: test\n"
    "output_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\n'
    'doc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{answer}}"\n'
    "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
  )
  return root


TEXTS = [
  "import os\nimport sys\n\n\ndef main(argv):\n    return len(argv)\n" * 3,
  "class Parser(object):\n    def parse(self, text):\n        return text.split()\n",
  "for key, value in sorted(table.items()):\n    print(key, value)\n" * 2,
]


def more_tasks(root):
  """A rolling log-likelihood task (texts longer than the context) and a generation task."""
  texts = root / "texts.jsonl"
  texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  data = (
    f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {texts}\ntest_split: test\n"
  )
  (root / "celerity_ppl.yaml").write_text(
    f"task: celerity_ppl\n{data}output_type: loglikelihood_rolling\n"
    'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
  )
  (root / "celerity_gen.yaml").write_text(
    f"task: celerity_gen\n{data}output_type: generate_until\n"
    'doc_to_text: "{{text[:40]}}"\ndoc_to_target: "{{text[40:50]}}"\n'
    'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
    "metric_list:\n  - metric: exact_match\n"
  )
  return root


def per_request(results, task):
  return [
    [float(r[0][0]) for r in sample["resps"]]
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])
  ]


def test_celerity_backend_scores_as_the_hf_backend_on_the_export(trained_text_run, tmp_path):
  from celerity_jax.commands.export import export
  from celerity_jax.downstream import tasks as tasks_lib
  from celerity_jax.downstream.lm import CelerityLM

  include = str(more_tasks(local_task(tmp_path)))
  export(trained_text_run, None, tmp_path / "hf", "hf")
  names = "celerity_mc,celerity_ppl,celerity_gen"
  # 8 rows a batch: split over the 8 devices' data axis
  ours = tasks_lib.evaluate(
    CelerityLM.from_run(trained_text_run, batch_size=8),
    tasks_lib.load(names, include),
    log_samples=True,
  )
  theirs = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
    tasks=tasks_lib.load(names, include),
    log_samples=True,
    batch_size=4,
    device="cpu",
  )
  a, b = per_request(ours, "celerity_mc"), per_request(theirs, "celerity_mc")
  assert len(a) == len(QUESTIONS) and [len(x) for x in a] == [len(c) for _, c, _ in QUESTIONS]
  for x, y in zip(a, b, strict=True):
    assert x == pytest.approx(y, abs=1e-4)
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["celerity_mc"][metric] == theirs["results"]["celerity_mc"][metric]
  # rolling log-likelihoods over several context windows per text
  a, b = (
    [
      float(s["resps"][0][0])
      for s in sorted(r["samples"]["celerity_ppl"], key=lambda s: s["doc_id"])
    ]
    for r in (ours, theirs)
  )
  assert len(a) == len(TEXTS) and a == pytest.approx(b, abs=1e-4)
  assert ours["results"]["celerity_ppl"]["bits_per_byte,none"] == pytest.approx(
    theirs["results"]["celerity_ppl"]["bits_per_byte,none"], rel=1e-5
  )
  # greedy generation: the same text, cut at the same stop
  a, b = (
    [s["resps"][0][0] for s in sorted(r["samples"]["celerity_gen"], key=lambda s: s["doc_id"])]
    for r in (ours, theirs)
  )
  assert a == b and any(a)


def test_training_logs_task_accuracy_and_the_command_agrees(tmp_path, stdlib_cache):
  from conftest import small_config

  from celerity_jax.train import loop

  include = local_task(tmp_path)
  run = tmp_path / "run"
  cfg = small_config(
    "data.corpus=stdlib",
    f"data.cache_dir={stdlib_cache}",
    "model.vocab_size=512",
    f"run.dir={run}",
    "train.stop_step=6",
    "downstream.tasks=celerity_mc",
    "downstream.every=3",
    f"downstream.include_path={include}",
  )
  loop.run(cfg)
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  logged = {
    r["step"]: r["downstream/celerity_mc/acc"] for r in rows if "downstream/celerity_mc/acc" in r
  }
  assert sorted(logged) == [3, 6]
  out = tmp_path / "results.json"
  args = [str(run), "--tasks", "celerity_mc", "--include-path", str(include), "--out", str(out)]
  proc = run_command(args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(out.read_text())
  assert results["results"]["celerity_mc"]["acc,none"] == logged[6]
  assert f"celerity_mc/acc {logged[6]:.4f}".split() in [x.split() for x in proc.stdout.splitlines()]


def run_command(args, cwd, env=None):
  import os
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, "-m", "celerity_jax.commands.evaluate", *args],
    cwd=cwd,
    env={**os.environ, **(env or {})},
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "case,args,env,status,named",
  [
    ("unknown task", ["--tasks", "arc_easyy"], {}, 2, "unknown task 'arc_easyy'"),
    ("bad shots", ["--tasks", "arc_easy:x"], {}, 2, "shots must be a whole number"),
    (
      "data missing offline",
      ["--tasks", "arc_easy"],
      {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
      3,
      "task arc_easy: its data could not be loaded",
    ),
    ("not a run", ["--tasks", "celerity_mc"], {}, 2, "has no checkpoints directory"),
  ],
)
def test_evaluate_errors_are_one_line(tmp_path, case, args, env, status, named):
  include = local_task(tmp_path)
  target = tmp_path / "run"
  target.mkdir()
  if case != "not a run":  # (the tasks are checked once the directory is a run's)
    (target / "checkpoints").mkdir()
  before = sorted(target.rglob("*"))
  env = {**env, "HF_HOME": str(tmp_path / "hf_home")}  # an empty datasets cache
  proc = run_command([str(target), *args, "--include-path", str(include)], tmp_path, env)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == status, proc.stderr[-2000:]
  assert len(lines) == 1 and named in lines[0], proc.stderr[-2000:]
  assert sorted(target.rglob("*")) == before


def test_download_loads_a_tasks_data(tmp_path):
  include = local_task(tmp_path)
  args = ["--download", "--tasks", "celerity_mc", "--include-path", str(include)]
  proc = run_command(args, tmp_path, {"HF_HOME": str(tmp_path / "hf_home")})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "the data of celerity_mc is in the datasets cache" in proc.stdout
