"""Generate text from a trained run, streaming tokens to stdout as they are decoded.

  python -m celerity_jax.commands.sample RUN_DIR [--step N] --prompt TEXT [--max-tokens 64]
      [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--batch 1] [--json]

Decoding is jitted with a KV cache and sharded on the run's mesh where it fits this machine's
devices (else data-parallel over them). The prompt follows the end-of-document token, as every
document did in training; generation stops at the model's next end-of-document. A run on synthetic
tokens has no tokenizer: give token ids with --prompt-ids 5,17,3 instead. Temperature 0 is greedy;
--top-k and --top-p restrict sampling to the k most likely tokens and to the nucleus of mass p.
--batch B draws B continuations at once. --json prints one JSON record instead of the stream.
Speed (decode steps only, compilation excluded) goes to stderr.
"""

from __future__ import annotations

import json
import sys

from celerity_jax.cli import ArgumentParser, run_cli
from celerity_jax.config import ConfigError


def _prompt_ids(args, tokenizer) -> list[int]:
  if args.prompt_ids is not None:
    try:
      return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
      raise ConfigError(
        f"--prompt-ids {args.prompt_ids!r}: expected comma-separated ints"
      ) from None
  if tokenizer is None:
    raise ConfigError(
      f"{args.run_dir} has no tokenizer.model (it trained on synthetic tokens): "
      "give --prompt-ids instead of --prompt"
    )
  return [tokenizer.eos_id] + tokenizer.encode([args.prompt])[0].tolist()


class _Stream:
  """Prints one row as it grows. Text is re-decoded whole each time (byte-fallback pieces make a
  character only together), and the new end printed once it is complete; ids print one by one."""

  def __init__(self, tokenizer, prompt_ids):
    self.tokenizer, self.ids = tokenizer, list(prompt_ids)
    self.shown = tokenizer.decode(self.ids) if tokenizer else " ".join(map(str, self.ids))
    self._write(self.shown)

  @staticmethod
  def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()

  def __call__(self, tokens_B):
    self.ids.append(int(tokens_B[0]))
    if self.tokenizer is None:
      self._write(f" {self.ids[-1]}")
      return
    text = self.tokenizer.decode(self.ids)
    if not text.endswith("\ufffd") and text.startswith(self.shown):
      self._write(text[len(self.shown) :])
      self.shown = text


def sample(args) -> dict:
  from celerity_jax import trained as trained_lib
  from celerity_jax.sampling import Sampler, Settings

  settings = Settings(
    args.max_tokens, args.temperature, args.top_k, args.top_p, args.batch, args.seed
  )
  run = trained_lib.load(args.run_dir, args.step, "sample")
  prompt = _prompt_ids(args, run.tokenizer)
  if max(prompt, default=0) >= run.cfg.model.vocab_size or min(prompt, default=0) < 0:
    raise ConfigError(f"--prompt-ids: ids must be in [0, {run.cfg.model.vocab_size})")
  sampler = Sampler(run.model(), settings, len(prompt), run.cfg.mesh)
  stop = run.tokenizer.eos_id if run.tokenizer is not None else None
  stream = _Stream(run.tokenizer, prompt) if settings.batch == 1 and not args.json else None
  result = sampler.generate(prompt, stop, stream)
  if stream is not None:
    sys.stdout.write("\n")

  def text(ids):
    full = prompt[1:] + [int(t) for t in ids if t != stop]  # without the leading EOS and the stop
    return run.tokenizer.decode(full) if run.tokenizer else None

  samples = [{"ids": [int(t) for t in row], "text": text(row)} for row in result.tokens]
  if stream is None and not args.json:
    for i, s in enumerate(samples):
      print(f"--- sample {i}\n{s['text'] if s['text'] is not None else s['ids']}")
  print(
    f"celerity_jax: step {run.step}: {result.steps + 1} tokens x {settings.batch} rows; "
    f"{result.tokens_per_s:,.0f} tokens/s decoding, prefill {result.prefill_s * 1e3:.0f} ms, "
    f"compile {result.compile_s:.1f} s",
    file=sys.stderr,
  )
  return {
    "step": run.step,
    "prompt": args.prompt,
    "samples": samples,
    "tokens_per_s": result.tokens_per_s,
    "prefill_s": result.prefill_s,
    "compile_s": result.compile_s,
  }


def main(argv):
  parser = ArgumentParser(
    prog="python -m celerity_jax.commands.sample", description=__doc__.splitlines()[0]
  )
  parser.add_argument("run_dir")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--prompt", default="")
  parser.add_argument("--prompt-ids", default=None)
  parser.add_argument("--max-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  record = sample(args)
  if args.json:
    print(json.dumps(record))


if __name__ == "__main__":
  sys.exit(run_cli(lambda: main(sys.argv[1:])))
