"""The procedurally generated task family of the embedded default.

Foundation suite (pretrains the tiny base; then measures how much of it each method keeps):
  chart_value  chart-like value reading, relaxed accuracy (ChartQA's metric)
  doc_text     document-like text reading, ANLS (DocVQA's metric)
  scene_mc     multiple-choice scene question, circular evaluation (MMBench's protocol)

Specialized tasks (learned one at a time by the continual stream):
  shape_color  colour of the single shape            } related: same images, shared question form
  shape_kind   kind of the single shape              }
  chart_max    position of the tallest bar           } related to each other and to chart_value
  chart_min    position of the shortest bar          }  text_min is its language-only twin
  count_shapes number of shapes, as a digit          related to scene_mc, with a conflicting answer format
  digit_add    sum of the two digits drawn           } language-only twin pair (cross-modal transfer)
  text_add     sum of two digits given in words only }
  text_min     the shortest bar of "bars 3 7 5" (the caption form of a chart), no image (cross-modal twin)
  generic_kind  "what is the answer ?" on a single shape -> its kind         } one generic question, three
  generic_min   "what is the answer ?" on a bar chart -> shortest bar's side } conflicting answer formats; only
  generic_add   "one plus two . what is the answer ?" (no image) -> "3"      } the input tells them apart

Pretraining only (not scored), standing in for a real VLM's broad pretraining:
  echo     "repeat the words : w1 w2" -> "w1 w2" over every answer word of the family, so the base's
           embeddings and LM head know each word before any task uses it;
  caption  "describe the image ." -> "a red circle" / "blue square , green triangle" / "bars 3 7 5",
           so the frozen vision encoder keeps colour, kind and layout (tasks need them later).

Every task is a pure function of a numpy Generator, so a (task, split, index) triple always gives
the same example.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import numpy as np

from drex.data import render

WORDS = ("cat", "dog", "sun", "map", "box", "red", "top", "pen", "cup", "hat", "key", "bag", "car", "bus",
         "net", "fox", "owl", "ant", "bee", "egg", "ice", "jam", "kit", "log", "mud", "nut", "oak", "pig",
         "rat", "web", "zip", "van")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Example:
  """One question. image: [32, 32, 3] uint8 or None (language-only)."""

  image: np.ndarray | None
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Task:
  """A task of the family.

  `make(rng)` draws one training/eval example; for circular multiple choice, `make_group(rng)`
  draws all rotations of one question (scored as correct only if every rotation is right).
  """

  name: str
  suite: str  # 'foundation' | 'specialized'
  metric: str  # 'exact_match' | 'relaxed_accuracy' | 'anls' | 'circular_mc'
  make: Callable[[np.random.Generator], Example]
  description: str
  make_group: Callable[[np.random.Generator], list[Example]] | None = None
  train_size: int = 4096
  test_size: int = 256  # examples (for circular MC: rotations, i.e. groups x options)
  has_image: bool = True  # False: language-only (a blank image is stored, never shown to the model)


# ----------------------------------------------------------------------------- foundation


def _chart_values(rng) -> list[int]:
  return [int(v) for v in rng.integers(1, 10, size=3)]


def chart_value(rng) -> Example:
  values = _chart_values(rng)
  i = int(rng.integers(0, 3))
  return Example(render.draw_bars(rng, values), f"what is the value of the {render.BAR_POSITIONS[i]} bar ?",
                 str(10 * values[i]))


def doc_text(rng) -> Example:
  """A word or a two-digit number on a page."""
  text = str(rng.choice(WORDS)) if rng.random() < 0.5 else str(int(rng.integers(10, 100)))
  return Example(render.draw_text(rng, text), "what is written in the document ?", text)


def _scene(rng) -> tuple[np.ndarray, int]:
  count = int(rng.integers(1, 5))
  items = [(str(rng.choice(render.SHAPES)), str(rng.choice(list(render.COLOURS)))) for _ in range(count)]
  return render.draw_shapes(rng, items), count


def _mc_question(options: list[int]) -> str:
  listed = " ".join(f"{LETTERS[i]} . {o}" for i, o in enumerate(options))
  return f"how many shapes are in the picture ? {listed} answer with the letter ."


def scene_mc(rng) -> Example:
  image, count = _scene(rng)
  options = [int(o) for o in rng.permutation([1, 2, 3, 4])]
  return Example(image, _mc_question(options), LETTERS[options.index(count)])


def scene_mc_group(rng) -> list[Example]:
  """The four circular rotations of one question."""
  image, count = _scene(rng)
  base = [int(o) for o in rng.permutation([1, 2, 3, 4])]
  rotations = [base[s:] + base[:s] for s in range(4)]
  return [Example(image, _mc_question(opts), LETTERS[opts.index(count)]) for opts in rotations]


# ----------------------------------------------------------------------------- specialized


def shape_color(rng) -> Example:
  colour = str(rng.choice(list(render.COLOURS)))
  return Example(render.draw_single_shape(rng, str(rng.choice(render.SHAPES)), colour),
                 "what colour is the shape ?", colour)


def shape_kind(rng) -> Example:
  kind = str(rng.choice(render.SHAPES))
  return Example(render.draw_single_shape(rng, kind, str(rng.choice(list(render.COLOURS)))),
                 "what kind of shape is it ?", kind)


def _distinct_chart(rng) -> list[int]:
  return [int(v) for v in rng.choice(np.arange(1, 10), size=3, replace=False)]


def chart_max(rng) -> Example:
  values = _distinct_chart(rng)
  return Example(render.draw_bars(rng, values), "which bar is the tallest ?",
                 render.BAR_POSITIONS[int(np.argmax(values))])


def chart_min(rng) -> Example:
  values = _distinct_chart(rng)
  return Example(render.draw_bars(rng, values), "which bar is the shortest ?",
                 render.BAR_POSITIONS[int(np.argmin(values))])


def text_min(rng) -> Example:
  """chart_min's question about a chart given as its caption ("bars 3 7 5"), without the image."""
  values = _distinct_chart(rng)
  return Example(None, "bars " + " ".join(map(str, values)) + " . which bar is the shortest ?",
                 render.BAR_POSITIONS[int(np.argmin(values))])


