"""Tiny procedural image renderer: shapes, bar charts and text in a 3x5 bitmap font (numpy only)."""

from __future__ import annotations

import numpy as np

SIZE = 32  # image side in pixels

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("square", "circle", "triangle", "diamond")

# 3x5 glyphs, rows top to bottom ('#' = ink).
_GLYPHS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", "+": "... .#. ### .#. ...", "a": ".#. #.# ### #.# #.#",
    "b": "##. #.# ##. #.# ##.", "c": ".## #.. #.. #.. .##", "d": "##. #.# #.# #.# ##.",
    "e": "### #.. ### #.. ###", "f": "### #.. ### #.. #..", "g": ".## #.. #.# #.# .##",
    "h": "#.# #.# ### #.# #.#", "i": "### .#. .#. .#. ###", "j": "..# ..# ..# #.# .#.",
    "k": "#.# #.# ##. #.# #.#", "l": "#.. #.. #.. #.. ###", "m": "#.# ### ### #.# #.#",
    "n": "##. #.# #.# #.# #.#", "o": ".#. #.# #.# #.# .#.", "p": "##. #.# ##. #.. #..",
    "q": ".#. #.# #.# ##. .##", "r": "##. #.# ##. #.# #.#", "s": ".## #.. .#. ..# ##.",
    "t": "### .#. .#. .#. .#.", "u": "#.# #.# #.# #.# ###", "v": "#.# #.# #.# #.# .#.",
    "w": "#.# #.# ### ### #.#", "x": "#.# #.# .#. #.# #.#", "y": "#.# #.# .#. .#. .#.",
    "z": "### ..# .#. #.. ###",
}
FONT = {ch: np.array([[c == "#" for c in row] for row in rows.split()], bool) for ch, rows in _GLYPHS.items()}


def canvas(background: int = 0) -> np.ndarray:
  return np.full((SIZE, SIZE, 3), background, np.uint8)


def jitter_colour(rng: np.random.Generator, name: str) -> np.ndarray:
  """The named colour with +-15 per-channel noise, so colour is a range, not a single value."""
  return np.clip(np.asarray(COLOURS[name]) + rng.integers(-15, 16, 3), 0, 255).astype(np.uint8)


def shape_mask(kind: str, size: int) -> np.ndarray:
  """[size, size] bool mask of a filled shape."""
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  c = size / 2
  if kind == "square":
    return np.ones((size, size), bool)
  if kind == "circle":
    return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
  if kind == "triangle":  # apex up
    return np.abs(xx - c) <= yy / 2
  if kind == "diamond":
    return np.abs(xx - c) + np.abs(yy - c) <= c
  raise ValueError(f"unknown shape {kind!r}; use one of {SHAPES}")


def paste(img: np.ndarray, mask: np.ndarray, top: int, left: int, colour) -> None:
  h, w = mask.shape
  img[top:top + h, left:left + w][mask] = colour


def text_mask(text: str, scale: int) -> np.ndarray:
  """Bitmap of `text` (glyphs 3x5 scaled by `scale`, 1-scaled-pixel spacing)."""
  glyphs = []
  for ch in text:
    if ch not in FONT:
      raise ValueError(f"no glyph for {ch!r} in the bitmap font")
    glyphs.append(np.kron(FONT[ch], np.ones((scale, scale), bool)))
    glyphs.append(np.zeros((5 * scale, scale), bool))
  return np.concatenate(glyphs[:-1], 1)


def draw_text(rng: np.random.Generator, text: str, scale: int = 2) -> np.ndarray:
  """Dark text on a light page at a random position."""
  img = canvas(235 + int(rng.integers(0, 21)))
  mask = text_mask(text, scale)
  h, w = mask.shape
  top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
  paste(img, mask, top, left, np.full(3, rng.integers(0, 60), np.uint8))
  return img


def draw_shapes(rng: np.random.Generator, items: list[tuple[str, str]], cell: int = 8,
                return_order: bool = False):
  """Shapes (kind, colour) on a dark background, one per distinct cell of a (32/cell)^2 grid.

  With return_order, also the item indices in reading order (row-major by cell).
  """
  img = canvas(int(rng.integers(0, 30)))
  cells_per_side = SIZE // cell
  slots = rng.choice(cells_per_side * cells_per_side, size=len(items), replace=False)
  for (kind, colour), slot in zip(items, slots):
    size = int(rng.integers(cell - 3, cell + 1))
    top = (slot // cells_per_side) * cell + int(rng.integers(0, cell - size + 1))
    left = (slot % cells_per_side) * cell + int(rng.integers(0, cell - size + 1))
    paste(img, shape_mask(kind, size), top, left, jitter_colour(rng, colour))
  if return_order:
    return img, [int(i) for i in np.argsort(slots, kind="stable")]
  return img


def draw_single_shape(rng: np.random.Generator, kind: str, colour: str) -> np.ndarray:
  """One large shape (10-16 px) at a random position on a dark background."""
  img = canvas(int(rng.integers(0, 30)))
  size = int(rng.integers(10, 17))
  top, left = rng.integers(0, SIZE - size + 1, size=2)
  paste(img, shape_mask(kind, size), int(top), int(left), jitter_colour(rng, colour))
  return img


BAR_POSITIONS = ("left", "middle", "right")


def draw_bars(rng: np.random.Generator, values: list[int]) -> np.ndarray:
  """A bar chart: one bar per value (1..9 -> 3..27 px tall) on a light background with an axis."""
  img = canvas(240 + int(rng.integers(0, 16)))
  img[30, 1:31] = 0  # x axis
  colours = rng.choice(list(COLOURS), size=len(values), replace=False)
  for i, (v, colour) in enumerate(zip(values, colours)):
    left = 3 + 10 * i
    img[30 - 3 * v:30, left:left + 6] = jitter_colour(rng, str(colour))
  return img
