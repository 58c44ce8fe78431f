"""A celerity_jax model as an lm-evaluation-harness `LM`: log-likelihood, rolling log-likelihood
and generation, batched and sharded (scorer.py).

lm-eval 0.4 has no registry for models outside its tree, so its CLI cannot name this one; pass an
instance instead: `lm_eval.simple_evaluate(model=CelerityLM.from_run(RUN_DIR), tasks=[...])`, or
use `python -m celerity_jax.commands.evaluate`.

Requests are encoded and truncated exactly as lm-eval's Hugging Face backend does for this
model's export (its `TemplateLM` base splits context and continuation; the rolling windows are its
own), so the two backends score the same tokens: a sentencepiece tokenizer trained here starts
every encoded text with the document boundary (eos), as the export's tokenizer adds it, and a
`tokenizer.json` adds nothing.
"""

from __future__ import annotations

import jax
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from celerity_jax.downstream.scorer import Scorer, restore


class CelerityLM(TemplateLM):
  def __init__(
    self,
    graphdef,
    params,
    mesh,
    model_cfg,
    tokenizer,
    batch_size: int = 16,
    add_boundary: bool | None = None,
    max_gen_toks: int = 256,
    seed: int = 0,
  ):
    """`params` as they sit on `mesh` (a run's training state, or `place`d); `add_boundary`:
    start each encoded text with eos (default: for a sentencepiece tokenizer, as its export)."""
    super().__init__()
    self.scorer = Scorer(graphdef, params, mesh, model_cfg, batch_size)
    self.tokenizer_ = tokenizer
    self.batch_size = batch_size
    self.max_length = model_cfg.seq_len
    self.max_gen_toks = max_gen_toks
    self.add_boundary = (
      tokenizer.file_name != "tokenizer.json" if add_boundary is None else add_boundary
    )
    self.key = jax.random.key(seed)
    self.requests_done = 0  # requests answered (log-likelihood windows count once each)
    self.step = None  # the checkpoint's step, for a model read from a run (from_run)

  @classmethod
  def from_run(cls, run_dir, step: int | None = None, mesh_cfg=None, **kwargs) -> CelerityLM:
    """A run's checkpoint `step` (default: its newest complete one) on every device of every
    process: the run's mesh where it fits them, else data-parallel."""
    from celerity_jax import storage, trained
    from celerity_jax.config import ConfigError
    from celerity_jax.data import tokenizer as tokenizer_lib
    from celerity_jax.sampling import sampling_mesh

    run_dir = storage.location(run_dir)
    step, cfg, described = trained.settings(run_dir, step, "evaluate")
    found = trained.tokenizer_file(run_dir, step, described.get("data_fingerprint"), "evaluate")
    if found is None:
      raise ConfigError(f"evaluate: {run_dir} trained on synthetic tokens (no text to score)")
    mesh = sampling_mesh(mesh_cfg or cfg.mesh, jax.devices())
    graphdef, params = restore(run_dir, step, cfg, mesh)
    lm = cls(graphdef, params, mesh, cfg.model, tokenizer_lib.load(found), **kwargs)
    lm.step = step
    return lm

  # ------------------------------------------------------------------ tokens

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_.eos_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = self.tokenizer_.encode([string])[0].tolist()
    boundary = self.add_boundary and add_special_tokens is not False
    return [self.eot_token_id, *ids] if boundary else ids

  def tok_decode(self, tokens) -> str:
    return self.tokenizer_.decode(tokens)

  # ------------------------------------------------------------------ scoring

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(summed log-probability, all greedy) of each continuation after its context, the input
    left-truncated to the context length as lm-eval's Hugging Face backend does."""
    rows = []
    for _, context, continuation in requests:
      whole = (context + continuation)[-(self.max_length + 1) :]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # like lengths batch together
    out = [None] * len(rows)
    bar = tqdm(total=len(rows), disable=disable_tqdm, desc="celerity log-likelihoods")
    for start in range(0, len(order), self.batch_size):
      chosen = order[start : start + self.batch_size]
      for i, result in zip(chosen, self.scorer.score([rows[i] for i in chosen]), strict=True):
        out[i] = result
      bar.update(len(chosen))
    bar.close()
    self.requests_done += len(rows)
    for (key, _, _), result in zip(requests, out, strict=True):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's total log-likelihood over disjoint windows of the context length (lm-eval's
    rolling windows, each predicting its tokens from as much context as fits)."""
    windows, owner = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      for window in map(
        utils.make_disjoint_window,
        utils.get_rolling_token_windows(
          token_list=self.tok_encode(string),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        ),
      ):
        windows.append((None, *window))
        owner.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for index, (logprob, _) in zip(owner, scores, strict=True):
      totals[index] += logprob
    for req, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continues each context until a stop string, eos or max_gen_toks, batched by settings."""
    eos = self.tok_decode([self.eot_token_id])
    results = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="celerity generation")
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      steps = kwargs.pop("max_gen_toks")
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
      room = self.max_length - steps
      if room <= 0:
        from celerity_jax.config import ConfigError

        raise ConfigError(
          f"max_gen_toks={steps} leaves no room in a {self.max_length}-token context"
        )
      for start in range(0, len(indices), self.batch_size):
        chosen = indices[start : start + self.batch_size]
        contexts = [self.tok_encode(requests[i].args[0])[-room:] for i in chosen]
        for i, text in zip(
          chosen, self._generate(contexts, until, steps, temperature), strict=True
        ):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chosen))
    bar.close()
    self.requests_done += len(requests)
    return results

  def _generate(self, contexts, until, steps, temperature) -> list[str]:
    made = [[] for _ in contexts]
    live = list(range(len(contexts)))
    for _ in range(steps):
      if not live:
        break
      self.key, key = jax.random.split(self.key)
      tokens = self.scorer.next_tokens([contexts[i] + made[i] for i in live], key, temperature)
      for i, token in zip(list(live), tokens, strict=True):
        made[i].append(token)
        text = self.tok_decode(made[i])
        if token == self.eot_token_id or any(stop and stop in text for stop in until):
          live.remove(i)
    out = []
    for tokens in made:
      text = self.tok_decode(tokens)
      for stop in until:
        if stop:
          text = text.split(stop)[0]
      out.append(text)
    return out
