"""Readers of the instruction-tuning formats users already have (InternVL fine-tuning, LLaVA), as drex records.

Every reader returns a list of records (drex.data.record: images, turns, golds, options, group, subset),
so it can be indexed at random. Only the annotation files are read here: images are returned as full
paths (str) and decoded lazily by the pipeline. All file access goes through etils.epath, so local
paths, `gs://...` paths and epath.Path objects all work.

InternVL fine-tuning format (`read_internvl_meta`, `read_internvl_jsonl`)
  A meta JSON names one or more datasets, read and concatenated in file order:
    {"my_vqa": {"root": "images/", "annotation": "train.jsonl", "repeat_time": 1, "length": 2,
                "data_augment": false, "max_dynamic_patch": 6}}
  `annotation` (required) is a JSONL file, one record a line (an annotation ending in `.json` is read as
  a JSON array, as LLaVA's); `root` (required) is the folder the records' image paths are relative to.
  Relative `annotation` and `root` resolve against the meta file's directory; absolute and `gs://`
  paths are used as given. `repeat_time` (default 1) as InternVL's loader: below 1 keeps that leading
  fraction of the lines (int(n * repeat_time)), above 1 must be a whole number and repeats the list that
  many times. `length` is informational (a warning is logged when it differs from the line count);
  `data_augment` and `max_dynamic_patch` are InternVL training settings and are not used here.
  A JSONL line:
    {"id": 7, "image": "coco/0001.jpg", "width": 640, "height": 480,
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                       {"from": "gpt", "value": "Red."},
                       {"from": "human", "value": "How many wheels can you see?"},
                       {"from": "gpt", "value": "Four."}]}
  `image` is one path or a list of paths (relative to `root`; an absolute or `gs://` path is used as
  given); a record without `image` (or with null / []) is text-only.

LLaVA format (`read_llava_json`): one JSON array of the same records, without a meta file; image paths
  are relative to `image_root`. This is the format of LLaVA-665k (llava_v1_5_mix665k.json) and of the
  CoIN / UCIT / MLLM-CL task files (`<task>/train.json`, `<task>/test.json`):
    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}]}]

Conversion to a record (`conversation_record`, shared by all readers):
  - `conversations` alternates {"from": "human"} and {"from": "gpt"} turns, starting with human and
    ending with gpt; each pair is one (user, assistant) turn, so a multi-turn conversation trains on
    every assistant reply. One leading {"from": "system"} turn is accepted and ignored (InternVL uses it
    as the system prompt; drex uses the model template's own).
  - Each turn's text is its `value` (InternVL's loader reads `value`, not `text`).
  - The number of `<image>` placeholders across the human turns must be 0 (the images are then put
    before the first question) or the number of images, as InternVL asserts.
  - images: the full paths, in order; golds: [the last gpt reply]; options: []; group: the record's
    position in the returned list; subset: ''.
  Records with a `video` key are refused (video is not supported).

`write_fixture` writes small files in these formats (with images from drex.data.render) for tests and
examples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
from etils import epath
from PIL import Image

from drex.data import record, render, tasks
from drex.errors import UserError

PathLike = str | os.PathLike

HUMAN, GPT, SYSTEM = "human", "gpt", "system"


# ----------------------------------------------------------------------------- paths and files


def _is_absolute(path: str) -> bool:
  """An absolute local path or a URL-like path (gs://, s3://, ...): used as given."""
  return "://" in path or os.path.isabs(path)


def _full(path: PathLike) -> str:
  """A path as an absolute str: URL-like paths as given, local paths made absolute."""
  path = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _join(root: str, relative: str) -> str:
  """`relative` under `root`; an absolute or URL-like `relative` as given."""
  if _is_absolute(relative):
    return relative
  if not root:
    return _full(relative)
  return str(epath.Path(root) / relative)


def _read_text(path: str, what: str) -> str:
  p = epath.Path(path)
  try:
    return p.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise UserError(f"{what} not found: {path}; check the path") from None
  except IsADirectoryError:
    raise UserError(f"{what} {path} is a folder; give the file's path") from None
  except UnicodeDecodeError as e:
    raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                    f"re-save it as UTF-8 JSON") from None
  except OSError as e:
    if not p.exists():
      raise UserError(f"{what} not found: {path}; check the path") from None
    raise UserError(f"cannot read {what} {path} ({type(e).__name__}: {e})") from None


