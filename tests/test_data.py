"""The task family, TFDS builder, grain pipeline, tokenizer, templates, tiling and metrics."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from drex.data import builder, images, pipeline, prompts, record, render, sources, tasks
from drex.data import tokenizer as tok_lib
from drex.base import shipped_path, tiny_tokenizer
from drex.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer(384)


@pytest.fixture(scope="module")
def encoder(tokenizer):
  return pipeline.Encoder(tokenizer, prompts.get_template("tiny"), pipeline.ImageSpec(32, 1), 16)


def test_tasks_are_deterministic_and_distinct():
  for name, task in tasks.TASKS.items():
    a = [ex for _, ex in tasks.examples(task, "train", size=5)]
    b = [ex for _, ex in tasks.examples(task, "train", size=5)]
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b], name
    assert all((e.image is not None) == task.has_image for e in a), name
    if task.has_image:
      assert all(e.image.shape == (32, 32, 3) and e.image.dtype == np.uint8 for e in a)
      np.testing.assert_array_equal(a[0].image, b[0].image)
    test = [ex for _, ex in tasks.examples(task, "test", size=5)]
    validation = [ex for _, ex in tasks.examples(task, "validation", size=5)]
    assert _differ(a, test) and _differ(a, validation) and _differ(validation, test), name


def _differ(xs, ys) -> bool:
  """Two draws of examples differ in a question, an answer or an image."""
  return [(e.question, e.answer) for e in xs] != [(e.question, e.answer) for e in ys] or any(
      x.image is not None and (x.image != y.image).any() for x, y in zip(xs, ys))


def test_validation_split_is_drawn_like_the_test_split():
  """Same size and the same grouping of circular multiple-choice rotations, other examples."""
  task = tasks.get("scene_mc")
  validation, test = list(tasks.examples(task, "validation")), list(tasks.examples(task, "test"))
  assert len(validation) == len(test) == task.test_size
  assert [g for g, _ in validation] == [g for g, _ in test]
  assert [e.question for _, e in validation] != [e.question for _, e in test]


def test_family_has_related_pairs_and_a_language_only_twin():
  assert len(tasks.SPECIALIZED) >= 6
  assert not tasks.get("text_add").has_image and tasks.get("digit_add").has_image
  assert not tasks.get("text_min").has_image and tasks.get("chart_min").has_image
  assert tasks.get("scene_mc").make_group is not None
  assert not tasks.get("echo").has_image and tasks.get("caption").has_image


def test_generic_tasks_share_the_question_and_conflict_in_answer_format():
  """The main stream's tasks: one question; inputs and answer vocabularies disjoint (kinds, sums, sides)."""
  answers = {}
  for name in ("generic_kind", "generic_add", "generic_min"):
    task = tasks.get(name)
    drawn = [ex for _, ex in tasks.examples(task, "train", size=200)]
    assert all(ex.question.endswith(tasks.GENERIC_QUESTION) for ex in drawn), name
    answers[name] = {ex.answer for ex in drawn}
  assert answers["generic_kind"] == set(render.SHAPES) and answers["generic_min"] == set(render.BAR_POSITIONS)
  assert answers["generic_add"] <= {str(n) for n in range(19)} and len(answers["generic_add"]) >= 15
  assert tasks.get("generic_kind").has_image and not tasks.get("generic_add").has_image
  for _, ex in tasks.examples(tasks.get("generic_add"), "test", size=20):
    a, b = (tasks.NUMBER_WORDS.index(w) for w in ex.question.split()[0:3:2])
    assert int(ex.answer) == a + b


def test_answers_are_correct_for_known_draws():
  rng = np.random.default_rng(0)
  for _ in range(20):
    ex = tasks.text_add(rng)
    a, b = (tasks.NUMBER_WORDS.index(w) for w in ex.question.split()[2:5:2])
    assert int(ex.answer) == a + b
  for _ in range(20):
    ex = tasks.text_min(rng)
    values = [int(v) for v in ex.question.split()[1:4]]
    assert ex.answer == render.BAR_POSITIONS[values.index(min(values))] and len(set(values)) == 3
  for ex in tasks.scene_mc_group(np.random.default_rng(1)):
    letters = ex.question.split("?")[1].split()
    options = {letters[i]: letters[i + 2] for i in range(0, 12, 3)}
    assert ex.answer in options


