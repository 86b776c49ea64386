"""Image loading and InternVL's dynamic tiling + normalization.

`dynamic_tiles` follows InternVL's `dynamic_preprocess`: among all (cols, rows) grids with
min_tiles <= cols*rows <= max_tiles (ordered by tile count), pick the one whose aspect ratio is
closest to the image's (on an exact tie the later grid wins if the image area exceeds half the
grid's pixel area), resize with PIL bicubic to (cols*size, rows*size), crop row-major, and append
a thumbnail (the whole image resized to size x size) when more than one tile was cut.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ImageError(ValueError):
  """An image file or record that cannot be decoded."""


def load_image(source: str | bytes, name: str | None = None) -> Image.Image:
  """Decode an image file path or encoded bytes to an RGB PIL image; a one-line error if corrupt."""
  label = name or (source if isinstance(source, str) else "<bytes>")
  try:
    if isinstance(source, str):
      if not os.path.exists(source):
        raise ImageError(f"image file not found: {source}")
      img = Image.open(source)
    else:
      img = Image.open(io.BytesIO(source))
    img.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ImageError(f"cannot decode image {label} ({type(e).__name__}: {e}); re-save it as PNG/JPEG or "
                     f"remove it from the dataset") from None
  return img.convert("RGB")


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
  """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, sorted by tile count (stable)."""
  grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
           if min_tiles <= i * j <= max_tiles}
  return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
  aspect = width / height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in candidate_grids(min_tiles, max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


def dynamic_tiles(img: Image.Image, tile: int, min_tiles: int = 1, max_tiles: int = 12,
                  use_thumbnail: bool = True) -> list[Image.Image]:
  """Tiles of `img`, each tile x tile, in InternVL's order (row-major, thumbnail last)."""
  cols, rows = choose_grid(img.width, img.height, tile, min_tiles, max_tiles)
  resized = img.resize((tile * cols, tile * rows), Image.BICUBIC)
  tiles = [resized.crop(((k % cols) * tile, (k // cols) * tile, (k % cols + 1) * tile, (k // cols + 1) * tile))
           for k in range(cols * rows)]
  if use_thumbnail and len(tiles) != 1:
    tiles.append(img.resize((tile, tile), Image.BICUBIC))
  return tiles


def normalize(tile: Image.Image | np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] with ImageNet mean/std."""
  return (np.asarray(tile, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
