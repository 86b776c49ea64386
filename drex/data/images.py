"""Image loading and InternVL's dynamic tiling + normalization.

`load_image` turns whatever a record holds (encoded bytes, a path or URL read with etils.epath, a
decoded array, a PIL image) into an RGB PIL image, the same way for every source:
  * EXIF orientation is applied (as PIL.ImageOps.exif_transpose does), as a viewer shows the photo.
  * Transparency (RGBA, LA, PA, a palette or greyscale with a tRNS colour) is composited over white.
    This follows transformers' `convert_to_rgb` (the HF InternVL processor); OpenGVLab's own loader
    calls `.convert('RGB')`, which drops alpha and shows whatever colour a transparent pixel stores
    (often black: black text on a transparent chart would become black on black).
  * 16-bit and 32-bit greyscale ('I;16', 'I;16B', 'I', 'F') are stretched linearly from their
    actual [min, max] to [0, 255] (PIL's own conversion clips them); a constant image keeps its
    level on the mode's nominal scale. CMYK, YCbCr, '1', 'L', 'P' use PIL's conversion.
  * A missing, empty, corrupt, truncated (ImageFile.LOAD_TRUNCATED_IMAGES stays False) or 0-sized
    image raises `ImageError` with one line naming the image and the reason.
`image_size` reads only the header (orientation included) to count tiles without decoding.

`dynamic_tiles` follows InternVL's `dynamic_preprocess`: among all (cols, rows) grids with
min_tiles <= cols*rows <= max_tiles (ordered by tile count), pick the one whose aspect ratio is
closest to the image's (on an exact tie the later grid wins if the image area exceeds half the
grid's pixel area), resize with PIL bicubic to (cols*size, rows*size), crop row-major, and append
a thumbnail (the whole image resized to size x size) when more than one tile was cut.
`tile_count` gives the number of those tiles from the size alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib
from typing import Any, Iterator, Union

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from drex.errors import UserError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
WHITE = (255, 255, 255, 255)
# EXIF orientation -> the transposition that shows the image upright (as PIL.ImageOps.exif_transpose)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}

# What a source may be: encoded bytes, a path (str / os.PathLike / epath.Path, gs:// included), a decoded
# uint8 array [H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4] (2-D integer or float arrays are stretched), or PIL.
ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, np.ndarray, Image.Image]

# What PIL raises on a corrupt file, besides OSError (truncation, unidentified format) and SyntaxError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError,
                  ZeroDivisionError, zlib.error, Image.DecompressionBombError)


class ImageError(UserError):
  """An image file or record that cannot be decoded (damaged input: a one-line message naming the image)."""


def _label(source: Any, name: str | None) -> str:
  if name:
    return str(name)
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"<{len(source)} bytes>"
  if isinstance(source, np.ndarray):
    return f"<array {source.dtype} {list(source.shape)}>"
  if isinstance(source, Image.Image):
    return f"<PIL image {source.mode} {source.width}x{source.height}>"
  return f"<{type(source).__name__}>"


def _error(label: str, reason: Any) -> ImageError:
  """One line, whatever PIL's message holds."""
  if isinstance(reason, UnidentifiedImageError):
    reason = "not a recognised image format, or a corrupt header"
  elif isinstance(reason, BaseException):
    reason = f"{type(reason).__name__}: {reason}"
  reason = " ".join(str(reason).split())
  return ImageError(f"cannot decode image {label} ({reason}); re-save it as PNG/JPEG or remove it from the dataset")


def _check_size(width: int, height: int, label: str) -> None:
  if width <= 0 or height <= 0:
    raise _error(label, f"it is {width}x{height} pixels")


def _path(source: str | os.PathLike, name: str | None) -> epath.Path:
  """The existing file `source` as an epath.Path (local, gs://, ...); ImageError if missing."""
  path = epath.Path(source)
  try:
    exists, is_dir = path.exists(), path.is_dir()
  except Exception as e:  # pylint: disable=broad-except  (a remote backend's access error)
    raise _error(_label(source, name), e) from None
  if not exists:
    raise ImageError(f"image file not found: {os.fspath(source)}" + (f" (image {name})" if name else ""))
  if is_dir:
    raise _error(_label(source, name), "a directory, not a file")
  return path


@contextlib.contextmanager
def _opened(source: Any, name: str | None) -> Iterator[Image.Image]:
  """The PIL image of encoded bytes or a file, header read, pixels not decoded yet. Any decode error
  raised inside the block (e.g. by img.load()) becomes an ImageError naming the image."""
  label = _label(source, name)
  if isinstance(source, (bytes, bytearray, memoryview)):
    if not len(source):
      raise _error(label, "empty: 0 bytes")
    stream = io.BytesIO(bytes(source))
  elif isinstance(source, (str, os.PathLike)):
    stream = _path(source, name).open("rb")
  else:
    raise ImageError(f"image {label}: expected encoded bytes, a path, a uint8 array or a PIL image, "
                     f"got {type(source).__name__}")
  with stream:
    try:
      if not stream.read(1):
        raise _error(label, "empty: 0 bytes")
      stream.seek(0)
      with Image.open(stream) as img:
        _check_size(img.width, img.height, label)
        yield img
    except ImageError:
      raise
    except _DECODE_ERRORS as e:
      raise _error(label, e) from None