def test_circular_groups_rotate_options():
  group = tasks.scene_mc_group(np.random.default_rng(3))
  assert len(group) == 4
  assert len({e.answer for e in group}) == 4  # the right option moves through every letter


def test_builder_writes_and_reads_records(tmp_path):
  source = builder.data_source("text_add", "test", str(tmp_path))
  assert len(source) == tasks.get("text_add").test_size
  r = source[0]
  assert r["image"].shape == (32, 32, 3) and not r["has_image"]
  first = next(tasks.examples(tasks.get("text_add"), "test"))[1]
  assert r["question"].decode() == first.question and r["answer"].decode() == first.answer
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    builder.prepare("nope", str(tmp_path))


def test_train_example_layout(encoder, tokenizer):
  rec = record.make([("what colour is the shape ?", "red")], [np.zeros((32, 32, 3), np.uint8)])
  ex = encoder.train_example(rec, 48)
  ids, mask, loss = ex["input_ids"], ex["attention_mask"], ex["loss_mask"]
  assert ex["pixel_values"].shape == (1, 32, 32, 3)
  n = int(mask.sum())
  assert (mask[:48 - n] == 0).all() and (mask[48 - n:] == 1).all()  # left padded
  assert (ids == tokenizer.token_id("<IMG_CONTEXT>")).sum() == 16
  target = encoder.target_ids("red")
  assert list(ids[-len(target):]) == target and loss.sum() == len(target) and loss[-len(target):].all()
  assert encoder.decode_answer(list(ids[loss.astype(bool)])) == "red"
  with pytest.raises(ValueError, match="does not fit seq_len=10"):
    encoder.train_example(rec, 10)


def test_text_only_example_has_no_image_tokens(encoder, tokenizer):
  rec = record.make([("what is one plus two ?", "3")])
  ex = encoder.eval_example(rec, 32)
  assert (ex["input_ids"] == tokenizer.token_id("<IMG_CONTEXT>")).sum() == 0
  assert (ex["pixel_values"] == 0).all()