def _load_json(text: str, path: str, what: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                    f"fix the file") from None


# ----------------------------------------------------------------------------- record conversion


def _where(source: str, item: Any) -> str:
  if isinstance(item, dict) and "id" in item:
    return f"{source} (id {item['id']!r})"
  return source


def conversation_record(item: Any, image_root: str, group: int = 0, source: str = "record") -> dict:
  """One InternVL / LLaVA chat record as a drex record (see the module docstring).

  image_root: the folder relative image paths are joined to (full paths are kept);
  source: where the record is, for error messages (e.g. "train.jsonl line 3").
  """
  where = _where(source, item)
  if not isinstance(item, dict):
    raise UserError(f"{where}: a record must be a JSON object with 'conversations', got {type(item).__name__}")
  if "video" in item:
    raise UserError(f"{where}: video records are not supported; remove them or give their frames as 'image'")
  if "conversations" not in item:
    raise UserError(f"{where}: record has no 'conversations'; each record needs \"conversations\": "
                    f"[{{\"from\": \"human\", \"value\": ...}}, {{\"from\": \"gpt\", \"value\": ...}}]")
  conversations = item["conversations"]
  if not isinstance(conversations, list):
    raise UserError(f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} objects")
  messages = []
  for k, turn in enumerate(conversations):
    if not isinstance(turn, dict) or "from" not in turn:
      raise UserError(f"{where}: conversations[{k}] must be an object with 'from' and 'value'")
    if "value" not in turn:
      raise UserError(f"{where}: conversations[{k}] has no 'value' (the turn's text; 'text' is not read)")
    if not isinstance(turn["value"], str):
      raise UserError(f"{where}: conversations[{k}]['value'] must be a string, "
                      f"got {type(turn['value']).__name__}")
    messages.append((turn["from"], turn["value"]))
  if messages and messages[0][0] == SYSTEM:
    messages = messages[1:]
  if not messages or len(messages) % 2:
    raise UserError(f"{where}: conversations must alternate 'human' and 'gpt' turns, starting with human and "
                    f"ending with gpt; got {len(messages)} turn(s) ({', '.join(m for m, _ in messages) or 'none'})")
  turns = []
  for k in range(0, len(messages), 2):
    (role_u, user), (role_a, assistant) = messages[k], messages[k + 1]
    if role_u != HUMAN or role_a != GPT:
      raise UserError(f"{where}: conversations must alternate 'human' and 'gpt' turns, starting with human; "
                      f"got {role_u!r} then {role_a!r} (from values {', '.join(repr(m) for m, _ in messages)})")
    turns.append((user, assistant))

  image = item.get("image")
  if image is None:
    paths = []
  elif isinstance(image, str):
    paths = [image]
  elif isinstance(image, list) and all(isinstance(p, str) for p in image):
    paths = list(image)
  else:
    raise UserError(f"{where}: 'image' must be a path (string) or a list of paths, got {image!r}")
  placeholders = sum(u.count(record.IMAGE_PLACEHOLDER) for u, _ in turns)
  if placeholders and placeholders != len(paths):
    raise UserError(f"{where}: {placeholders} {record.IMAGE_PLACEHOLDER} placeholder(s) in the human turns "
                    f"but {len(paths)} image(s); use one placeholder per image, or none")
  images = [_join(image_root, p) for p in paths]
  return record.make(turns, images=images, golds=[turns[-1][1]], group=group)


