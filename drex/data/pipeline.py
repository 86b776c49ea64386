"""grain pipelines: records -> tiles + chat-formatted token ids -> fixed-shape batches.

Train batch (left-padded to seq_len):
  pixel_values [B, tiles, S, S, 3] float32, input_ids [B, L] int32, attention_mask [B, L] int32,
  loss_mask [B, L] int32 (1 on answer + separator tokens)
Eval batch (prompt only, left-padded to prompt_len): pixel_values, input_ids, attention_mask,
  plus `valid` [B] (0 for padding rows of the last batch). Golds and group ids stay on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from drex.data import images as images_lib
from drex.data import prompts
from drex.data import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  tile_size: int  # pixels per tile side
  max_tiles: int = 1  # tiles per image including the thumbnail
  min_tiles: int = 1
  use_thumbnail: bool = True


class Encoder:
  """Turns a record {'image', 'has_image', 'question', 'answer'} into model inputs."""

  def __init__(self, tokenizer: tok_lib.Tokenizer, template: prompts.ChatTemplate, image: ImageSpec,
               tokens_per_tile: int):
    self.tokenizer = tokenizer
    self.template = template
    self.image = image
    self.tokens_per_tile = tokens_per_tile
    self.pad_id = _optional_id(tokenizer, tok_lib.PAD)  # masked out anyway; any valid id works
    self.eos_id = tokenizer.token_id(template.sep)

  def pixels(self, image: Any) -> tuple[np.ndarray, int]:
    """uint8 [H, W, 3] or PIL image or None -> ([max_tiles, S, S, 3] float32, tiles used)."""
    spec = self.image
    out = np.zeros((spec.max_tiles, spec.tile_size, spec.tile_size, 3), np.float32)
    if image is None:
      return out, 0
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    max_grid = spec.max_tiles - 1 if spec.use_thumbnail and spec.max_tiles > 1 else spec.max_tiles
    tiles = images_lib.dynamic_tiles(img, spec.tile_size, spec.min_tiles, max_grid, spec.use_thumbnail)
    for i, tile in enumerate(tiles):
      out[i] = images_lib.normalize(tile)
    return out, len(tiles)

  @functools.lru_cache(maxsize=65536)
  def prompt_ids(self, question: str, num_tiles: int) -> list[int]:
    return self.tokenizer.encode(self.template.prompt(question, num_tiles * self.tokens_per_tile))

  @functools.lru_cache(maxsize=65536)
  def target_ids(self, answer: str) -> list[int]:
    return self.tokenizer.encode(self.template.target(answer))

  def _parts(self, record: dict) -> tuple[np.ndarray, list[int], str]:
    image = record["image"] if record.get("has_image", True) else None
    pixels, tiles = self.pixels(image)
    return pixels, self.prompt_ids(_text(record["question"]), tiles), _text(record["answer"])

  def train_example(self, record: dict, seq_len: int) -> dict[str, np.ndarray]:
    pixels, prompt, answer = self._parts(record)
    target = self.target_ids(answer)
    ids = prompt + target
    if len(ids) > seq_len:
      raise ValueError(f"example of {len(ids)} tokens does not fit seq_len={seq_len}; raise data.seq_len")
    pad = seq_len - len(ids)
    return {"pixel_values": pixels,
            "input_ids": np.array([self.pad_id] * pad + ids, np.int32),
            "attention_mask": np.array([0] * pad + [1] * len(ids), np.int32),
            "loss_mask": np.array([0] * (pad + len(prompt)) + [1] * len(target), np.int32)}

  def eval_example(self, record: dict, prompt_len: int) -> dict[str, np.ndarray]:
    pixels, prompt, _ = self._parts(record)
    if len(prompt) > prompt_len:
      raise ValueError(f"prompt of {len(prompt)} tokens does not fit prompt_len={prompt_len}; raise data.seq_len")
    pad = prompt_len - len(prompt)
    return {"pixel_values": pixels, "input_ids": np.array([self.pad_id] * pad + prompt, np.int32),
            "attention_mask": np.array([0] * pad + [1] * len(prompt), np.int32), "valid": np.int32(1)}

  def lengths(self, source) -> tuple[int, int]:
    """(longest prompt, longest prompt + target) in tokens over a source."""
    prompt_max = total_max = 0
    for i in range(len(source)):
      _, prompt, answer = self._parts(source[i])
      prompt_max = max(prompt_max, len(prompt))
      total_max = max(total_max, len(prompt) + len(self.target_ids(answer)))
    return prompt_max, total_max

  def decode_answer(self, ids: Sequence[int]) -> str:
    ids = list(ids)
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tokenizer.decode(ids).strip()


def _optional_id(tokenizer: tok_lib.Tokenizer, token: str) -> int:
  try:
    return tokenizer.token_id(token)
  except ValueError:
    return 0


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def train_batches(sources: Sequence, encoder: Encoder, seq_len: int, batch_size: int, seed: int,
                  weights: Sequence[float] | None = None, shard_index: int = 0, shard_count: int = 1,
                  workers: int = 0) -> grain.DatasetIterator:
  """An endless, shuffled, checkpointable iterator of train batches over one or several sources.

  Each process reads its own shard (`shard_index` of `shard_count`) and yields batch_size rows;
  `workers` > 0 formats batches in that many grain worker processes.
  """
  datasets = [grain.MapDataset.source(src)[shard_index::shard_count].seed(seed + i).shuffle().repeat()
              for i, src in enumerate(sources)]
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  ds = ds.map(functools.partial(_train_example, encoder, seq_len)).batch(batch_size, drop_remainder=True)
  if workers:
    return iter(ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
  return iter(ds)


def _train_example(encoder: Encoder, seq_len: int, record: dict) -> dict[str, np.ndarray]:
  return encoder.train_example(record, seq_len)


def eval_batches(source, encoder: Encoder, prompt_len: int, batch_size: int, start: int = 0,
                 stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape prompt batches over records [start, stop) of a source (all by default); the last
  batch is padded with copies of its first row, marked valid=0."""
  ds = grain.MapDataset.source(source)[start:stop]
  for batch in ds.map(lambda r: encoder.eval_example(r, prompt_len)).batch(batch_size, drop_remainder=False):
    n = len(batch["valid"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, 0)]) for k, v in batch.items()}
      batch["valid"][n:] = 0
    yield batch