def count_shapes(rng) -> Example:
  image, count = _scene(rng)
  return Example(image, "how many shapes are there ?", str(count))


def _addends(rng) -> tuple[int, int]:
  a, b = (int(v) for v in rng.integers(0, 10, size=2))
  return a, b


def digit_add(rng) -> Example:
  a, b = _addends(rng)
  return Example(render.draw_text(rng, f"{a}+{b}"), "what is the sum of the two digits in the image ?", str(a + b))


def text_add(rng) -> Example:
  a, b = _addends(rng)
  return Example(None, f"what is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} ?", str(a + b))


# One generic question for three tasks whose answers conflict in format (a shape's kind, a side, a
# number): a single LoRA trained on them in turn learns "this question -> the latest format" and
# forgets the earlier ones, while each task's input (shape, chart, words) is distinct per token.
GENERIC_QUESTION = "what is the answer ?"


def generic_kind(rng) -> Example:
  return dataclasses.replace(shape_kind(rng), question=GENERIC_QUESTION)


def generic_min(rng) -> Example:
  return dataclasses.replace(chart_min(rng), question=GENERIC_QUESTION)


def generic_add(rng) -> Example:
  a, b = _addends(rng)
  return Example(None, f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} . {GENERIC_QUESTION}", str(a + b))


ANSWER_WORDS = tuple(sorted(set(WORDS) | set(render.COLOURS) | set(render.SHAPES) | set(render.BAR_POSITIONS)
                            | set(LETTERS) | {str(n) for n in range(100)}))


