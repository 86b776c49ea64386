"""ScienceQA (lupantech/ScienceQA): multiple-choice science questions, with or without an image; accuracy.

Published layout (the repo's data/scienceqa/ folder, images unpacked by tools/download.sh), read from manual_dir:
  problems.json     {pid: {"question": str, "choices": [str], "answer": int (0-based), "hint": str,
                    "image": "image.png" | null, "split": "train"|"val"|"test", "lecture", "solution", ...}}
  pid_splits.json   {"train": [pid], "val": [pid], "test": [pid], "minival": [pid], ...}
  images/<split>/<pid>/image.png   for the problems with an image (<split> = the problem's own split;
                                   minival problems are val problems)
Splits train, val, test and minival (the others in pid_splits.json are not built). Records: id = pid,
options = choices, answer = answers[0] = the option letter ('ABCDE'[answer]), hint as published; text-only
problems have no images. group = index in the split.
"""

from __future__ import annotations

from etils import epath

from drex.data import render, tasks
from drex.data.benchmarks import common

SPLITS = ("train", "val", "test", "minival")
FILES = ("problems.json", "pid_splits.json")
LAYOUT = ("MANUAL_DIR/problems.json ({pid: {question, choices, answer, hint, image}}), MANUAL_DIR/pid_splits.json "
          "({train, val, test, minival: [pid]}) and MANUAL_DIR/images/<split>/<pid>/image.png")


class ScienceQA(common.BenchmarkBuilder, skip_registration=True):
  """ScienceQA from a local copy (see the module docstring)."""

  name = "drex_scienceqa"
  KIND = "scienceqa"
  LAYOUT = LAYOUT
  HOMEPAGE = "https://scienceqa.github.io"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put a copy of ScienceQA in manual_dir: {LAYOUT}"

  @classmethod
  def annotation_files(cls, manual_dir):
    return [p for name in FILES if (p := manual_dir / name).is_file()]

  def _splits(self, manual_dir):
    present = self.annotation_files(manual_dir)
    if not present:
      return {}
    for name in FILES:
      if manual_dir / name not in present:
        raise common.AnnotationFile(self.KIND, manual_dir / name, LAYOUT).error("is missing")
    problems_file = common.AnnotationFile(self.KIND, manual_dir / FILES[0], LAYOUT)
    splits_file = common.AnnotationFile(self.KIND, manual_dir / FILES[1], LAYOUT)
    problems, pid_splits = problems_file.json(), splits_file.json()
    for ann, value in ((problems_file, problems), (splits_file, pid_splits)):
      if not isinstance(value, dict):
        raise ann.error("is not a JSON object")
    splits = [s for s in SPLITS if s in pid_splits]
    if not splits:
      raise splits_file.error(f"has none of the splits {', '.join(SPLITS)}")
    return {s: self._read(manual_dir, s, splits_file.get(pid_splits, s, "the top-level object", list), problems_file,
                          problems) for s in splits}

  def _read(self, manual_dir, split, pids, ann, problems) -> list[dict]:
    records = []
    for i, pid in enumerate(pids):
      pid = str(pid)
      where = f"problem {pid!r} (listed in pid_splits.json[{split!r}])"
      if pid not in problems:
        raise ann.error(f"has no {where}")
      p = problems[pid]
      question, choices = ann.get(p, "question", where, str), ann.get(p, "choices", where, list)
      answer = ann.get(p, "answer", where, int)
      if not 0 <= answer < len(choices):
        raise ann.error(f"has answer {answer} for {len(choices)} choices in {where}")
      image = p.get("image") if isinstance(p, dict) else None
      folder = str(p.get("split") or ("val" if split == "minival" else split))
      images = [manual_dir / "images" / folder / pid / str(image)] if image else []
      letter = common.LETTERS[answer]
      records.append(common.example(pid, images, question, [letter], letter, i, hint=p.get("hint") or "",
                                    options=choices))
    return records


_NUMBERS = tasks.NUMBER_WORDS


def write_fixture(root: str, seed: int = 0, size: int = 8) -> None:
  """A small ScienceQA in the published layout under root: shape and colour questions on drawn shapes
  (2-4 choices, some with a hint) and text-only addition questions (every third problem)."""
  root = epath.Path(root)
  problems, pid_splits = {}, {}
  for n, split in enumerate(SPLITS[:3]):
    rng = common.fixture_rng("scienceqa", seed, split)
    pid_splits[split] = []
    for i in range(size):
      pid = str(1 + n * size + i)
      k = 2 + i % 3  # choices
      if i % 3 == 2:  # text-only
        a, b = (int(v) for v in rng.integers(0, 5, size=2))
        choices = [str(c) for c in rng.permutation(sorted({a + b} | set(range(a + b + 1, a + b + k))))]
        question, image, hint = f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}?", None, ""
        answer = choices.index(str(a + b))
      else:
        kind, colour = str(rng.choice(render.SHAPES)), str(rng.choice(list(render.COLOURS)))
        ask_colour = i % 2 == 1
        truth, pool = (colour, list(render.COLOURS)) if ask_colour else (kind, list(render.SHAPES))
        choices = [str(c) for c in rng.permutation([truth] + list(rng.choice([c for c in pool if c != truth], k - 1,
                                                                             replace=False)))]
        question = "Which colour is the shape?" if ask_colour else "Which shape is shown?"
        answer, image = choices.index(truth), "image.png"
        hint = "The picture shows one shape on a dark background." if i % 4 == 0 else ""
        common.write_bytes(root / "images" / split / pid / image,
                           common.fixture_image(render.draw_single_shape(rng, kind, colour), i))
      problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
                       "task": "closed choice", "grade": f"grade{2 + i % 5}", "subject": "natural science",
                       "topic": "shapes", "category": "Geometry", "skill": "Identify shapes", "lecture": "",
                       "solution": "", "split": split}
      pid_splits[split].append(pid)
  pid_splits["minival"] = pid_splits["val"][:max(1, size // 2)]
  common.write_json(root / FILES[0], problems)
  common.write_json(root / FILES[1], pid_splits)