def _stretch(values: np.ndarray, mode: str) -> np.ndarray:
  """Integer / float greyscale -> uint8, its [min, max] mapped linearly onto [0, 255] (NaN -> min,
  +-inf -> the finite ends). A constant image keeps its level on the mode's nominal scale: [0, 1] for
  float in [0, 1], [0, 255] for 'I'/'F' values in [0, 255], [0, 65535] otherwise."""
  a = values.astype(np.float64)
  finite = np.isfinite(a)
  if not finite.any():
    return np.zeros(a.shape, np.uint8)
  lo, hi = float(a[finite].min()), float(a[finite].max())
  a = np.where(np.isnan(a), lo, np.clip(a, lo, hi))
  if hi > lo:
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
  if mode == "F" and 0.0 <= lo <= 1.0:
    full = 1.0
  elif mode in ("I", "F") and 0.0 <= lo <= 255.0:
    full = 255.0
  else:
    full = 65535.0
  return np.full(a.shape, np.clip(round(lo * 255.0 / full), 0, 255), np.uint8)


def _from_array(array: np.ndarray, label: str) -> Image.Image:
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise _error(label, f"an array of shape {list(a.shape)}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
  _check_size(a.shape[1], a.shape[0], label)
  if a.dtype == np.uint8:
    return Image.fromarray(np.ascontiguousarray(a))  # L, RGB or RGBA
  if a.dtype == np.bool_:
    return Image.fromarray(a.astype(np.uint8) * 255)
  if a.ndim == 2 and (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
    return Image.fromarray(_stretch(a, "F" if np.issubdtype(a.dtype, np.floating) else "I"))
  raise _error(label, f"a {a.dtype} array of shape {list(a.shape)}; colour arrays must be uint8")


def _orientation(img: Image.Image) -> int:
  # The EXIF / XMP orientation found in the header, read before any decode by both load_image and image_size
  # (so they agree): PngImageFile.getexif would decode the whole PNG to look for an eXIf chunk after the
  # pixel data, which browsers ignore too (the PNG spec places eXIf before IDAT).
  return int(Image.Image.getexif(img).get(ORIENTATION, 1) or 1)


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB: transparency composited over white, 16/32-bit greyscale stretched by value range."""
  mode = img.mode
  if mode == "RGB":
    return img
  if mode in ("I", "F") or mode.startswith("I;"):
    return Image.fromarray(_stretch(np.asarray(img), mode)).convert("RGB")
  if {"A", "a"} & set(img.getbands()) or img.info.get("transparency") is not None:
    return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), img.convert("RGBA")).convert("RGB")
  return img.convert("RGB")


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
  """Decode `source` (encoded bytes, a path / gs:// URL, a decoded array or a PIL image) to an RGB PIL
  image, EXIF orientation applied; ImageError (one line naming `name` or the path) if it cannot."""
  label = _label(source, name)
  if isinstance(source, (np.ndarray, Image.Image)):
    img = _from_array(source, label) if isinstance(source, np.ndarray) else source
    _check_size(img.width, img.height, label)
    orientation = _orientation(img)
  else:
    if isinstance(source, (str, os.PathLike)):
      source = _path(source, name).read_bytes()
    with _opened(source, name or label) as opened:
      orientation = _orientation(opened)
      opened.load()
      img = opened
  try:
    if orientation in _TRANSPOSE:
      img = img.transpose(_TRANSPOSE[orientation])
    return to_rgb(img)
  except _DECODE_ERRORS as e:
    raise _error(label, e) from None


def image_size(source: ImageSource, name: str | None = None) -> tuple[int, int]:
  """(width, height) of the image `load_image` would return, from the header only (no pixel decode):
  EXIF orientations 5-8 swap the two. Same ImageError rules as load_image."""
  label = _label(source, name)
  if isinstance(source, np.ndarray):
    if source.ndim not in (2, 3):
      raise _error(label, f"an array of shape {list(source.shape)}; expected [H, W] or [H, W, C]")
    _check_size(source.shape[1], source.shape[0], label)
    return int(source.shape[1]), int(source.shape[0])
  if isinstance(source, Image.Image):
    _check_size(source.width, source.height, label)
    return _oriented_size(source)
  with _opened(source, name) as img:
    return _oriented_size(img)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
  return (img.height, img.width) if _orientation(img) in (5, 6, 7, 8) else (img.width, img.height)


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


def tile_count(width: int, height: int, tile: int, min_tiles: int = 1, max_tiles: int = 12,
               use_thumbnail: bool = True) -> int:
  """len(dynamic_tiles(img, tile, min_tiles, max_tiles, use_thumbnail)) for a width x height image,
  without the image (with `image_size`, a dataset's tile and token counts come from headers only)."""
  if width <= 0 or height <= 0:
    raise ValueError(f"tile_count needs a positive image size, got {width}x{height}")
  cols, rows = choose_grid(width, height, tile, min_tiles, max_tiles)
  return cols * rows + (1 if use_thumbnail and cols * rows != 1 else 0)


def normalize(tile: Image.Image | np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] with ImageNet mean/std."""
  return (np.asarray(tile, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
