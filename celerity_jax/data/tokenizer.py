"""Tokenizers: a sentencepiece model trained here (BPE or unigram, byte fallback), an existing
sentencepiece `.model`, or an existing Hugging Face `tokenizer.json` (the `tokenizers` library;
Llama-3-style vocabularies).

A trained model's special ids are fixed: pad 0, unk 1, bos 2, eos 3; its text is kept as is
(identity normalization, whitespace preserved) so code round-trips exactly. A tokenizer's `eos_id`
ends every document in the token stores (a given sentencepiece model's own eos; a tokenizer.json's
end-of-text token, found by name in END_OF_TEXT).
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


# end-of-text tokens of common tokenizer.json vocabularies, in order of preference
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|end|>", "<|im_end|>")


class Tokenizer:
  """A sentencepiece model."""

  file_name = "tokenizer.model"

  def __init__(self, model_proto: bytes):
    self.proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.eos_id = self.sp.eos_id()
    if self.eos_id < 0:
      raise DataError("tokenizer: the sentencepiece model has no eos piece")
    self.vocab_size = self.sp.vocab_size()
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

  def encode(self, texts: list[str], threads: int = 0) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(texts, num_threads=threads)]

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def save(self, path):
    storage.write_atomic(storage.location(path), self.proto)


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, encoded and decoded by the `tokenizers` library."""

  file_name = "tokenizer.json"

  def __init__(self, text: bytes, source: str = "tokenizer.json"):
    import tokenizers

    self.proto = text
    try:
      self.tk = tokenizers.Tokenizer.from_str(text.decode("utf-8"))
    except Exception as e:  # the library raises its own Exception subclass
      raise DataError(f"tokenizer {source}: not a Hugging Face tokenizer.json: {e}") from None
    vocab = self.tk.get_vocab(with_added_tokens=True)
    found = next((name for name in END_OF_TEXT if name in vocab), None)
    if found is None:
      raise DataError(
        f"tokenizer {source}: no end-of-text token (looked for {', '.join(END_OF_TEXT)})"
      )
    self.eos_id = vocab[found]
    self.vocab_size = max(vocab.values()) + 1
    self.fingerprint = hashlib.sha256(text).hexdigest()[:16]

  def encode(self, texts: list[str], threads: int = 0) -> list[np.ndarray]:
    found = self.tk.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in found]

  def decode(self, ids) -> str:
    return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

  def save(self, path):
    storage.write_atomic(storage.location(path), self.proto)


def load(path) -> Tokenizer | HFTokenizer:
  """A sentencepiece `.model` or a `tokenizer.json`, from a local path or a gs:// URL."""
  path = storage.location(path)
  try:
    proto = path.read_bytes()
  except Exception as e:  # OSError locally; gcsfs's HTTP errors for gs://
    raise DataError(f"tokenizer {path}: cannot read: {e}") from None
  if path.name.endswith(".json"):
    return HFTokenizer(proto, str(path))
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
