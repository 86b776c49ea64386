"""What the five real-benchmark builders share: stored features, the builder base, prepare(), to_record(),
the registry BENCHMARKS and helpers for the fixture writers.

Every builder reads a local copy of its benchmark in the published layout (TFDS manual_dir) and stores,
per question (file_format array_record, read back with builder.as_data_source(split); no TensorFlow):
  id           the published question id (str)
  images       raw image file bytes exactly as published (never re-encoded); b"" for a missing file
  image_names  where each image came from, relative to manual_dir (for messages)
  question, hint   texts ('' when a benchmark has no hint)
  options      multiple-choice option texts in letter order; [] for open questions
  answers      the golds as published ([] where a split's answers are withheld)
  answer       the training target (ChartQA label, DocVQA first answer, TextVQA most common answer,
               MMBench/ScienceQA option letter; '' where withheld)
  group        records scored together share it (MMBench rotations); a record's index in its split otherwise
  subset       part of the eval set scored on its own (ChartQA 'human' / 'augmented'); '' otherwise
Splits keep their published names ('train', 'val', 'test', 'dev', 'minival'); Benchmark.splits maps drex's
'train' / 'validation' / 'test' to them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import string
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from drex.data import record
from drex.errors import UserError

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
VQA_SUFFIX = " Answer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
_MISSING_SHOWN = 5  # missing image paths named in the warning


def features() -> tfds.features.FeaturesDict:
  text_seq = tfds.features.Sequence(tfds.features.Text())
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "image_names": text_seq,
      "question": tfds.features.Text(),
      "hint": tfds.features.Text(),
      "options": text_seq,
      "answers": text_seq,
      "answer": tfds.features.Text(),
      "group": np.int64,
      "subset": tfds.features.Text(),
  })


@dataclasses.dataclass(frozen=True)
class AnnotationFile:
  """An annotation file being read: raises one-line UserErrors that name it and the expected layout."""

  kind: str
  path: epath.Path
  layout: str

  def error(self, what: str) -> UserError:
    return UserError(f"{self.kind}: {self.path} {what}; expected {self.layout}")

  def json(self) -> Any:
    try:
      return json.loads(self.path.read_text())
    except json.JSONDecodeError as e:
      raise self.error(f"is not valid JSON (line {e.lineno})") from None
    except UnicodeDecodeError:
      raise self.error("is not UTF-8 text") from None

  def get(self, entry: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """entry[key], checked to exist (and to be of `kind`)."""
    if not isinstance(entry, dict) or key not in entry:
      raise self.error(f"has no {key!r} in {where}")
    value = entry[key]
    if kind is not None and not isinstance(value, kind):
      raise self.error(f"has a {type(value).__name__} for {key!r} in {where}")
    return value


def example(id_: Any, images: list, question: str, answers: list[str], answer: str, group: int, *, hint: str = "",
            options: list[str] = (), subset: str = "") -> dict:
  """One record before its images are read; images: epath.Path (read) or (name, bytes) (stored as is)."""
  return {"id": str(id_), "images": list(images), "question": str(question), "hint": str(hint or ""),
          "options": [str(o) for o in options], "answers": [str(a) for a in answers], "answer": str(answer),
          "group": int(group), "subset": subset}


class BenchmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the benchmark builders: subclasses set KIND, LAYOUT and implement annotation_files / _splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  KIND = ""
  LAYOUT = ""  # the expected layout, for messages
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put a local copy of the benchmark in its published layout in manual_dir."
  HOMEPAGE = ""

  @classmethod
  def annotation_files(cls, manual_dir: epath.Path) -> list[epath.Path]:
    """The benchmark's annotation files present under manual_dir (they key the prepared dataset)."""
    raise NotImplementedError

  def _splits(self, manual_dir: epath.Path) -> dict[str, Iterable[dict]]:
    """Published split name -> its records (common.example dicts); checks the annotation files."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(), homepage=self.HOMEPAGE,
                                 description=f"{self.KIND}: {self.LAYOUT}", disable_shuffling=True)

  def download_and_prepare(self, **kwargs) -> None:
    self._missing: list[str] = []
    super().download_and_prepare(**kwargs)
    if self._missing:
      shown = ", ".join(self._missing[:_MISSING_SHOWN]) + (", ..." if len(self._missing) > _MISSING_SHOWN else "")
      log.warning("%s: %d image file(s) missing, stored as empty bytes: %s", self.KIND, len(self._missing), shown)

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    splits = self._splits(manual_dir)
    if not splits:
      raise UserError(f"{self.KIND}: no annotation files under {manual_dir}; expected {self.LAYOUT}")
    return {split: self._generate_examples(manual_dir, records) for split, records in splits.items()}

  def _generate_examples(self, manual_dir: epath.Path, records: Iterable[dict]):
    for i, ex in enumerate(records):
      images, names = [], []
      for image in ex["images"]:
        if isinstance(image, tuple):
          name, data = image
        else:
          name = os.fspath(image.relative_to(manual_dir))
          try:
            data = image.read_bytes()
          except FileNotFoundError:
            data = b""
        if not data:
          self._missing.append(name)
        images.append(data)
        names.append(name)
      yield i, {**ex, "images": images, "image_names": names}

  def as_data_source(self, split=None, **kwargs):
    if isinstance(split, str) and split.split("[")[0] not in self.info.splits:
      have = ", ".join(self.info.splits) or "none (not prepared: use drex.data.benchmarks.prepare)"
      raise UserError(f"{self.KIND}: no split {split!r} in the dataset at {self.data_dir}; it has: {have}")
    return super().as_data_source(split, **kwargs)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A real benchmark and InternVL-2's evaluation settings for it."""

  name: str
  builder: type[BenchmarkBuilder]
  metric: str  # drex.data.metrics name
  prompt_suffix: str  # appended to the user text (see to_record)
  max_new_tokens: int
  max_tiles: int  # InternVL's max_num + 1 (the thumbnail)
  splits: Mapping[str, str]  # drex split ('train', 'validation', 'test') -> published split
  write_fixture: Callable[..., None]  # write_fixture(root, seed=0, size=8): a small copy in the published layout
  subsets: tuple[str, ...] = ()


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
  BENCHMARKS[benchmark.name] = benchmark
  return benchmark