def test_train_batches_are_the_same_global_batches_on_any_number_of_hosts(encoder, tmp_path):
  source = sources.get("shape_kind", data_dir=str(tmp_path)).records("test")
  one = pipeline.train_batches([source], encoder, 48, 8, seed=3)
  two = [pipeline.train_batches([source], encoder, 48, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    np.testing.assert_array_equal(np.concatenate([next(h)["input_ids"] for h in two]), next(one)["input_ids"])


def test_train_batches_are_deterministic_and_resumable(encoder, tmp_path):
  source = sources.get("shape_kind", data_dir=str(tmp_path)).records("test")
  it = pipeline.train_batches([source], encoder, 48, 4, seed=7)
  first = [next(it)["input_ids"] for _ in range(3)]
  it2 = pipeline.train_batches([source], encoder, 48, 4, seed=7)
  next(it2)
  state = it2.get_state()
  it3 = pipeline.train_batches([source], encoder, 48, 4, seed=7)
  it3.set_state(state)
  np.testing.assert_array_equal(next(it3)["input_ids"], first[1])
  np.testing.assert_array_equal(pipeline.train_batches([source], encoder, 48, 4, seed=7).__next__()["input_ids"],
                                first[0])


def test_eval_batches_pad_last_batch_and_split_over_hosts(encoder, tmp_path):
  source = sources.get("text_add", data_dir=str(tmp_path)).records("test")
  batches = list(pipeline.eval_batches(source, encoder, 32, 100, 250))
  assert [b["input_ids"].shape for b in batches] == [(100, 32)] * 3
  assert batches[-1]["valid"].sum() == 50
  hosts = [list(pipeline.eval_batches(source, encoder, 32, 100, 250, i, 2)) for i in range(2)]
  for k in range(3):  # the two hosts' rows of global batch k are the one-host batch k, in order
    np.testing.assert_array_equal(np.concatenate([h[k]["input_ids"] for h in hosts]), batches[k]["input_ids"])
    np.testing.assert_array_equal(np.concatenate([h[k]["index"] for h in hosts]), batches[k]["index"])


def test_tokenizer_roundtrip_and_special_tokens(tokenizer, tmp_path):
  text = "what colour is the shape ?"
  assert tokenizer.decode(tokenizer.encode(text)) == text
  for tok in tok_lib.SPECIAL_TOKENS:
    assert tokenizer.encode(tok) == [tokenizer.token_id(tok)]
  tokenizer.save(str(tmp_path))
  again = tok_lib.Tokenizer.load(str(tmp_path))
  assert again.encode(text) == tokenizer.encode(text)
  with pytest.raises(ValueError, match="has no token"):
    tokenizer.token_id("<quad>")
  with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
    tok_lib.Tokenizer.load(str(tmp_path / "missing"))


def test_internlm2_template_matches_reference_layout():
  t = prompts.get_template("internlm2-chat")
  p = t.prompt("Q?", 2)
  assert p == ("<s><|im_start|>system\n" + prompts.INTERNVL_SYSTEM + "<|im_end|><|im_start|>user\n<img>"
               "<IMG_CONTEXT><IMG_CONTEXT></img>\nQ?<|im_end|><|im_start|>assistant\n")
  assert t.target("A") == "A<|im_end|>"
  assert prompts.get_template("phi3-chat").prompt("Q", 0).endswith("<|user|>\nQ<|end|><|assistant|>\n")
  with pytest.raises(ValueError, match="unknown chat template"):
    prompts.get_template("llava")


@pytest.mark.parametrize("size,max_tiles,grid", [
    ((448, 448), 12, (1, 1)), ((896, 448), 12, (2, 1)), ((448, 896), 12, (1, 2)),
    ((1344, 448), 12, (3, 1)), ((800, 600), 12, (4, 3)), ((1000, 200), 6, (5, 1)), ((300, 1000), 6, (1, 3)),
    ((896, 896), 6, (2, 2))])
def test_dynamic_tiling_grids(size, max_tiles, grid):
  assert images.choose_grid(*size, 448, 1, max_tiles) == grid


def test_dynamic_tiles_order_and_thumbnail():
  img = Image.new("RGB", (64, 32))
  img.paste((255, 0, 0), (0, 0, 32, 32))
  tiles = images.dynamic_tiles(img, 32, 1, 4)
  assert len(tiles) == 3  # 2x1 grid + thumbnail
  assert np.asarray(tiles[0])[..., 0].mean() > 250 and np.asarray(tiles[1])[..., 0].mean() < 5
  assert len(images.dynamic_tiles(Image.new("RGB", (32, 32)), 32, 1, 4)) == 1  # no thumbnail for one tile


def test_corrupt_image_is_a_one_line_error(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
  with pytest.raises(images.ImageError) as e:
    images.load_image(str(bad))
  assert "cannot decode image" in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(images.ImageError, match="image file not found"):
    images.load_image(str(tmp_path / "none.png"))
  good = tmp_path / "good.png"
  Image.new("RGBA", (5, 3)).save(good)
  assert images.load_image(str(good)).mode == "RGB"





def test_tiny_tokenizer_rebuilds_the_shipped_one(tokenizer, tmp_path):
  """drex.pretrain trains this tokenizer: it must not drift as tasks are added to the family."""
  tokenizer.save(str(tmp_path))
  rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
  shipped = json.loads(pathlib.Path(shipped_path(), "tokenizer.json").read_text())["model"]
  assert rebuilt["vocab"] == shipped["vocab"] and rebuilt["merges"] == shipped["merges"]