def _convert_all(items: Sequence[tuple[str, Any]], image_root: str, start: int = 0) -> list[dict]:
  return [conversation_record(item, image_root, group=start + i, source=source)
          for i, (source, item) in enumerate(items)]


# ----------------------------------------------------------------------------- readers


def _jsonl_items(path: str, what: str = "annotation file") -> list[tuple[str, Any]]:
  """(source, parsed line) for every non-blank line of a JSONL file."""
  items = []
  for n, line in enumerate(_read_text(path, what).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      items.append((f"{path} line {n}", json.loads(line)))
    except json.JSONDecodeError as e:
      raise UserError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                      f"a JSONL file holds one JSON object per line") from None
  return items


def _json_array_items(path: str, what: str = "annotation file") -> list[tuple[str, Any]]:
  data = _load_json(_read_text(path, what), path, what)
  if not isinstance(data, list):
    raise UserError(f"{what} {path} must hold a JSON array of records [{{\"image\", \"conversations\"}}, ...], "
                    f"got a JSON {type(data).__name__}")
  return [(f"{path} record {i}", item) for i, item in enumerate(data)]


def read_internvl_jsonl(path: PathLike, root: PathLike | None = None) -> list[dict]:
  """Records of one InternVL fine-tuning JSONL file (one record a line; blank lines skipped).

  root: the folder image paths are relative to (default: the JSONL file's directory).
  """
  path = _full(path)
  root = _full(root) if root is not None else str(epath.Path(path).parent)
  return _convert_all(_jsonl_items(path), root)


def read_llava_json(path: PathLike, image_root: PathLike | None = None) -> list[dict]:
  """Records of a LLaVA-format JSON array (LLaVA-665k, CoIN / UCIT / MLLM-CL task files).

  image_root: the folder image paths are relative to (default: the JSON file's directory).
  """
  path = _full(path)
  root = _full(image_root) if image_root is not None else str(epath.Path(path).parent)
  return _convert_all(_json_array_items(path), root)


def _repeat(items: list, repeat_time: Any, name: str, meta_path: str) -> list:
  if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or repeat_time < 0:
    raise UserError(f"meta file {meta_path}: entry {name!r} has repeat_time {repeat_time!r}; use a number: "
                    f"below 1 keeps that fraction of the lines, above 1 a whole number of repeats")
  if repeat_time < 1:
    return items[:int(len(items) * repeat_time)]
  if repeat_time > 1:
    if float(repeat_time) != int(repeat_time):
      raise UserError(f"meta file {meta_path}: entry {name!r} has repeat_time {repeat_time!r}; above 1 it must "
                      f"be a whole number of repeats (e.g. 2)")
    return items * int(repeat_time)
  return items


def read_internvl_meta(meta_path: PathLike) -> list[dict]:
  """Records of every dataset an InternVL fine-tuning meta JSON names, concatenated in file order.

  Relative `annotation` / `root` paths resolve against the meta file's directory; repeat_time as
  InternVL's loader (applied to the non-blank lines before they are parsed). Groups number the
  returned list 0..n-1 (repeats included).
  """
  meta_path = _full(meta_path)
  meta = _load_json(_read_text(meta_path, "meta file"), meta_path, "meta file")
  if not isinstance(meta, dict) or not meta:
    raise UserError(f"meta file {meta_path} must hold a JSON object "
                    f"{{\"<name>\": {{\"root\": ..., \"annotation\": ..., \"repeat_time\": 1}}, ...}}")
  base = epath.Path(meta_path).parent
  records: list[dict] = []
  for name, entry in meta.items():
    if not isinstance(entry, dict):
      raise UserError(f"meta file {meta_path}: entry {name!r} must be an object with 'root' and 'annotation'")
    for key in ("annotation", "root"):
      if key not in entry:
        raise UserError(f"meta file {meta_path}: entry {name!r} has no {key!r}; each entry needs "
                        f"\"root\" (image folder) and \"annotation\" (JSONL file)")
      if not isinstance(entry[key], str):
        raise UserError(f"meta file {meta_path}: entry {name!r}: {key!r} must be a path string")
    annotation = _join(str(base), entry["annotation"])
    root = _join(str(base), entry["root"])
    if annotation.endswith(".json"):
      items = _json_array_items(annotation)
    else:
      items = _jsonl_items(annotation)
    length = entry.get("length")
    if length is not None and length != len(items):
      logging.warning("meta file %s: entry %r says length %s but %s has %d records", meta_path, name, length,
                      annotation, len(items))
    kept = _repeat(list(range(len(items))), entry.get("repeat_time", 1), name, meta_path)
    for i in kept:  # converted once per copy, so repeated records share no lists
      source, item = items[i]
      records.append(conversation_record(item, root, group=len(records), source=source))
  return records


