"""TFDS builder of the procedurally generated task family (array_record, no TensorFlow needed).

One builder config per task (`drex_tasks/<task>`, splits 'train' and 'test'), and
`drex_tasks/foundation_pretrain` (split 'train' only): the base's pretraining data, PRETRAIN_SIZE
examples of each task of tasks.PRETRAIN_MIX (foundation suite + echo), interleaved. Records:
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
PRETRAIN = "foundation_pretrain"
PRETRAIN_SIZE = 50_000


class DrexTasks(tfds.core.GeneratorBasedBuilder):
  """The embedded default's tasks: foundation suite + specialized tasks (see drex.data.tasks)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=t.description) for name, t in tasks.TASKS.items()
                    ] + [tfds.core.BuilderConfig(name=PRETRAIN, description="foundation suite pretraining mix")]

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
        homepage="https://github.com/drex-project/drex")

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.builder_config.name == PRETRAIN:
      return {"train": self._generate_pretrain()}
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    task = tasks.get(self.builder_config.name)
    for i, (group, ex) in enumerate(tasks.examples(task, split)):
      yield i, _record(task.name, group, ex)

  def _generate_pretrain(self):
    streams = [tasks.examples(tasks.get(name), "pretrain", PRETRAIN_SIZE) for name in tasks.PRETRAIN_MIX]
    for i, draws in enumerate(zip(*streams)):
      for j, (name, (group, ex)) in enumerate(zip(tasks.PRETRAIN_MIX, draws)):
        yield i * len(streams) + j, _record(name, group, ex)


_BLANK = Image.fromarray(render.canvas())


def _record(task: str, group: int, ex: tasks.Example) -> dict:
  return {"image": _BLANK if ex.image is None else Image.fromarray(ex.image), "has_image": ex.image is not None,
          "question": ex.question, "answer": ex.answer, "group": group, "task": task}


def prepare(task: str, data_dir: str = DEFAULT_DATA_DIR) -> DrexTasks:
  """Build (once) and return the builder of one task (or of PRETRAIN)."""
  if task != PRETRAIN:
    tasks.get(task)  # a clear error for unknown names
  builder = DrexTasks(config=task, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder


def data_source(task: str, split: str, data_dir: str = DEFAULT_DATA_DIR):
  """Random-access source of decoded records (image as uint8 [32, 32, 3], text as bytes)."""
  return prepare(task, data_dir).as_data_source(split=split)
