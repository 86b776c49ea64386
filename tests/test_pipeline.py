"""Records -> model inputs: multi-turn loss masks, several images per record, unreadable images skipped
and counted, per-source tiling in mixed batches, lengths known before decoding."""

import io

import numpy as np
import pytest
from PIL import Image

from drex.base import tiny_tokenizer
from drex.data import images, pipeline, prompts, record
from drex.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer(384)


def _encoder(tokenizer, max_tiles=1, tile=32):
  return pipeline.Encoder(tokenizer, prompts.get_template("tiny"), pipeline.ImageSpec(tile, max_tiles), 16)


def _png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (width, height), colour).save(buf, "PNG")
  return buf.getvalue()


def _truncated_png() -> bytes:
  full = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(full, "PNG")
  return full.getvalue()[:200]  # the header reads, the pixels do not


def test_one_turn_prompt_is_the_template_prompt(tokenizer):
  """The record path reproduces the one-question prompt exactly (the embedded results depend on it)."""
  enc = _encoder(tokenizer)
  rec = record.make([("what colour is the shape ?", "red")], [np.zeros((32, 32, 3), np.uint8)])
  assert enc.prompt_ids(rec, [1]) == tokenizer.encode(prompts.get_template("tiny").prompt(
      "what colour is the shape ?", 16))
  text_only = record.make([("one plus two ?", "3")])
  assert enc.prompt_ids(text_only, []) == tokenizer.encode(prompts.get_template("tiny").prompt("one plus two ?", 0))


def test_multi_turn_trains_every_answer_and_evaluates_the_last(tokenizer):
  enc = _encoder(tokenizer)
  rec = record.make([("what colour is the shape ?", "red"), ("what kind of shape is it ?", "circle")],
                    [np.zeros((32, 32, 3), np.uint8)])
  ex = enc.train_example(rec, 96)
  ids, loss = ex["input_ids"], ex["loss_mask"].astype(bool)
  answers = enc.target_ids("red") + enc.target_ids("circle")
  assert list(ids[loss]) == answers
  prompt = enc.prompt_ids(rec, [1])  # first turn with its answer, then the second question
  assert enc.decode_answer(enc.target_ids("red")) == "red"
  assert list(ids[ex["attention_mask"].astype(bool)])[:len(prompt)] == prompt
  assert prompt[-len(enc.target_ids("circle")):] != enc.target_ids("circle")
  assert tokenizer.decode(prompt).count("red") == 1


def test_several_images_with_and_without_placeholders(tokenizer):
  enc = _encoder(tokenizer, max_tiles=4)
  red, blue = np.full((32, 32, 3), (255, 0, 0), np.uint8), np.full((32, 32, 3), (0, 0, 255), np.uint8)
  context = tokenizer.token_id(tok_lib.IMG_CONTEXT)
  placed = record.make([("compare <image> with <image> .", "same")], [red, blue])
  leading = record.make([("compare them .", "same")], [red, blue])
  for rec in (placed, leading):
    ex = enc.eval_example(rec, 128)
    assert (ex["input_ids"] == context).sum() == 32  # 2 images x 1 tile x 16 tokens
    assert ex["pixel_values"][0, ..., 0].mean() > ex["pixel_values"][1, ..., 0].mean()  # red first, then blue
    assert (ex["pixel_values"][2:] == 0).all()
  block = prompts.image_block(16)
  expected = prompts.get_template("tiny").user_turn(f"Image-1: {block}\nImage-2: {block}\ncompare them .")
  assert enc.prompt_ids(leading, [1, 1]) == tokenizer.encode(expected)  # InternVL's multi-image prompt
  with pytest.raises(ValueError, match="1 <image> placeholders for 2 images"):
    enc.eval_example(record.make([("look at <image> .", "x")], [red, blue]), 128)


def test_tile_budget_is_shared_between_images(tokenizer):
  enc = _encoder(tokenizer, max_tiles=7)
  wide = _png(128, 32)  # 4 x 1 grid
  assert enc.tile_counts(record.make([("q", "a")], [wide])) == [5]  # 4 tiles + thumbnail
  assert enc.tile_counts(record.make([("q", "a")], [wide, wide])) == [3, 3]  # 2 + thumbnail each, 6 <= 7 slots
  pixels, counts = enc.pixels([wide, wide])
  assert counts == [3, 3] and pixels.shape[0] == 7 and (pixels[6] == 0).all()
  with pytest.raises(images.ImageError, match="8 images does not fit 7 tile slots"):
    enc.tile_counts(record.make([("q", "a")], [wide] * 8))


def test_scan_lengths_equal_the_encoded_lengths_and_find_unreadable_images(tokenizer):
  enc = _encoder(tokenizer, max_tiles=5)
  recs = [record.make([("what is it ?", "red")], [_png(96, 40)]),
          record.make([("what is it ?", "red")], [b"not an image"]),
          record.make([("one plus two ?", "three"), ("and two plus two ?", "four")])]
  scan = enc.scan(recs)
  assert set(scan.reasons) == {1} and "cannot" in scan.reasons[1].lower()
  for i in (0, 2):
    ex = enc.train_example(recs[i], 200)
    assert scan.total[i] == ex["attention_mask"].sum()
    assert scan.prompt[i] == len(enc.prompt_ids(recs[i], enc.tile_counts(recs[i])))
  assert scan.total[1] == -1 and scan.total_max == max(scan.total[0], scan.total[2])


def test_unreadable_training_images_are_skipped_and_counted(tokenizer):
  enc = _encoder(tokenizer)
  good = [record.make([("what is it ?", f"w{i}")], [_png(32, 32)]) for i in range(6)]
  bad = record.make([("what is it ?", "bad")], [_truncated_png()])
  batches = pipeline.train_batches([good[:3] + [bad] + good[3:]], enc, 64, 7, seed=0)
  batch = next(batches)
  assert batch["skipped"].sum() == 1  # one row was made from the record after the unreadable one
  answers = {enc.decode_answer(row[mask.astype(bool)]) for row, mask in zip(batch["input_ids"], batch["loss_mask"])}
  assert "bad" not in answers


def test_unreadable_evaluation_images_are_not_scored(tokenizer):
  enc = _encoder(tokenizer)
  recs = [record.make([("q", "a")], [_png(32, 32)]), record.make([("q", "b")], [_truncated_png()]),
          record.make([("q", "c")], [_png(32, 32)])]
  (batch,) = list(pipeline.eval_batches(recs, enc, 40, 4))
  assert list(batch["valid"]) == [1, 0, 1, 0] and list(batch["index"]) == [0, 1, 2, 3]


def test_mixed_sources_keep_their_own_tiling(tokenizer):
  one_tile, four_tiles = _encoder(tokenizer, max_tiles=1), _encoder(tokenizer, max_tiles=5)
  wide = [record.make([("q", "a")], [_png(128, 32)])] * 4
  batches = pipeline.train_batches([wide, wide], [one_tile, four_tiles], 120, 8, seed=1, weights=[1.0, 1.0])
  batch = next(batches)
  context = tokenizer.token_id(tok_lib.IMG_CONTEXT)
  assert batch["pixel_values"].shape[1] == 5  # padded to the larger source's tiles
  assert sorted(set((batch["input_ids"] == context).sum(1).tolist())) == [16, 80]  # 1 tile and 4 + thumbnail