_HASHED_UP_TO = 256 << 20  # annotation files up to this size are identified by content, larger ones by size + mtime


def files_identity(path: PathLike) -> list[tuple[str, int, str]]:
  """(path, size, sha256 or mtime) of an annotation file and, for a meta JSON, of every annotation file it
  names: what the records read from `path` depend on (an edited file changes it; images are not included)."""
  path = _full(path)
  files = [path]
  if not str(path).endswith((".jsonl", ".json")) or is_meta(path):
    meta = _load_json(_read_text(path, "meta file"), path, "meta file")
    base = epath.Path(path).parent
    files += [_join(str(base), e["annotation"]) for e in meta.values() if isinstance(e, dict) and "annotation" in e]
  out = []
  for f in files:
    st = epath.Path(f).stat()
    content = (hashlib.sha256(epath.Path(f).read_bytes()).hexdigest() if st.length <= _HASHED_UP_TO
               else f"mtime {st.mtime}")
    out.append((str(f), st.length, content))
  return out


def is_meta(path: str) -> bool:
  """A .json file holding an object (a meta file) rather than a list (LLaVA records)."""
  return str(path).endswith(".json") and _read_text(path, "meta file").lstrip().startswith("{")


# ----------------------------------------------------------------------------- fixture

_FIXTURE_SIZES = ((96, 64), (64, 112), (80, 48))  # (width, height), non-square


def _encode(image: np.ndarray, size: tuple[int, int], fmt: str) -> bytes:
  buf = io.BytesIO()
  img = Image.fromarray(image).resize(size, Image.Resampling.NEAREST)
  img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _fixture_records(rng: np.random.Generator, size: int, prefix: str, images_dir: epath.Path,
                     image_prefix: str) -> list[dict]:
  """`size` chat records cycling through single-image, multi-image (with / without placeholders),
  text-only and multi-turn kinds; their images written under images_dir, referenced as image_prefix + name."""
  records = []
  counter = [0]

  def save(image: np.ndarray) -> tuple[str, int, int]:
    k = counter[0]
    counter[0] += 1
    width, height = _FIXTURE_SIZES[k % len(_FIXTURE_SIZES)]
    fmt, ext = ("PNG", "png") if k % 2 == 0 else ("JPEG", "jpg")
    name = f"{prefix}_{k:03d}.{ext}"
    (images_dir / name).write_bytes(_encode(image, (width, height), fmt))
    return image_prefix + name, width, height

  def chat(*pairs: tuple[str, str]) -> list[dict]:
    return [m for u, a in pairs for m in ({"from": HUMAN, "value": u}, {"from": GPT, "value": a})]

  for i in range(size):
    kind = i % 6
    rid = f"{prefix}_{i}"
    if kind == 0:  # one image, placeholder
      ex = tasks.shape_color(rng)
      path, w, h = save(ex.image)
      records.append({"id": rid, "image": path, "width": w, "height": h,
                      "conversations": chat(("<image>\n" + ex.question, ex.answer))})
    elif kind == 1:  # two images with placeholders
      first, second = tasks.shape_color(rng), tasks.shape_color(rng)
      (p1, w1, h1), (p2, w2, h2) = save(first.image), save(second.image)
      question = "Image-1: <image>\nImage-2: <image>\nwhat colour is the shape in the second image ?"
      records.append({"id": rid, "image": [p1, p2], "width_list": [w1, w2], "height_list": [h1, h2],
                      "conversations": chat((question, second.answer))})
    elif kind == 2:  # two images without placeholders
      first, second = tasks.chart_max(rng), tasks.chart_max(rng)
      (p1, w1, h1), (p2, w2, h2) = save(first.image), save(second.image)
      records.append({"id": rid, "image": [p1, p2], "width_list": [w1, w2], "height_list": [h1, h2],
                      "conversations": chat(("which bar is the tallest in the first image ?", first.answer))})
    elif kind == 3:  # text-only
      ex = tasks.text_add(rng)
      records.append({"id": rid, "conversations": chat((ex.question, ex.answer))})
    elif kind == 4:  # multi-turn on one image
      colour = str(rng.choice(list(render.COLOURS)))
      shape = str(rng.choice(render.SHAPES))
      path, w, h = save(render.draw_single_shape(rng, shape, colour))
      records.append({"id": rid, "image": path, "width": w, "height": h,
                      "conversations": chat(("<image>\nwhat colour is the shape ?", colour),
                                            ("what kind of shape is it ?", shape))})
    else:  # one image, no placeholder (put before the question)
      ex = tasks.chart_max(rng)
      path, w, h = save(ex.image)
      records.append({"id": rid, "image": path, "width": w, "height": h,
                      "conversations": chat((ex.question, ex.answer))})
  return records


