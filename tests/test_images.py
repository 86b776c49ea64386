"""drex.data.images: every PIL mode to RGB, EXIF orientation, header-only sizes, one-line errors, tile counts."""

import io
import pathlib
import struct
import zlib

import numpy as np
import pytest
from etils import epath
from PIL import Image, ImageFile, ImageOps

from drex.data import images


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
  assert img.mode == "RGB"
  return np.asarray(img).astype(np.int32)


def ramp16(mode: str = "I;16", lo: int = 1000, hi: int = 60000) -> Image.Image:
  """A 2-row horizontal ramp lo..hi, 16 bits per pixel, in `mode` (I;16 little- or I;16B big-endian)."""
  row = np.linspace(lo, hi, 64).round().astype(np.uint16)
  values = np.stack([row, row])
  return Image.frombytes(mode, (64, 2), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


# ------------------------------------------------------------------------------------------ modes -> RGB


def test_rgb_uint8_is_bit_identical_from_array_png_and_pil():
  rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  for source in (rgb, encode(Image.fromarray(rgb), "PNG"), Image.fromarray(rgb)):
    out = images.load_image(source)
    assert out.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(out), rgb)
  # tiles of a loaded image are those of the array as the pipeline builds them (Image.fromarray)
  ours = images.dynamic_tiles(images.load_image(rgb), 16, 1, 6)
  ref = images.dynamic_tiles(Image.fromarray(rgb), 16, 1, 6)
  assert len(ours) == len(ref) == 7
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(images.normalize(a), images.normalize(b))


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("PA", "TIFF"), ("RGBA", "WEBP")])
def test_transparency_is_composited_over_white(mode, fmt):
  rgba = np.zeros((4, 6, 4), np.uint8)  # every pixel black, fully transparent ...
  rgba[:, 3:] = (200, 200, 200, 255)  # ... except an opaque grey right half
  rgba[0, 0] = (0, 0, 0, 128)  # and one half-transparent black pixel
  img = Image.fromarray(rgba).convert(mode)
  if fmt != "WEBP":
    assert encode(img, fmt) and Image.open(io.BytesIO(encode(img, fmt))).mode == mode
  for source in (encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), img):
    out = pixels(images.load_image(source))
    assert out.shape == (4, 6, 3)
    assert (out[1:, :3] == 255).all(), "a fully transparent pixel is white (PIL's convert('RGB') gives black)"
    assert (abs(out[:, 3:] - 200) <= 1).all(), "opaque pixels keep their colour"
    assert 120 <= out[0, 0].mean() <= 135, "half-transparent black over white is mid grey"


def test_rgba_array_is_composited_too():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)
  out = pixels(images.load_image(rgba))
  assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("transparency", [None, 0, b"\x00\xff"])
def test_palette_with_and_without_transparency(transparency):
  img = Image.frombytes("P", (4, 1), bytes([0, 1, 1, 0]))
  img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  kwargs = {} if transparency is None else {"transparency": transparency}
  data = encode(img, "PNG", **kwargs)
  assert Image.open(io.BytesIO(data)).mode == "P"
  out = pixels(images.load_image(data))
  assert out.shape == (1, 4, 3)
  assert out[0, 1].tolist() == [200, 100, 50]  # index 1: opaque palette colour
  assert out[0, 0].tolist() == ([10, 20, 30] if transparency is None else [255, 255, 255])


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("1", "PNG"), ("L", "JPEG")])
def test_greyscale_and_bilevel(mode, fmt):
  grey = np.tile(np.array([0, 255], np.uint8).repeat(8), (16, 1))  # left half black, right white
  data = encode(Image.fromarray(grey).convert(mode), fmt)
  assert Image.open(io.BytesIO(data)).mode == mode
  out = pixels(images.load_image(data))
  assert out.shape == (16, 16, 3)
  assert (out[:, :6] <= 10).all() and (out[:, -6:] >= 245).all()
  assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF")])
def test_high_bit_depth_is_stretched_by_value_range(mode, fmt):
  img = ramp16("I;16B" if mode == "I;16B" else "I;16")
  if mode in ("I", "F"):
    img = img.convert(mode)
  data = encode(img, fmt)
  assert Image.open(io.BytesIO(data)).mode == mode
  out = pixels(images.load_image(data))
  assert out.shape == (2, 64, 3)
  row = out[0, :, 0]
  assert row.min() == 0 and row.max() == 255
  assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50, "ordering kept, levels not collapsed"
  assert (row != 255).sum() > 50, "not clipped (PIL's own conversion turns values > 255 white)"


