"""Tokenizers: HF `tokenizers` (tokenizer.json) for the tiny base and transformers-style checkpoints,
sentencepiece (tokenizer.model) for the original InternLM2 / Phi-3 checkpoints.

`Tokenizer` is the one interface the pipeline uses: encode / decode / token ids of the special tokens.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)


class Tokenizer:
  """Text <-> ids. Wraps a HF `tokenizers.Tokenizer` or a sentencepiece processor."""

  def __init__(self, backend, kind: str):
    self._backend = backend
    self.kind = kind  # 'hf' | 'sentencepiece'

  # -- construction
  @classmethod
  def load(cls, directory: str) -> "Tokenizer":
    """tokenizer.json (preferred) or tokenizer.model from a checkpoint directory."""
    json_path, sp_path = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer.model")
    if os.path.exists(json_path):
      return cls(tokenizers.Tokenizer.from_file(json_path), "hf")
    if os.path.exists(sp_path):
      import sentencepiece  # pylint: disable=g-import-not-at-top
      return cls(sentencepiece.SentencePieceProcessor(model_file=sp_path), "sentencepiece")
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {directory}; copy the checkpoint's tokenizer files there")

  def save(self, directory: str) -> None:
    if self.kind != "hf":
      raise ValueError("only HF tokenizers are saved by drex; copy tokenizer.model next to the checkpoint instead")
    self._backend.save(os.path.join(directory, "tokenizer.json"))

  # -- use
  def encode(self, text: str) -> list[int]:
    if self.kind == "hf":
      return self._backend.encode(text, add_special_tokens=False).ids
    return self._backend.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._backend.decode(list(ids), skip_special_tokens=True) if self.kind == "hf" else self._backend.decode(
        [i for i in ids if not self._backend.IsControl(i)])

  def token_id(self, token: str) -> int:
    index = self._backend.token_to_id(token) if self.kind == "hf" else self._backend.piece_to_id(token)
    if index is None or (self.kind == "sentencepiece" and index == self._backend.unk_id() and token != UNK):
      raise ValueError(f"the tokenizer has no token {token!r}; is this an InternVL-2 tokenizer?")
    return int(index)

  @property
  def vocab_size(self) -> int:
    return self._backend.get_vocab_size() if self.kind == "hf" else self._backend.get_piece_size()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """A small byte-fallback-free BPE (Metaspace, sentencepiece-like) trained on the task corpus."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return Tokenizer(tok, "hf")
