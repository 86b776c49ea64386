"""MMBench: multiple-choice perception/reasoning questions, scored with CircularEval (every rotation right).

Published layout: the VLMEvalKit / InternVL TSVs in manual_dir (one per split; the split comes from the name):
  mmbench_dev_20230712.tsv, mmbench_dev_en_20231003.tsv, mmbench_test_en_20231003.tsv, MMBench_DEV_EN.tsv, ...
  tab-separated with a header: index, question, hint, A, B, C, D, answer (dev only), category, image (base64
  PNG/JPEG; a cell of <= 64 characters names the index of the row holding the image, as VLMEvalKit reads it),
  source, l2-category, comment, split. Missing cells are empty or NaN (pandas' NA spellings: InternVL reads
  the TSVs with pandas). A question has 2-4 options (the letters whose cells are filled, from A on).
CircularEval: a TSV holding rotated copies (index >= 1e6; group = index % 1e6) is kept as published (rows
ordered by group, file order within it); otherwise each question with n options becomes n rotations (the
option texts shifted, the gold letter moving with its option; id = k * 1e6 + index), group = the index.
Records: options, answer = answers[0] = the gold letter ([] and '' in test TSVs), hint ('' when NaN).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import itertools
import re

from etils import epath

from drex.data import render
from drex.data.benchmarks import common
from drex.errors import UserError

ROTATION = 1_000_000
REQUIRED = ("index", "question", "A", "B", "image")
COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split")
NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
      "NULL", "NaN", "None", "n/a", "nan", "null"}  # pandas.read_csv's default NA values
LAYOUT = ("MANUAL_DIR/mmbench_{dev,test}_*.tsv (VLMEvalKit/InternVL MMBench TSVs, tab-separated, columns index, "
          "question, hint, A, B, C, D, answer, category, image (base64))")


def split_of(name: str) -> str | None:
  tokens = re.split(r"[_\-.\s]+", name.lower())
  return "dev" if "dev" in tokens else "test" if "test" in tokens else None


def _cell(row: dict, key: str) -> str:
  value = row.get(key)
  return "" if value is None or value in NA else value


def _open(path: epath.Path) -> io.TextIOWrapper:
  return io.TextIOWrapper(path.open("rb"), encoding="utf-8", newline="")  # csv needs newline=''


class MMBench(common.BenchmarkBuilder, skip_registration=True):
  """MMBench from local VLMEvalKit/InternVL TSVs (see the module docstring)."""

  name = "drex_mmbench"
  KIND = "mmbench"
  LAYOUT = LAYOUT
  HOMEPAGE = "https://github.com/open-compass/MMBench"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the MMBench TSVs in manual_dir: {LAYOUT}"

  @classmethod
  def annotation_files(cls, manual_dir):
    return sorted(p for p in manual_dir.glob("*.tsv") if "mmbench" in p.name.lower() and split_of(p.name))

  def _splits(self, manual_dir):
    files: dict[str, epath.Path] = {}
    for path in self.annotation_files(manual_dir):
      split = split_of(path.name)
      if split in files:
        raise UserError(f"mmbench: {files[split]} and {path} both hold the {split} split; keep one of them in "
                        f"{manual_dir}")
      files[split] = path
    return {split: self._read(path) for split, path in files.items()}

  def _read(self, path: epath.Path):
    ann = common.AnnotationFile(self.KIND, path, LAYOUT)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # base64 images exceed the 128 KiB default
    with _open(path) as f:
      header = next(csv.reader(f, delimiter="\t"), [])
    missing = [c for c in REQUIRED if c not in header]
    if missing:
      raise ann.error(f"has no column {', '.join(map(repr, missing))}")
    return self._records(ann)

  def _records(self, ann: common.AnnotationFile):
    with _open(ann.path) as f:
      rows = list(csv.DictReader(f, delimiter="\t"))
    indices = []
    for n, row in enumerate(rows):
      try:
        indices.append(int(float(row["index"])))
      except (TypeError, ValueError):
        raise ann.error(f"has index {row['index']!r} in data row {n + 1}") from None
    images = {row["index"]: row["image"] for row in rows}
    rotated = any(i >= ROTATION for i in indices)
    order = sorted(range(len(rows)), key=lambda n: indices[n] % ROTATION) if rotated else range(len(rows))
    for n in order:
      row, index = rows[n], indices[n]
      options = []
      for letter in common.LETTERS:
        if not _cell(row, letter):
          break
        options.append(_cell(row, letter))
      answer = _cell(row, "answer").strip()
      if answer and answer not in common.LETTERS[:len(options)]:
        raise ann.error(f"has answer {answer!r} for {len(options)} options at index {index}")
      image = _cell(row, "image")
      if len(image) <= 64 and images.get(image):  # VLMEvalKit: a short cell names the row holding the image
        image = images[image]
      try:
        data = base64.b64decode(image, validate=True)
      except binascii.Error:
        raise ann.error(f"has an image that is not base64 at index {index}") from None
      shift = range(1) if rotated else range(len(options))
      for k in shift:
        opts = options[k:] + options[:k]
        gold = common.LETTERS[(common.LETTERS.index(answer) - k) % len(options)] if answer else ""
        yield common.example(index + k * ROTATION, [(f"{ann.path.name}:{index}", data)], row["question"],
                             [gold] if gold else [], gold, index % ROTATION, hint=_cell(row, "hint"), options=opts)


def write_tsv(path: epath.Path, rows: list[dict], columns=COLUMNS) -> None:
  """Rows (dicts; absent keys = missing cells) as a TSV the way pandas' to_csv(sep='\\t') writes one."""
  buf = io.StringIO()
  writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(buf.getvalue())


