"""sentencepiece tokenizer: train one (BPE or unigram, byte fallback) or load a `.model` file.

Special ids are fixed so stores and models agree: pad 0, unk 1, bos 2, eos 3. Text is kept as is
(identity normalization, whitespace preserved) so code round-trips exactly.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from celerity_jax import storage
from celerity_jax.data import DataError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
  def __init__(self, model_proto: bytes):
    self.proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
      PAD,
      UNK,
      BOS,
      EOS,
    ):
      raise DataError("tokenizer: special ids must be pad 0, unk 1, bos 2, eos 3")
    self.vocab_size = self.sp.vocab_size()
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

  def encode(self, texts: list[str], threads: int = 0) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(texts, num_threads=threads)]

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def save(self, path):
    storage.write_atomic(storage.location(path), self.proto)


def load(path) -> Tokenizer:
  """From a local path or a gs:// URL."""
  path = storage.location(path)
  try:
    proto = path.read_bytes()
  except Exception as e:  # OSError locally; gcsfs's HTTP errors for gs://
    raise DataError(f"tokenizer {path}: cannot read: {e}") from None
  try:
    return Tokenizer(proto)
  except RuntimeError as e:
    raise DataError(f"tokenizer {path}: not a sentencepiece model: {e}") from None


def _lines(documents: Iterable[str]) -> Iterator[str]:
  return (line for doc in documents for line in doc.splitlines() if line.strip())


def train(
  documents: Callable[[], Iterable[str]],
  vocab_size: int,
  model_type: str = "bpe",
  max_sentences: int = 300_000,
  source: str = "the corpus",
) -> Tokenizer:
  """Trains on every k-th non-empty line of `documents()` (called twice: count, then sample), at
  most `max_sentences` lines. The sample is deterministic, unlike sentencepiece's own shuffle, so
  the same corpus gives the same tokenizer on every machine."""
  stride = max(1, -(-sum(1 for _ in _lines(documents())) // max_sentences))
  lines = (line for i, line in enumerate(_lines(documents())) if i % stride == 0)
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=lines,
      model_writer=proto,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=True,
      pad_id=PAD,
      unk_id=UNK,
      bos_id=BOS,
      eos_id=EOS,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
      num_threads=2,
    )
  except RuntimeError as e:  # sentencepiece's reason follows its source location
    reason = str(e).split("] ", 1)[-1].strip() if "] " in str(e) else "no usable training text"
    raise DataError(
      f"{source}: tokenizer training failed (model.vocab_size={vocab_size}): {reason}"
    ) from None
  return Tokenizer(proto.getvalue())