def caption(rng) -> Example:
  kind = rng.random()
  if kind < 0.5:
    colour, shape = str(rng.choice(list(render.COLOURS))), str(rng.choice(render.SHAPES))
    return Example(render.draw_single_shape(rng, shape, colour), "describe the image .", f"a {colour} {shape}")
  if kind < 0.75:
    items = [(str(rng.choice(render.SHAPES)), str(rng.choice(list(render.COLOURS))))
             for _ in range(int(rng.integers(1, 4)))]
    image, order = render.draw_shapes(rng, items, return_order=True)
    return Example(image, "describe the image .", " , ".join(f"{items[i][1]} {items[i][0]}" for i in order))
  values = _chart_values(rng)
  return Example(render.draw_bars(rng, values), "describe the image .", "bars " + " ".join(map(str, values)))


def echo(rng) -> Example:
  words = [str(w) for w in rng.choice(ANSWER_WORDS, size=int(rng.integers(1, 3)))]
  return Example(None, "repeat the words : " + " ".join(words), " ".join(words))


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("chart_value", "foundation", "relaxed_accuracy", chart_value, "value of a named bar in a bar chart"),
    Task("doc_text", "foundation", "anls", doc_text, "read the word written on a page"),
    Task("scene_mc", "foundation", "circular_mc", scene_mc, "count shapes, answer with an option letter",
         make_group=scene_mc_group),
    Task("shape_color", "specialized", "exact_match", shape_color, "colour of the single shape"),
    Task("shape_kind", "specialized", "exact_match", shape_kind, "kind of the single shape"),
    Task("chart_max", "specialized", "exact_match", chart_max, "position of the tallest bar"),
    Task("chart_min", "specialized", "exact_match", chart_min, "position of the shortest bar"),
    Task("text_min", "specialized", "exact_match", text_min, "shortest bar of a chart given as text (no image)",
         has_image=False),
    Task("count_shapes", "specialized", "exact_match", count_shapes, "number of shapes, as a digit"),
    Task("digit_add", "specialized", "exact_match", digit_add, "sum of the two digits drawn in the image"),
    Task("text_add", "specialized", "exact_match", text_add, "sum of two digits written as words (no image)",
         has_image=False),
    Task("generic_kind", "specialized", "exact_match", generic_kind, "generic question on a single shape: its kind"),
    Task("generic_min", "specialized", "exact_match", generic_min, "generic question on a bar chart: shortest bar"),
    Task("generic_add", "specialized", "exact_match", generic_add, "generic question after two number words: sum",
         has_image=False),
    Task("echo", "auxiliary", "exact_match", echo, "repeat the given answer words (pretraining only)",
         has_image=False),
    Task("caption", "auxiliary", "exact_match", caption, "describe shapes, colours and bars (pretraining only)"),
]}

FOUNDATION = tuple(name for name, t in TASKS.items() if t.suite == "foundation")
SPECIALIZED = tuple(name for name, t in TASKS.items() if t.suite == "specialized")
PRETRAIN_MIX = FOUNDATION + ("echo", "caption")


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  return TASKS[name]


SPLIT_SEEDS = {"train": 0, "test": 1, "pretrain": 2, "validation": 3}
EVAL_SPLITS = ("validation", "test")  # drawn like the test split: test_size examples, MC rotations grouped


def examples(task: Task, split: str, size: int | None = None, seed: int = 0):
  """Deterministic stream of (group id, Example) for a split ('train', 'validation', 'test' or 'pretrain').

  'pretrain' is a separate, larger draw of training examples (the base's pretraining data);
  'validation' is a second draw like 'test', for choosing settings without looking at the test split.
  """
  if split not in SPLIT_SEEDS:
    raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLIT_SEEDS)}")
  rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), SPLIT_SEEDS[split]])
  if size is None:
    size = task.test_size if split in EVAL_SPLITS else task.train_size
  if split in EVAL_SPLITS and task.make_group is not None:
    group = 0
    produced = 0
    while produced < size:
      for ex in task.make_group(rng):
        yield group, ex
        produced += 1
      group += 1
  else:
    for i in range(size):
      yield i, task.make(rng)