def write_fixture(root: PathLike, seed: int = 0, size: int = 8) -> dict[str, str]:
  """Small example files in the InternVL and LLaVA formats under `root`; returns their paths.

  Layout (each annotation file holds `size` records cycling through: one image with `<image>`,
  two images with placeholders, two images without, text-only, two-turn, one image without `<image>`;
  images are drex.data.render shapes / bar charts upscaled to non-square sizes, PNG and JPEG):
    internvl/meta.json        {"fixture_train": {"root": "images", "annotation": "train.jsonl", ...}}
    internvl/train.jsonl, internvl/test.jsonl, internvl/images/
    llava/train.json, llava/test.json, llava/images/   (image paths "images/<name>", relative to llava/)
  Keys: meta, internvl_train, internvl_test, internvl_images, llava_train, llava_test, llava_root.
  """
  base = epath.Path(_full(root))
  internvl, llava = base / "internvl", base / "llava"
  for folder in (internvl / "images", llava / "images"):
    folder.mkdir(parents=True, exist_ok=True)

  def rng(k: int) -> np.random.Generator:
    return np.random.default_rng([seed, k])

  train = _fixture_records(rng(0), size, "train", internvl / "images", "")
  test = _fixture_records(rng(1), size, "test", internvl / "images", "")
  (internvl / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
  (internvl / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
  meta = {"fixture_train": {"root": "images", "annotation": "train.jsonl", "data_augment": False,
                            "max_dynamic_patch": 6, "repeat_time": 1, "length": len(train)}}
  (internvl / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

  llava_train = _fixture_records(rng(2), size, "train", llava / "images", "images/")
  llava_test = _fixture_records(rng(3), size, "test", llava / "images", "images/")
  (llava / "train.json").write_text(json.dumps(llava_train, indent=1) + "\n")
  (llava / "test.json").write_text(json.dumps(llava_test, indent=1) + "\n")
  return {"meta": str(internvl / "meta.json"), "internvl_train": str(internvl / "train.jsonl"),
          "internvl_test": str(internvl / "test.jsonl"), "internvl_images": str(internvl / "images"),
          "llava_train": str(llava / "train.json"), "llava_test": str(llava / "test.json"),
          "llava_root": str(llava)}