def to_record(raw: dict, prompt_suffix: str) -> dict:
  """A stored record (from as_data_source) -> a drex.data.record, prompted as InternVL's eval scripts do."""
  question, hint, answer = (record.text(raw[k]) for k in ("question", "hint", "answer"))
  options = [record.text(o) for o in raw["options"]]
  answers = [record.text(a) for a in raw["answers"]]
  if options:  # evaluate_mmbench.py / evaluate_scienceqa.py
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    user = (hint + "\n" if hint else "") + question + "\n" + listed + prompt_suffix
    golds = [answer]
  else:
    user, golds = question + prompt_suffix, answers or [answer]
  return record.make([(user, answer)], images=[bytes(b) for b in raw["images"]], golds=golds, options=options,
                     group=int(raw["group"]), subset=record.text(raw["subset"]))


def _manual_path(manual_dir: str) -> epath.Path:
  path = epath.Path(manual_dir)
  return path if "://" in os.fspath(manual_dir) else path.expanduser().resolve()


def _stat(path: epath.Path) -> tuple[int, int]:
  if "://" not in os.fspath(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  st = path.stat()
  return st.length, st.mtime


def cache_key(builder_cls: type[BenchmarkBuilder], manual_dir: epath.Path, files: list[epath.Path]) -> str:
  """Short hash of the builder version, manual_dir and each annotation file's name, size and mtime."""
  parts = [builder_cls.KIND, str(builder_cls.VERSION), os.fspath(manual_dir)]
  parts += [f"{os.fspath(f.relative_to(manual_dir))}:{':'.join(map(str, _stat(f)))}" for f in sorted(files)]
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


_PREPARED: dict[tuple[str, str], BenchmarkBuilder] = {}


def dataset_key(kind: str, manual_dir: str) -> str:
  """The cache key `prepare` builds under, without building: what a benchmark's records depend on."""
  cls = BENCHMARKS[kind].builder
  manual = _manual_path(manual_dir)
  return cache_key(cls, manual, cls.annotation_files(manual))


def prepare(kind: str, manual_dir: str, data_dir: str) -> BenchmarkBuilder:
  """Build (once per manual_dir and annotation files' sizes/mtimes) and return the builder of a benchmark.

  The dataset lives in data_dir/<kind>/<cache_key>, so builds of different copies never share a cache and
  an edited annotation file gives a fresh build.
  """
  if kind not in BENCHMARKS:
    raise UserError(f"unknown benchmark {kind!r}; use one of {', '.join(BENCHMARKS)}")
  cls = BENCHMARKS[kind].builder
  manual = _manual_path(manual_dir)
  if not manual.is_dir():
    raise UserError(f"{kind}: manual_dir {manual} is not a directory; expected {cls.LAYOUT}")
  files = cls.annotation_files(manual)
  if not files:
    raise UserError(f"{kind}: no annotation files under {manual}; expected {cls.LAYOUT}")
  target = os.fspath(epath.Path(data_dir) / kind / cache_key(cls, manual, files))
  if (os.fspath(manual), target) not in _PREPARED:
    builder = cls(data_dir=target, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    _PREPARED[(os.fspath(manual), target)] = builder
  return _PREPARED[(os.fspath(manual), target)]


# ----------------------------------------------------------------------------- fixtures

FIXTURE_SIZES = ((64, 48), (40, 96), (96, 40), (48, 64), (80, 56))  # (width, height)
FIXTURE_MODES = {"PNG": ("RGB", "P", "L", "RGBA"), "JPEG": ("RGB", "L")}


def fixture_image(pixels: np.ndarray, i: int, fmt: str = "PNG") -> bytes:
  """A drawn [H, W, 3] image upscaled to the i-th fixture size and saved in the i-th mode of `fmt`."""
  width, height = FIXTURE_SIZES[i % len(FIXTURE_SIZES)]
  image = Image.fromarray(pixels).resize((width, height), Image.NEAREST)
  modes = FIXTURE_MODES[fmt]
  mode = modes[i % len(modes)]
  if mode == "P":
    image = image.convert("P", palette=Image.ADAPTIVE, colors=16)
  elif mode == "RGBA":
    image = image.convert("RGBA")
    image.putalpha(255)
  elif mode != "RGB":
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buf.getvalue()


def fixture_rng(kind: str, seed: int, split: str) -> np.random.Generator:
  return np.random.default_rng([seed, *(kind + "/" + split).encode()])


def write_bytes(path: epath.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def write_json(path: epath.Path, value: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=1))
