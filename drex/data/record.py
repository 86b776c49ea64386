"""The one record format every data source yields and the pipeline reads (drex.data.pipeline.Encoder).

A record is a plain dict:
  images   list of images, in the order their `<image>` placeholders appear: each encoded file bytes
           (PNG/JPEG/... as stored), a file path or URL (str, read with etils.epath when decoded), or a
           decoded uint8 array [H, W, 3]; [] for a text-only record
  turns    list of (user, assistant) text pairs, oldest first; training learns every assistant text,
           evaluation asks the last user text (after the earlier turns) and scores the answer.
           A user text may hold `<image>` placeholders, one per image; if no turn holds any, the
           images are put before the first user text ("<image>\\n" for one image, "Image-1: <image>\\n
           Image-2: <image>\\n..." for several), as InternVL's loader and chat() do.
  golds    acceptable answers to the last turn, for scoring (VQA: the 10 annotators' answers; multiple
           choice: the option letter); the last assistant text when a source has no other
  options  multiple-choice option texts in letter order (A, B, ...), for letter extraction; [] otherwise
  group    id shared by records that are scored together (the rotations of a circular multiple-choice
           question); a record's own index otherwise
  subset   name of a part of the eval set that is scored on its own, the parts' scores then averaged
           (ChartQA: 'human', 'augmented'); '' otherwise
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
KEYS = ("images", "turns", "golds", "options", "group", "subset")


def make(turns: Sequence[tuple[str, str]], images: Sequence[Any] = (), golds: Sequence[str] | None = None,
         options: Sequence[str] = (), group: int = 0, subset: str = "") -> dict:
  """A record; `golds` defaults to the last assistant text."""
  turns = [(str(u), str(a)) for u, a in turns]
  if not turns:
    raise ValueError("a record needs at least one (user, assistant) turn")
  return {"images": list(images), "turns": turns, "golds": [str(g) for g in (golds or [turns[-1][1]])],
          "options": [str(o) for o in options], "group": int(group), "subset": str(subset)}


def text(value) -> str:
  """A TFDS text feature (bytes) or a str, as str."""
  return value.decode() if isinstance(value, bytes) else str(value)


class Mapped(Sequence):
  """A random-access view applying `fn` to each element of `items` (grain's MapDataset.map, but indexable)."""

  def __init__(self, items: Sequence, fn: Callable[[Any], Any]):
    self.items, self.fn = items, fn

  def __len__(self) -> int:
    return len(self.items)

  def __iter__(self):  # by index: TFDS sources raise ValueError, not IndexError, past the end
    return (self[i] for i in range(len(self)))

  def __getitem__(self, i):
    return self.fn(self.items[i])


class Subset(Sequence):
  """The elements of `items` at `index`, in that order."""

  def __init__(self, items: Sequence, index: Sequence[int]):
    self.items, self.index = items, list(index)

  def __len__(self) -> int:
    return len(self.index)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, i):
    return self.items[self.index[i]]