def test_float_image_with_nan_and_constant_levels():
  values = np.linspace(-2.0, 3.0, 30, dtype=np.float32).reshape(3, 10)
  values[0, 0] = np.nan
  out = pixels(images.load_image(Image.fromarray(values, "F")))
  assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and out[0, 1, 0] == 0
  # a constant image keeps its level on the nominal scale of its mode instead of a 0/0 stretch
  assert pixels(images.load_image(Image.new("F", (3, 3), 0.5)))[0, 0, 0] == 128
  assert pixels(images.load_image(Image.new("I;16", (3, 3), 65535)))[0, 0, 0] == 255
  assert pixels(images.load_image(np.full((3, 3), 0, np.uint16)))[0, 0, 0] == 0
  ramp = pixels(images.load_image(np.arange(300, 1300, 10, dtype=np.uint16).reshape(10, 10)))[..., 0]
  assert ramp.min() == 0 and ramp.max() == 255 and (np.diff(ramp.ravel()) >= 0).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
  cmyk = Image.new("CMYK", (8, 4), (0, 0, 0, 0))  # no ink: white
  cmyk.paste((0, 0, 0, 255), (0, 0, 4, 4))  # full black ink on the left half
  cmyk.paste((255, 0, 0, 0), (4, 2, 8, 4))  # full cyan bottom right
  data = encode(cmyk, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  out = pixels(images.load_image(data))
  assert out.shape == (4, 8, 3)
  assert (out[:2, 5:] >= 250).all(), "CMYK white -> RGB white"
  assert (out[:, :3] <= 5).all(), "CMYK black -> RGB black"
  assert out[3, 7, 0] <= 10 and out[3, 7, 1] >= 245 and out[3, 7, 2] >= 245, "cyan"


def test_ycbcr():
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[:2] = (220, 40, 30)
  rgb[2:] = (20, 60, 230)
  data = encode(Image.fromarray(rgb).convert("YCbCr"), "TIFF")
  assert Image.open(io.BytesIO(data)).mode == "YCbCr"
  out = pixels(images.load_image(data))
  assert np.abs(out - rgb).max() <= 3


# ---------------------------------------------------------------------------------------- orientation


def test_exif_rotated_jpeg_is_upright_and_image_size_agrees(tmp_path):
  stored = Image.new("RGB", (40, 20), (0, 0, 255))
  stored.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left half, blue right half
  exif = Image.Exif()
  exif[images.ORIENTATION] = 6  # displayed rotated 90 degrees clockwise
  data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
  path = tmp_path / "rotated.jpg"
  path.write_bytes(data)
  for source in (data, str(path), path, Image.open(io.BytesIO(data))):
    out = images.load_image(source)
    assert out.size == (20, 40) and images.image_size(source) == (20, 40)
    px = pixels(out)
    assert px[:15, :, 0].mean() > 200 and px[:15, :, 2].mean() < 50, "the stored left (red) is on top"
    assert px[-15:, :, 2].mean() > 200 and px[-15:, :, 0].mean() < 50, "the stored right (blue) at the bottom"
  plain = encode(stored, "JPEG")
  assert images.load_image(plain).size == images.image_size(plain) == (40, 20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil_exif_transpose(orientation):
  rgb = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[images.ORIENTATION] = orientation
  data = encode(Image.fromarray(rgb), "PNG", exif=exif.tobytes())
  ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
  out = images.load_image(data)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert images.image_size(data) == out.size == ((6, 10) if orientation >= 5 else (10, 6))


def test_image_size_reads_only_the_header(monkeypatch):
  data = encode(Image.fromarray(np.zeros((30, 70, 3), np.uint8)), "PNG")

  def no_decode(self):
    raise AssertionError("image_size decoded the pixels")

  monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
  assert images.image_size(data) == (70, 30)
  monkeypatch.undo()
  # so a file cut after its header still has a size, while load_image refuses it
  assert images.image_size(data[:len(data) // 2]) == (70, 30)
  with pytest.raises(images.ImageError):
    images.load_image(data[:len(data) // 2])
  assert images.image_size(np.zeros((5, 9, 3), np.uint8)) == (9, 5)
  assert images.image_size(Image.new("L", (4, 6))) == (4, 6)


# ------------------------------------------------------------------------------------------- errors


def zero_width_png() -> bytes:
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def noisy(fmt: str) -> bytes:
  return encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), fmt)


BAD = {
    "corrupt": b"\x89PNG\r\n\x1a\nthis is not an image",
    "truncated_png": noisy("PNG")[:len(noisy("PNG")) // 2],
    "truncated_jpeg": noisy("JPEG")[:len(noisy("JPEG")) // 2],
    "zero_width": zero_width_png(),
    "empty": b"",
    "text": b"hello, not an image at all",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_images_raise_one_line_errors_naming_them(kind, tmp_path):
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  data = BAD[kind]
  path = tmp_path / f"{kind}.img"
  path.write_bytes(data)
  for source, name, shown in ((data, f"record-7/{kind}", f"record-7/{kind}"), (str(path), None, str(path)),
                              (epath.Path(path), None, str(path))):
    with pytest.raises(images.ImageError) as e:
      images.load_image(source, name)
    message = str(e.value)
    assert shown in message and "cannot decode image" in message and "\n" not in message, message
    if kind != "truncated_png" and kind != "truncated_jpeg":  # their header is intact: they have a size
      with pytest.raises(images.ImageError) as e:
        images.image_size(source, name)
      assert shown in str(e.value) and "\n" not in str(e.value)
  if kind == "empty":
    assert "empty" in message
    with pytest.raises(images.ImageError, match="empty"):
      images.image_size(path)
  if kind.startswith("truncated"):
    assert "truncated" in message


def test_missing_file_and_bad_arrays(tmp_path):
  missing = tmp_path / "nowhere" / "x.png"
  for fn in (images.load_image, images.image_size):
    for source in (str(missing), missing):
      with pytest.raises(images.ImageError, match="image file not found") as e:
        fn(source)
      assert str(missing) in str(e.value)
    with pytest.raises(images.ImageError, match="cannot decode image .*tmp"):
      fn(str(tmp_path))  # a directory
  for bad in (np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), np.zeros((2, 2, 2), np.uint8),
              np.zeros((2, 2, 3), np.float32), np.zeros(5, np.uint8)):
    with pytest.raises(images.ImageError, match=r"cannot decode image (my-array|<array)"):
      images.load_image(bad, "my-array" if bad.ndim == 3 else None)
  with pytest.raises(images.ImageError, match="0x5"):
    images.image_size(np.zeros((5, 0, 3), np.uint8))
  for fn in (images.load_image, images.image_size):  # PIL makes 0-sized images in memory (not from files)
    with pytest.raises(images.ImageError, match="cannot decode image page-3 .*0x5"):
      fn(Image.new("RGB", (0, 5)), "page-3")


def test_greyscale_array_and_pathlike_sources(tmp_path):
  grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
  out = pixels(images.load_image(grey))
  assert out.shape == (4, 6, 3) and (out[..., 1] == grey).all()
  assert (pixels(images.load_image(grey[..., None]))[..., 2] == grey).all()
  path = tmp_path / "grey.png"
  Image.fromarray(grey).save(path)
  for source in (path, str(path), epath.Path(path), pathlib.PurePath(path)):
    assert (pixels(images.load_image(source))[..., 0] == grey).all()
    assert images.image_size(source) == (6, 4)


# ----------------------------------------------------------------------------------------- tile counts


def test_tile_count_equals_len_dynamic_tiles():
  tile = 16
  sizes = [(w, h) for w in (1, 5, 8, 16, 17, 24, 31, 32, 48, 64, 96, 130, 200)
           for h in (1, 3, 8, 16, 20, 33, 40, 64, 100, 190)]
  checked = 0
  for min_tiles, max_tiles in ((1, 1), (1, 2), (1, 6), (1, 12), (2, 6), (3, 9)):
    for thumb in (True, False):
      for w, h in sizes:
        expected = len(images.dynamic_tiles(Image.new("RGB", (w, h)), tile, min_tiles, max_tiles, thumb))
        assert images.tile_count(w, h, tile, min_tiles, max_tiles, thumb) == expected, (w, h, max_tiles, thumb)
        checked += expected
  assert checked > 2000
  # the InternVL2 case of the benchmark: a 448-px-high 2:3 image with 6 grid tiles + the thumbnail
  assert images.tile_count(1344, 896, 448, 1, 6) == 7
  assert images.tile_count(448, 448, 448, 1, 6) == 1
  with pytest.raises(ValueError):
    images.tile_count(0, 10, 448)
