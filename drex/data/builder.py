"""TFDS builder of the procedurally generated task family (array_record, no TensorFlow needed).

One builder config per task (`drex_tasks/<task>`, splits 'train', 'validation' and 'test'), and one per
task of tasks.PRETRAIN_MIX (foundation suite + echo) holding the base's pretraining data
(`drex_tasks/pretrain_<task>`, split 'train' only, PRETRAIN_SIZE examples). Records:
  image      PNG (32x32x3; a blank image for language-only tasks)
  has_image  whether the question is about the image
  question, answer  text
  group      id shared by the rotations of one circular multiple-choice question
  task       the task's name
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from drex.data import render, tasks

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "drex", "tfds")
PRETRAIN_PREFIX = "pretrain_"
PRETRAIN_SIZE = 100_000


class DrexTasks(tfds.core.GeneratorBasedBuilder):
  """The embedded default's tasks: foundation suite + specialized tasks (see drex.data.tasks)."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Records kept in generation order.",
                   "1.2.0": "doc_text reads numbers too; caption pretraining task.",
                   "1.3.0": "validation split (drawn like test) for choosing settings."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=t.description) for name, t in tasks.TASKS.items()
                    ] + [tfds.core.BuilderConfig(name=PRETRAIN_PREFIX + name, description=f"pretraining data: {name}")
                         for name in tasks.PRETRAIN_MIX]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(render.SIZE, render.SIZE, 3), encoding_format="png"),
            "has_image": np.bool_,
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "group": np.int64,
            "task": tfds.features.Text(),
        }),
        homepage="https://github.com/drex-project/drex",
        disable_shuffling=True)  # records stay in generation order: rotations of a question are adjacent

  def _split_generators(self, dl_manager):
    del dl_manager
    name = self.builder_config.name
    if name.startswith(PRETRAIN_PREFIX):
      return {"train": self._generate_examples(name[len(PRETRAIN_PREFIX):], "pretrain", PRETRAIN_SIZE)}
    return {split: self._generate_examples(name, split) for split in ("train", *tasks.EVAL_SPLITS)}

  def _generate_examples(self, name, split, size=None):
    for i, (group, ex) in enumerate(tasks.examples(tasks.get(name), split, size)):
      yield i, _record(name, group, ex)


_BLANK = Image.fromarray(render.canvas())


def _record(task: str, group: int, ex: tasks.Example) -> dict:
  return {"image": _BLANK if ex.image is None else Image.fromarray(ex.image), "has_image": ex.image is not None,
          "question": ex.question, "answer": ex.answer, "group": group, "task": task}


def prepare(task: str, data_dir: str = DEFAULT_DATA_DIR) -> DrexTasks:
  """Build (once) and return the builder of one task (or of its pretraining data, 'pretrain_<task>')."""
  tasks.get(task.removeprefix(PRETRAIN_PREFIX))  # a clear error for unknown names
  builder = DrexTasks(config=task, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder


def prepare_all(names: list[str], data_dir: str = DEFAULT_DATA_DIR, processes: int = 1) -> None:
  """Build several tasks' datasets, in parallel processes when asked (generation is CPU-bound)."""
  if processes <= 1 or len(names) <= 1:
    for name in names:
      prepare(name, data_dir)
    return
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ProcessPoolExecutor(min(processes, len(names)),
                                              mp_context=multiprocessing.get_context("spawn")) as pool:
    list(pool.map(prepare, names, [data_dir] * len(names)))


def data_source(task: str, split: str, data_dir: str = DEFAULT_DATA_DIR):
  """Random-access source of decoded records (image as uint8 [32, 32, 3], text as bytes)."""
  return prepare(task, data_dir).as_data_source(split=split)
