"""DocVQA Task 1 (RRC "Single Document VQA"): questions about document pages, scored by ANLS.

Published layout (the train/val/test archives unpacked into manual_dir):
  {train,val,test}/<split>_v1.0.json   {"dataset_name", "dataset_split", ..., "data": [{"questionId": int,
                                        "question": str, "image": "documents/<doc>.png", "answers": [str],
                                        "docId", "ucsf_document_id", "ucsf_document_page_no", ...}]}
                                       (<split>_v1.0_withQT.json, the release with question_types, is read
                                        when <split>_v1.0.json is absent)
  {train,val,test}/documents/*.png
The test split has no answers (scored on the RRC server): answers [] and answer ''.
Records: id = questionId, answers as published, answer = the first answer, group = index in the split.
"""

from __future__ import annotations

from etils import epath

from drex.data import tasks
from drex.data.benchmarks import common

SPLITS = ("train", "val", "test")
LAYOUT = ("MANUAL_DIR/{train,val,test}/{split}_v1.0.json ({..., \"data\": [{questionId, question, image, answers}]}) "
          "and MANUAL_DIR/{split}/documents/*.png")


def _annotation(manual_dir: epath.Path, split: str) -> epath.Path | None:
  for name in (f"{split}_v1.0.json", f"{split}_v1.0_withQT.json"):
    if (manual_dir / split / name).is_file():
      return manual_dir / split / name
  return None


class DocVQA(common.BenchmarkBuilder, skip_registration=True):
  """DocVQA Task 1 from a local copy (see the module docstring)."""

  name = "drex_docvqa"
  KIND = "docvqa"
  LAYOUT = LAYOUT
  HOMEPAGE = "https://rrc.cvc.uab.es/?ch=17"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put a copy of DocVQA (Task 1) in manual_dir: {LAYOUT}"

  @classmethod
  def annotation_files(cls, manual_dir):
    return [p for s in SPLITS if (p := _annotation(manual_dir, s)) is not None]

  def _splits(self, manual_dir):
    return {s: self._read(s, p) for s in SPLITS if (p := _annotation(manual_dir, s)) is not None}

  def _read(self, split: str, path: epath.Path) -> list[dict]:
    ann = common.AnnotationFile(self.KIND, path, LAYOUT)
    data = ann.get(ann.json(), "data", "the top-level object", list)
    records = []
    for i, e in enumerate(data):
      where = f"data[{i}]"
      qid, question = ann.get(e, "questionId", where), ann.get(e, "question", where, str)
      image = ann.get(e, "image", where, str)
      answers = ann.get(e, "answers", where, list) if split != "test" or "answers" in e else []
      records.append(common.example(qid, [path.parent / image], question, answers,
                                    str(answers[0]) if answers else "", i))
    return records


def write_fixture(root: str, seed: int = 0, size: int = 8) -> None:
  """A small DocVQA in the published layout under root: doc_text pages (a word or a number on a page)."""
  root = epath.Path(root)
  for n, split in enumerate(SPLITS):
    rng = common.fixture_rng("docvqa", seed, split)
    data = []
    for i in range(size):
      ex = tasks.doc_text(rng)
      doc = f"{''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), 4))}{int(rng.integers(0, 1000)):04d}"
      page = str(int(rng.integers(1, 120)))
      image = f"documents/{doc}_{page}.png"
      common.write_bytes(root / split / image, common.fixture_image(ex.image, i))
      entry = {"questionId": 10000 * (n + 1) + 7 * i + 1, "question": "What is written in the document?",
               "question_types": ["handwritten" if i % 3 == 0 else "layout"], "image": image,
               "docId": 1000 * (n + 1) + i, "ucsf_document_id": doc, "ucsf_document_page_no": page}
      if split != "test":  # test answers are withheld
        entry["answers"] = [ex.answer] + ([f"'{ex.answer}'"] if i % 3 == 1 else [])
      entry["data_split"] = split
      data.append(entry)
    common.write_json(root / split / f"{split}_v1.0.json",
                      {"dataset_name": "docvqa", "dataset_split": split, "dataset_version": "1.0", "data": data})
