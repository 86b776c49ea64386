"""Tokenizers: HF `tokenizers` (tokenizer.json) for the tiny base and transformers-style checkpoints,
sentencepiece (tokenizer.model) for the original InternLM2 / Phi-3 checkpoints.

`Tokenizer` is the one interface the pipeline uses: encode / decode / token ids of the special tokens.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

from etils import epath
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from drex.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)


class Tokenizer:
  """Text <-> ids. Wraps a HF `tokenizers.Tokenizer` or a sentencepiece processor.

  The sentencepiece path behaves like the slow HF tokenizers of InternLM2 / Phi-3 (`tokenizer.model`):
  the text is split on the added tokens (`<|im_start|>`, `<img>`, `<IMG_CONTEXT>`, ... from
  `tokenizer_config.json` / `added_tokens.json`) and on the control pieces (`<s>`, `</s>`, `<unk>`);
  those map straight to their ids and every other segment is encoded by sentencepiece on its own.
  """

  def __init__(self, backend, kind: str, added_tokens: dict[str, int] | None = None,
               special_ids: Iterable[int] = ()):
    self._backend = backend
    self.kind = kind  # 'hf' | 'sentencepiece'
    self.added_tokens = dict(added_tokens or {})  # sentencepiece: content -> id, outside the sp model
    if kind == "sentencepiece":
      for i in range(backend.get_piece_size()):  # <s>, </s>, <unk>: matched in text like added tokens
        if backend.IsControl(i) or backend.IsUnknown(i):
          self.added_tokens.setdefault(backend.id_to_piece(i), i)
      self._special_ids = {i for i in range(backend.get_piece_size()) if backend.IsControl(i)} | set(special_ids)
      self._id_to_added = {i: t for t, i in self.added_tokens.items()}
      tokens = sorted(self.added_tokens, key=len, reverse=True)
      self._split = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None

  # -- construction
  @classmethod
  def load(cls, directory: str) -> "Tokenizer":
    """tokenizer.json (preferred) or tokenizer.model (+ its added tokens) from a checkpoint directory."""
    folder = epath.Path(directory)
    if (folder / "tokenizer.json").exists():
      return cls(tokenizers.Tokenizer.from_str((folder / "tokenizer.json").read_text()), "hf")
    if (folder / "tokenizer.model").exists():
      import sentencepiece  # pylint: disable=g-import-not-at-top
      added, special = _added_tokens(directory)
      return cls(sentencepiece.SentencePieceProcessor(model_proto=(folder / "tokenizer.model").read_bytes()),
                 "sentencepiece", added, special)
    hint = ""
    if (folder / "vocab.json").exists():
      if _tokenizer_class(directory) == "Qwen2Tokenizer" and (folder / "merges.txt").exists():
        return cls(_qwen2_bpe(directory), "hf")
      hint = (" (this checkpoint has a slow vocab.json/merges.txt tokenizer: write tokenizer.json next to it with "
              "`transformers.AutoTokenizer.from_pretrained(DIR, trust_remote_code=True).save_pretrained(DIR)`)")
    raise UserError(f"no tokenizer.json or tokenizer.model in {directory}{hint}; copy the checkpoint's tokenizer "
                    f"files there")

  def save(self, directory: str) -> None:
    """Write the tokenizer so that `Tokenizer.load(directory)` gives the same one back."""
    folder = epath.Path(directory)
    if self.kind == "hf":
      (folder / "tokenizer.json").write_text(self._backend.to_str(pretty=True))
      return
    (folder / "tokenizer.model").write_bytes(self._backend.serialized_model_proto())
    sp = self._backend
    control = {t for t, i in self.added_tokens.items()
               if i < sp.get_piece_size() and (sp.IsControl(i) or sp.IsUnknown(i)) and sp.id_to_piece(i) == t}
    extra = {t: i for t, i in self.added_tokens.items() if t not in control}
    decoder = {str(i): {"content": t, "special": i in self._special_ids} for t, i in sorted(extra.items())}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}, indent=1,
                                                             ensure_ascii=False))

  # -- use
  def encode(self, text: str) -> list[int]:
    if self.kind == "hf":
      return self._backend.encode(text, add_special_tokens=False).ids
    if self._split is None:
      return self._backend.encode(text)
    ids: list[int] = []
    for i, part in enumerate(self._split.split(text)):
      if i % 2:
        ids.append(self.added_tokens[part])
      elif part:
        ids += self._backend.encode(part)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    if self.kind == "hf":
      return self._backend.decode(list(ids), skip_special_tokens=True)
    out, run = [], []
    for i in ids:
      i = int(i)
      if i in self._special_ids or i in self._id_to_added:
        if run:
          out.append(self._backend.decode(run))
          run = []
        if i not in self._special_ids:
          out.append(self._id_to_added[i])
      elif 0 <= i < self._backend.get_piece_size():
        run.append(i)
    if run:
      out.append(self._backend.decode(run))
    return "".join(out)

  def token_id(self, token: str) -> int:
    if self.kind == "hf":
      index = self._backend.token_to_id(token)
    elif token in self.added_tokens:
      index = self.added_tokens[token]
    else:
      index = self._backend.piece_to_id(token)
      if index == self._backend.unk_id() and token != UNK:
        index = None
    if index is None:
      raise ValueError(f"the tokenizer has no token {token!r}; is this an InternVL-2 tokenizer?")
    return int(index)

  @property
  def vocab_size(self) -> int:
    if self.kind == "hf":
      return self._backend.get_vocab_size()
    return max([self._backend.get_piece_size()] + [i + 1 for i in self.added_tokens.values()])


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer, byte-level BPE).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
               r"""\s+(?!\S)|\s+""")


def _tokenizer_class(directory: str) -> str | None:
  path = epath.Path(directory, "tokenizer_config.json")
  if not path.exists():
    return None
  return json.loads(path.read_text()).get("tokenizer_class")


def _qwen2_bpe(directory: str) -> tokenizers.Tokenizer:
  """The fast equivalent of a Qwen2Tokenizer saved as vocab.json + merges.txt (+ its added tokens)."""
  tok = tokenizers.Tokenizer(models.BPE.from_file(os.path.join(directory, "vocab.json"),
                                                  os.path.join(directory, "merges.txt")))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  added, special = _added_tokens(directory)
  for content, index in sorted(added.items(), key=lambda item: item[1]):
    if tok.token_to_id(content) is None:
      token = tokenizers.AddedToken(content, special=index in special, normalized=False)
      (tok.add_special_tokens if index in special else tok.add_tokens)([token])
    if tok.token_to_id(content) != index:
      raise ValueError(f"added token {content!r} should have id {index} but gets {tok.token_to_id(content)}; write "
                       f"tokenizer.json with transformers' AutoTokenizer(...).save_pretrained")
  return tok


def _added_tokens(directory: str) -> tuple[dict[str, int], set[int]]:
  """Added tokens of a slow HF tokenizer: tokenizer_config.json `added_tokens_decoder` and added_tokens.json."""
  added: dict[str, int] = {}
  special: set[int] = set()
  path = epath.Path(directory, "added_tokens.json")
  if path.exists():
    added.update({str(t): int(i) for t, i in json.loads(path.read_text()).items()})
  path = epath.Path(directory, "tokenizer_config.json")
  if path.exists():
    decoder = json.loads(path.read_text()).get("added_tokens_decoder", {}) or {}
    for i, entry in decoder.items():
      added[entry["content"]] = int(i)
      if entry.get("special"):
        special.add(int(i))
  return added, special


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """A small byte-fallback-free BPE (Metaspace, sentencepiece-like) trained on the task corpus."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return Tokenizer(tok, "hf")
