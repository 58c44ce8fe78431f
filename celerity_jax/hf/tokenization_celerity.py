"""The run's sentencepiece tokenizer for Hugging Face `transformers`, shipped inside every export:
`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)` encodes and decodes exactly as
celerity_jax did in training (sentencepiece itself does the work). Without trust_remote_code,
transformers falls back to its own LlamaTokenizer converted from the same tokenizer.model, which
agrees except on text that starts with spaces.

Every document in training followed the end-of-document token "</s>", so encoding puts it first
(it is this tokenizer's bos_token); generation ends at the next one. This file imports only
sentencepiece and transformers.
"""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class CelerityTokenizer(PreTrainedTokenizer):
  vocab_files_names = {"vocab_file": "tokenizer.model"}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(
    self,
    vocab_file,
    bos_token="</s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    add_bos_token=True,
    **kwargs,
  ):
    self.vocab_file, self.add_bos_token = vocab_file, add_bos_token
    self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
    super().__init__(
      bos_token=bos_token,
      eos_token=eos_token,
      unk_token=unk_token,
      pad_token=pad_token,
      add_bos_token=add_bos_token,
      **kwargs,
    )

  @property
  def vocab_size(self) -> int:
    return self.sp_model.get_piece_size()

  def get_vocab(self):
    vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
    vocab.update(self.added_tokens_encoder)
    return vocab

  def _tokenize(self, text, **kwargs):
    return self.sp_model.encode(text, out_type=str)

  def _convert_token_to_id(self, token):
    return self.sp_model.piece_to_id(token)

  def _convert_id_to_token(self, index):
    return self.sp_model.id_to_piece(index)

  def convert_tokens_to_string(self, tokens):
    """Text pieces through sentencepiece; special tokens as their own text ("</s>"), as every
    Hugging Face tokenizer decodes them unless told to skip them (sentencepiece would drop them,
    and lm-eval would then take every text for one that already starts with the boundary)."""
    special, out, run = set(self.all_special_tokens), [], []
    for token in tokens:
      if token in special:
        out += [self.sp_model.decode_pieces(run), token]
        run = []
      else:
        run.append(token)
    return "".join(out) + self.sp_model.decode_pieces(run)

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    bos = [self.bos_token_id] if self.add_bos_token else []
    ids = bos + token_ids_0
    return ids if token_ids_1 is None else ids + bos + token_ids_1

  def get_special_tokens_mask(
    self, token_ids_0, token_ids_1=None, already_has_special_tokens=False
  ):
    if already_has_special_tokens:
      return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
    bos = [1] if self.add_bos_token else []
    mask = bos + [0] * len(token_ids_0)
    return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1)

  def save_vocabulary(self, save_directory, filename_prefix=None):
    out = os.path.join(
      save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
    )
    if os.path.abspath(self.vocab_file) != os.path.abspath(out):
      shutil.copyfile(self.vocab_file, out)
    return (out,)