def rotate(rows: list[dict]) -> list[dict]:
  """rows + their circular copies as published: rotation k of a row with n options has index k * 1e6 + index."""
  out = list(rows)
  for k in range(1, 4):
    for row in rows:
      opts = [row[c] for c in itertools.takewhile(lambda c: _cell(row, c), "ABCD")]
      if k < len(opts):
        n = len(opts)
        new = {**row, "index": k * ROTATION + row["index"], **dict(zip("ABCD", opts[k:] + opts[:k]))}
        if row.get("answer"):
          new["answer"] = "ABCD"[("ABCD".index(row["answer"]) - k) % n]
        out.append(new)
  return out


def write_fixture(root: str, seed: int = 0, size: int = 8, rotated: bool = True) -> None:
  """mmbench_{dev,test}_en_20231003.tsv under root: `size` questions each, counting drawn shapes (2-4 options,
  some with a hint), images as base64 PNG or JPEG; with rotated (as published), their circular copies too."""
  root = epath.Path(root)
  for split in ("dev", "test"):
    rng = common.fixture_rng("mmbench", seed, split)
    rows = []
    for i in range(size):
      count = int(rng.integers(1, 4))
      items = [(str(rng.choice(render.SHAPES)), str(rng.choice(list(render.COLOURS)))) for _ in range(count)]
      pixels = render.draw_shapes(rng, items)
      n = 2 + i % 3
      wrong = [int(v) for v in rng.choice([v for v in range(1, 6) if v != count], n - 1, replace=False)]
      options = [str(v) for v in rng.permutation([count] + wrong)]
      image = common.fixture_image(pixels, i, "JPEG" if i % 2 else "PNG")
      row = {"index": 100 * (split == "test") + i, "question": "How many shapes are in the image?",
             "hint": "The shapes are drawn on a dark background." if i % 3 == 1 else None,
             **dict(zip("ABCD", options)), "category": "object_localization", "source": "drex",
             "image": base64.b64encode(image).decode(), "l2-category": "finegrained_perception (instance-level)",
             "comment": None, "split": split}
      if split == "dev":
        row["answer"] = "ABCD"[options.index(str(count))]
      rows.append(row)
    columns = COLUMNS if split == "dev" else tuple(c for c in COLUMNS if c != "answer")
    write_tsv(root / f"mmbench_{split}_en_20231003.tsv", rotate(rows) if rotated else rows, columns)

