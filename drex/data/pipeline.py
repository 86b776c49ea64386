"""grain pipelines: records -> tiles + chat-formatted token ids -> fixed-shape batches.

Train batch (left-padded to seq_len):
  pixel_values [B, tiles, S, S, 3] float32, input_ids [B, L] int32, attention_mask [B, L] int32,
  loss_mask [B, L] int32 (1 on answer + separator tokens)
Eval batch (prompt only, left-padded to prompt_len): pixel_values, input_ids, attention_mask,
  plus `valid` [B] (0 for padding rows of the last batch) and `index` [B] (record index). Golds
  and group ids stay on the host.

Batches are global (identical for any number of hosts); each process builds only its own rows.
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
            "attention_mask": np.array([0] * pad + [1] * len(prompt), np.int32)}

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


def train_batches(sources: Sequence, encoder: Encoder, seq_len: int, global_batch: int, seed: int,
                  weights: Sequence[float] | None = None, process_index: int = 0, process_count: int = 1,
                  workers: int = 0) -> grain.DatasetIterator:
  """An endless, shuffled, checkpointable iterator of this process's rows of the global batches.

  The global order (sources mixed, each shuffled and repeated) is the same for every process count;
  global batch k is examples [k*B, (k+1)*B) of it and process i reads rows [i*B/P, (i+1)*B/P) of
  each, so a run on P hosts sees exactly the batches of a run on one. `workers` > 0 formats batches
  in that many grain worker processes.
  """
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  datasets = [grain.MapDataset.source(src).seed(seed + i).shuffle().repeat() for i, src in enumerate(sources)]
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  ds = ds.map(functools.partial(_train_example, encoder, seq_len))
  rows = _HostRows(ds, global_batch, process_index, process_count)
  host = grain.MapDataset.range(len(ds) // process_count).map(rows)
  host = host.batch(global_batch // process_count, drop_remainder=True)
  if workers:
    return iter(host.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
  return iter(host)


class _HostRows:
  """Row j of process i -> element (j // b) * B + i * b + j % b of the global order (b = B / P)."""

  def __init__(self, ds, global_batch: int, process_index: int, process_count: int):
    self.ds, self.global_batch = ds, global_batch
    self.process_index, self.local = process_index, global_batch // process_count

  def __call__(self, j: int):
    return self.ds[(j // self.local) * self.global_batch + self.process_index * self.local + j % self.local]


def _train_example(encoder: Encoder, seq_len: int, record: dict) -> dict[str, np.ndarray]:
  return encoder.train_example(record, seq_len)


def eval_batches(source, encoder: Encoder, prompt_len: int, global_batch: int, size: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of fixed-shape global prompt batches over the first `size` records.

  Global batch k covers records [k*B, (k+1)*B); process i gets rows [i*B/P, (i+1)*B/P) of it.
  Rows past the end repeat record 0 with valid=0. Each row carries its record `index`.
  """
  if global_batch % process_count:
    raise ValueError(f"eval batch {global_batch} is not divisible by {process_count} processes")
  size = len(source) if size is None else min(size, len(source))
  local = global_batch // process_count
  num_batches = -(-size // global_batch)
  index = np.array([k * global_batch + process_index * local + j for k in range(num_batches) for j in range(local)])
  ds = grain.MapDataset.source(source)
  rows = grain.MapDataset.range(len(index)).map(
      lambda j: {**encoder.eval_example(ds[int(index[j]) if index[j] < size else 0], prompt_len),
                 "valid": np.int32(index[j] < size), "index": np.int64(index[j])})
  yield from rows.batch(local, drop_remainder=False)
