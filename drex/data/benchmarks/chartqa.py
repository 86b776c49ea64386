"""ChartQA (vis-nlp/ChartQA): questions about charts, scored by relaxed accuracy per subset.

Published layout, read from manual_dir (the release's `ChartQA Dataset/` folder, or its parent):
  {train,val,test}/png/<imgname>
  {train,val,test}/<split>_human.json       JSON array of {"imgname": str, "query": str, "label": str}
  {train,val,test}/<split>_augmented.json   the same, machine-generated questions
  ({split}/tables/ and annotations/ are not read)
Records: question = query, answers = [label], answer = label, subset 'human' / 'augmented' (human first),
group = the record's index in its split.
"""

from __future__ import annotations

from etils import epath

from drex.data import render
from drex.data.benchmarks import common

SPLITS = ("train", "val", "test")
SUBSETS = ("human", "augmented")
PARENT = "ChartQA Dataset"
LAYOUT = ("MANUAL_DIR/{train,val,test}/{split}_{human,augmented}.json (JSON arrays of {imgname, query, label}) "
          "and MANUAL_DIR/{split}/png/<imgname>; MANUAL_DIR may also be the folder holding 'ChartQA Dataset/'")


def _root(manual_dir: epath.Path) -> epath.Path:
  if not any((manual_dir / s).is_dir() for s in SPLITS) and (manual_dir / PARENT).is_dir():
    return manual_dir / PARENT
  return manual_dir


class ChartQA(common.BenchmarkBuilder, skip_registration=True):
  """ChartQA from a local copy of the release (see the module docstring)."""

  name = "drex_chartqa"
  KIND = "chartqa"
  LAYOUT = LAYOUT
  HOMEPAGE = "https://github.com/vis-nlp/ChartQA"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put a copy of ChartQA in manual_dir: {LAYOUT}"

  @classmethod
  def annotation_files(cls, manual_dir):
    root = _root(manual_dir)
    return [p for s in SPLITS for sub in SUBSETS if (p := root / s / f"{s}_{sub}.json").is_file()]

  def _splits(self, manual_dir):
    by_split: dict[str, list] = {}
    for path in self.annotation_files(manual_dir):
      by_split.setdefault(path.parent.name, []).append(self._read(path))
    return {split: self._records(parts) for split, parts in by_split.items()}

  def _read(self, path: epath.Path) -> tuple[str, epath.Path, list[tuple[str, str, str]]]:
    ann = common.AnnotationFile(self.KIND, path, LAYOUT)
    entries = ann.json()
    if not isinstance(entries, list):
      raise ann.error("is not a JSON array")
    subset = path.stem.rsplit("_", 1)[1]
    rows = [(str(ann.get(e, "imgname", f"entry {i}", str)), str(ann.get(e, "query", f"entry {i}")),
             str(ann.get(e, "label", f"entry {i}"))) for i, e in enumerate(entries)]
    return subset, path.parent / "png", rows

  def _records(self, parts):
    i = 0
    for subset, png, rows in parts:
      for j, (imgname, query, label) in enumerate(rows):
        yield common.example(f"{subset}/{j}", [png / imgname], query, [label], label, i, subset=subset)
        i += 1


def write_fixture(root: str, seed: int = 0, size: int = 8) -> None:
  """A small ChartQA in the published layout under root: bar charts (drex.data.render), labels their true values.

  Per split `size` questions, split between the human and augmented files; every fourth question asks
  about another bar of the previous chart (ChartQA has several questions per chart).
  """
  root = epath.Path(root)
  for split in SPLITS:
    rng = common.fixture_rng("chartqa", seed, split)
    entries = {sub: [] for sub in SUBSETS}
    image, values = None, []
    for i in range(size):
      subset = SUBSETS[0] if i < (size + 1) // 2 else SUBSETS[1]
      if image is None or i % 4 != 3:
        values = [int(v) for v in rng.integers(1, 10, size=3)]
        image = (f"{int(rng.integers(10**13, 10**14))}.png" if subset == "human"
                 else f"two_col_{int(rng.integers(1, 40000))}.png")
        common.write_bytes(root / split / "png" / image, common.fixture_image(render.draw_bars(rng, values), i))
      bar = int(rng.integers(0, 3))
      entries[subset].append({"imgname": image, "query": f"What is the value of the {render.BAR_POSITIONS[bar]} bar?",
                              "label": str(10 * values[bar])})
    for sub in SUBSETS:
      common.write_json(root / split / f"{split}_{sub}.json", entries[sub])
