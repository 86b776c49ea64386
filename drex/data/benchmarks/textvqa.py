"""TextVQA 0.5.1: questions about text in photos, scored by VQA accuracy over 10 annotators' answers.

Published layout (textvqa.org/dataset), read from manual_dir:
  TextVQA_0.5.1_{train,val,test}.json  {"dataset_type", "dataset_name", "dataset_version", "data": [{"question":
                                       str, "image_id": str, "answers": [10 str], "question_id": int,
                                       "image_classes", "flickr_original_url", "image_width", ..., "set_name"}]}
  train_images/<image_id>.jpg          (train_val_images.zip: the val images live here too)
  test_images/<image_id>.jpg           (test_images.zip)
The test split has no answers (scored on EvalAI): answers [] and answer ''.
Records: id = question_id, answers = the 10 answers, answer = the most common one (ties: the first in list
order), group = index in the split.
"""

from __future__ import annotations

import collections

from etils import epath

from drex.data import render, tasks
from drex.data.benchmarks import common

SPLITS = ("train", "val", "test")
LAYOUT = ("MANUAL_DIR/TextVQA_0.5.1_{train,val,test}.json ({..., \"data\": [{question, image_id, answers, "
          "question_id}]}) with images MANUAL_DIR/train_images/<image_id>.jpg (train and val) and "
          "MANUAL_DIR/test_images/<image_id>.jpg")


def annotation_path(manual_dir: epath.Path, split: str) -> epath.Path:
  return manual_dir / f"TextVQA_0.5.1_{split}.json"


def image_dir(manual_dir: epath.Path, split: str) -> epath.Path:
  return manual_dir / ("test_images" if split == "test" else "train_images")


def most_common(answers: list[str]) -> str:
  """The most frequent answer; ties go to the one first in list order."""
  return collections.Counter(answers).most_common(1)[0][0] if answers else ""


class TextVQA(common.BenchmarkBuilder, skip_registration=True):
  """TextVQA 0.5.1 from a local copy (see the module docstring)."""

  name = "drex_textvqa"
  KIND = "textvqa"
  LAYOUT = LAYOUT
  HOMEPAGE = "https://textvqa.org"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put a copy of TextVQA 0.5.1 in manual_dir: {LAYOUT}"

  @classmethod
  def annotation_files(cls, manual_dir):
    return [p for s in SPLITS if (p := annotation_path(manual_dir, s)).is_file()]

  def _splits(self, manual_dir):
    return {s: self._read(manual_dir, s) for s in SPLITS if annotation_path(manual_dir, s).is_file()}

  def _read(self, manual_dir: epath.Path, split: str) -> list[dict]:
    ann = common.AnnotationFile(self.KIND, annotation_path(manual_dir, split), LAYOUT)
    data = ann.get(ann.json(), "data", "the top-level object", list)
    images = image_dir(manual_dir, split)
    records = []
    for i, e in enumerate(data):
      where = f"data[{i}]"
      qid, question = ann.get(e, "question_id", where), ann.get(e, "question", where, str)
      image_id = ann.get(e, "image_id", where, str)
      answers = [str(a) for a in ann.get(e, "answers", where, list)] if split != "test" or "answers" in e else []
      records.append(common.example(qid, [images / f"{image_id}.jpg"], question, answers, most_common(answers), i))
    return records


def write_fixture(root: str, seed: int = 0, size: int = 8) -> None:
  """A small TextVQA 0.5.1 in the published layout under root: words drawn on pages (JPEG, RGB and greyscale).

  Answers: 10 per question, some disagreeing (an 'unanswerable', another word); the second question of
  each split is a 5-5 tie whose first answer (upper case) is the most common one.
  """
  root = epath.Path(root)
  for n, split in enumerate(SPLITS):
    rng = common.fixture_rng("textvqa", seed, split)
    data = []
    for i in range(size):
      word = str(rng.choice(tasks.WORDS))
      image_id = "".join(rng.choice(list("0123456789abcdef"), 16))
      pixels = render.draw_text(rng, word)
      common.write_bytes(image_dir(root, split) / f"{image_id}.jpg", common.fixture_image(pixels, i, "JPEG"))
      entry = {"question": "what is written on the sign?" if i % 2 else "what word is shown?", "image_id": image_id,
               "image_classes": ["Sign"], "flickr_original_url": f"https://farm.example/{image_id}_o.jpg",
               "flickr_300k_url": f"https://farm.example/{image_id}_z.jpg",
               "image_width": common.FIXTURE_SIZES[i % len(common.FIXTURE_SIZES)][0],
               "image_height": common.FIXTURE_SIZES[i % len(common.FIXTURE_SIZES)][1]}
      if split != "test":  # test answers are withheld
        if i == 1:
          answers = [word.upper(), word] * 5
        else:
          other = str(rng.choice([w for w in tasks.WORDS if w != word]))
          answers = [str(a) for a in rng.permutation([word] * 7 + [other] * 2 + ["unanswerable"])]
        entry["answers"] = answers
      entry.update({"question_tokens": entry["question"].rstrip("?").split(), "question_id": 30000 * n + 3 * i,
                    "set_name": split})
      data.append(entry)
    common.write_json(annotation_path(root, split),
                      {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
