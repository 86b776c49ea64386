"""grain pipelines: records (drex.data.record) -> tiles + chat-formatted token ids -> fixed-shape batches.

Train batch (left-padded to seq_len):
  pixel_values [B, tiles, S, S, 3] float32, input_ids [B, L] int32, attention_mask [B, L] int32,
  loss_mask [B, L] int32 (1 on every assistant answer + separator token), skipped [B] int32 (records
  passed over to make the row because their images could not be decoded; counted, never trained on)
Eval batch (prompt only, left-padded to prompt_len): pixel_values, input_ids, attention_mask,
  plus `valid` [B] (0 for padding rows of the last batch and for records whose image cannot be
  decoded) and `index` [B] (record index). Golds and group ids stay on the host.

Batches are global (identical for any number of hosts); each process builds only its own rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from drex.data import images as images_lib
from drex.data import prompts
from drex.data import record as record_lib
from drex.data import tokenizer as tok_lib

log = logging.getLogger(__name__)

# A row whose record cannot be decoded is made from the next record instead; this many in a row is a
# dataset problem, not a stray file.
MAX_CONSECUTIVE_SKIPS = 64


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  tile_size: int  # pixels per tile side
  max_tiles: int = 1  # tiles per example including the thumbnail(s)
  min_tiles: int = 1
  use_thumbnail: bool = True


@dataclasses.dataclass(frozen=True)
class Scan:
  """What `Encoder.scan` learns about a source without decoding its images."""

  prompt: np.ndarray  # [N] tokens before the last answer of each record (-1: its images cannot be read)
  total: np.ndarray  # [N] tokens of the whole conversation (-1: unreadable)
  reasons: dict[int, str]  # record index -> why its images cannot be read

  @property
  def prompt_max(self) -> int:
    return int(self.prompt.max(initial=0))

  @property
  def total_max(self) -> int:
    return int(self.total.max(initial=0))


class Encoder:
  """Turns a record (drex.data.record) into model inputs: image tiles and chat-formatted token ids."""

  def __init__(self, tokenizer: tok_lib.Tokenizer, template: prompts.ChatTemplate, image: ImageSpec,
               tokens_per_tile: int):
    self.tokenizer = tokenizer
    self.template = template
    self.image = image
    self.tokens_per_tile = tokens_per_tile
    self.pad_id = _optional_id(tokenizer, tok_lib.PAD)  # masked out anyway; any valid id works
    self.eos_id = tokenizer.token_id(template.sep)

  # -- images
  def grid_budget(self, num_images: int) -> int:
    """Most grid tiles per image when a record has `num_images` images: the tile slots (max_tiles,
    thumbnails included) are shared equally; an image cut into several tiles also gets a thumbnail."""
    spec = self.image
    share = spec.max_tiles // max(num_images, 1)
    if share < 1:
      raise images_lib.ImageError(f"a record with {num_images} images does not fit {spec.max_tiles} tile slots; "
                                  f"raise the source's max_tiles (config.sources.<name>.max_tiles or "
                                  f"data.max_tiles)")
    if num_images <= 1:
      return spec.max_tiles - 1 if spec.use_thumbnail and spec.max_tiles > 1 else spec.max_tiles
    return share - 1 if spec.use_thumbnail and share > 2 else (share if not spec.use_thumbnail else 1)

  def tile_counts(self, record: dict) -> list[int]:
    """Tiles of each image of a record, from the image sizes alone (no decoding)."""
    spec, budget = self.image, self.grid_budget(len(record["images"]))
    return [images_lib.tile_count(*images_lib.image_size(img), spec.tile_size, spec.min_tiles, budget,
                                  spec.use_thumbnail) for img in record["images"]]

  def pixels(self, record_images: Sequence[Any], num_tiles: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Images -> ([num_tiles or max_tiles, S, S, 3] float32 tiles in order, zero padded; tiles per image)."""
    spec = self.image
    out = np.zeros((num_tiles or spec.max_tiles, spec.tile_size, spec.tile_size, 3), np.float32)
    budget = self.grid_budget(len(record_images))
    counts, k = [], 0
    for img in record_images:
      tiles = images_lib.dynamic_tiles(images_lib.load_image(img), spec.tile_size, spec.min_tiles, budget,
                                       spec.use_thumbnail)
      for tile in tiles:
        out[k] = images_lib.normalize(tile)
        k += 1
      counts.append(len(tiles))
    return out, counts

  # -- text
  @functools.lru_cache(maxsize=65536)
  def _ids(self, text: str) -> tuple[int, ...]:
    return tuple(self.tokenizer.encode(text))

  def target_ids(self, answer: str) -> list[int]:
    return list(self._ids(self.template.target(answer)))

  def segments(self, record: dict, tile_counts: Sequence[int]) -> list[tuple[tuple[int, ...], bool]]:
    """(token ids, is an answer) pieces of the whole conversation, in order."""
    turns = [list(t) for t in record["turns"]]
    blocks = [prompts.image_block(n * self.tokens_per_tile) for n in tile_counts]
    placeholders = sum(u.count(record_lib.IMAGE_PLACEHOLDER) for u, _ in turns)
    if placeholders == 0 and blocks:
      lead = ("<image>\n" if len(blocks) == 1 else
              "".join(f"Image-{i + 1}: <image>\n" for i in range(len(blocks))))
      turns[0][0] = lead + turns[0][0]
    elif placeholders != len(blocks):
      raise ValueError(f"a record has {placeholders} {record_lib.IMAGE_PLACEHOLDER} placeholders for "
                       f"{len(blocks)} images")
    pending = iter(blocks)
    out = []
    for i, (user, answer) in enumerate(turns):
      parts = user.split(record_lib.IMAGE_PLACEHOLDER)
      content = parts[0] + "".join(next(pending) + part for part in parts[1:])
      out.append((self._ids(self.template.user_turn(content, first=i == 0)), False))
      out.append((self._ids(self.template.target(answer)), True))
    return out

  # -- examples
  def train_example(self, record: dict, seq_len: int, num_tiles: int | None = None) -> dict[str, np.ndarray]:
    pixels, counts = self.pixels(record["images"], num_tiles)
    ids, loss = [], []
    for piece, is_answer in self.segments(record, counts):
      ids += piece
      loss += [int(is_answer)] * len(piece)
    if len(ids) > seq_len:
      raise ValueError(f"example of {len(ids)} tokens does not fit seq_len={seq_len}; raise data.seq_len")
    pad = seq_len - len(ids)
    return {"pixel_values": pixels,
            "input_ids": np.array([self.pad_id] * pad + ids, np.int32),
            "attention_mask": np.array([0] * pad + [1] * len(ids), np.int32),
            "loss_mask": np.array([0] * pad + loss, np.int32)}

  def prompt_ids(self, record: dict, tile_counts: Sequence[int]) -> list[int]:
    """Everything before the last answer: earlier turns with their answers, then the last question."""
    pieces = self.segments(record, tile_counts)[:-1]
    return [i for piece, _ in pieces for i in piece]

  def eval_example(self, record: dict, prompt_len: int, num_tiles: int | None = None) -> dict[str, np.ndarray]:
    pixels, counts = self.pixels(record["images"], num_tiles)
    prompt = self.prompt_ids(record, counts)
    if len(prompt) > prompt_len:
      raise ValueError(f"prompt of {len(prompt)} tokens does not fit prompt_len={prompt_len} (prompt lengths are "
                       f"measured on the data: this record was not among those measured)")
    ids, mask = self.left_pad(prompt, prompt_len)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}

  def left_pad(self, prompt: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [length] (the prompt left-padded with pad_id) and its attention_mask [length]."""
    pad = length - len(prompt)
    return np.array([self.pad_id] * pad + list(prompt), np.int32), np.array([0] * pad + [1] * len(prompt), np.int32)

  def lengths(self, record: dict) -> tuple[int, int]:
    """(prompt, prompt + answers) in tokens, from the image sizes alone."""
    pieces = self.segments(record, self.tile_counts(record))
    total = sum(len(p) for p, _ in pieces)
    return total - len(pieces[-1][0]), total

  def scan(self, source: Sequence[dict]) -> Scan:
    """Every record's prompt and total length, and which records' images cannot be read (no decoding)."""
    prompt, total = np.full(len(source), -1, np.int64), np.full(len(source), -1, np.int64)
    reasons = {}
    for i in range(len(source)):
      try:
        prompt[i], total[i] = self.lengths(source[i])
      except images_lib.ImageError as e:
        reasons[i] = str(e)
    return Scan(prompt, total, reasons)

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


# How far a training iterator (and each of its grain workers) formats batches ahead of the step: one thread, four
# batches. grain's default (16 threads, 500 elements ahead; an element here is a whole batch) formatted hundreds of
# batches a stage never used, competing with the train step for the CPU (the main job: 10% of its wall time), and
# at InternVL sizes a batch is ~270 MB (16 examples x 7 tiles of 448 px, float32).
TRAIN_READ_AHEAD = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def train_batches(sources: Sequence[Sequence[dict]], encoders: Encoder | Sequence[Encoder], seq_len: int,
                  global_batch: int, seed: int, weights: Sequence[float] | None = None, process_index: int = 0,
                  process_count: int = 1, workers: int = 0) -> grain.DatasetIterator:
  """An endless, shuffled, checkpointable iterator of this process's rows of the global batches.

  The global order (sources mixed, each shuffled and repeated) is the same for every process count;
  global batch k is examples [k*B, (k+1)*B) of it and process i reads rows [i*B/P, (i+1)*B/P) of
  each, so a run on P hosts sees exactly the batches of a run on one. Source i's records are encoded
  by encoders[i] (one encoder for all if a single one is given); tiles are zero-padded to the largest
  max_tiles. A record whose images cannot be decoded is replaced by the next one of the global order
  and counted in the row's `skipped`. `workers` > 0 formats batches in that many grain worker processes.
  """
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  encoders = [encoders] * len(sources) if isinstance(encoders, Encoder) else list(encoders)
  datasets = [grain.MapDataset.source(src).seed(seed + i).shuffle().repeat().map(functools.partial(_tagged, i))
              for i, src in enumerate(sources)]
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  num_tiles = max(e.image.max_tiles for e in encoders)
  rows = _HostRows(ds, encoders, seq_len, num_tiles, global_batch, process_index, process_count)
  host = grain.MapDataset.range(len(ds) // process_count).map(rows)
  host = host.batch(global_batch // process_count, drop_remainder=True)
  host = host.to_iter_dataset(TRAIN_READ_AHEAD)
  if workers:
    host = host.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(host)


def _tagged(source_index: int, record: dict) -> tuple[int, dict]:
  return source_index, record


class _HostRows:
  """Row j of process i -> element (j // b) * B + i * b + j % b of the global order (b = B / P), encoded."""

  def __init__(self, ds, encoders: list[Encoder], seq_len: int, num_tiles: int, global_batch: int,
               process_index: int, process_count: int):
    self.ds, self.encoders, self.seq_len, self.num_tiles = ds, encoders, seq_len, num_tiles
    self.global_batch, self.process_index, self.local = global_batch, process_index, global_batch // process_count

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    index = (j // self.local) * self.global_batch + self.process_index * self.local + j % self.local
    for skipped in range(MAX_CONSECUTIVE_SKIPS):
      source, record = self.ds[index + skipped]
      try:
        example = self.encoders[source].train_example(record, self.seq_len, self.num_tiles)
      except images_lib.ImageError as e:
        log.warning("skipping a training record: %s", e)
        continue
      return {**example, "skipped": np.int32(skipped)}
    raise images_lib.ImageError(f"{MAX_CONSECUTIVE_SKIPS} training records in a row have unreadable images; "
                                f"check the dataset's image files")


def eval_batches(source, encoder: Encoder, prompt_len: int, global_batch: int, size: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of fixed-shape global prompt batches over the first `size` records.

  Global batch k covers records [k*B, (k+1)*B); process i gets rows [i*B/P, (i+1)*B/P) of it.
  Rows past the end repeat record 0 with valid=0, as do records whose images cannot be decoded
  (Evaluator leaves them out of the score and counts them). Each row carries its record `index`.
  """
  if global_batch % process_count:
    raise ValueError(f"eval batch {global_batch} is not divisible by {process_count} processes")
  size = len(source) if size is None else min(size, len(source))
  local = global_batch // process_count
  num_batches = -(-size // global_batch)
  index = np.array([k * global_batch + process_index * local + j for k in range(num_batches) for j in range(local)])
  ds = grain.MapDataset.source(source)

  def row(j: int) -> dict[str, np.ndarray]:
    i = int(index[j])
    if i < size:
      try:
        return {**encoder.eval_example(ds[i], prompt_len), "valid": np.int32(1), "index": np.int64(i)}
      except images_lib.ImageError as e:
        log.warning("leaving an evaluation record out: %s", e)
    try:  # padding (or an unreadable record): record 0, never scored
      filler = encoder.eval_example(ds[0], prompt_len)
    except images_lib.ImageError:
      filler = encoder.eval_example(_blank(ds[0]), prompt_len)
    return {**filler, "valid": np.int32(0), "index": np.int64(i)}

  yield from grain.MapDataset.range(len(index)).map(row).batch(local, drop_remainder=False)


def _blank(record: dict) -> dict:
  """A record's shape without its images: the filler of padding rows (never scored)."""
  return {**record, "images": [], "turns": [(u.replace(record_lib.IMAGE_PLACEHOLDER, ""), a)
                                            for u, a in record["turns"]]}
