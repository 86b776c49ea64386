"""InternVL fine-tuning (meta JSON + JSONL) and LLaVA JSON readers (drex.data.conversations)."""

import json
import logging
import os

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from drex.data import conversations, record
from drex.errors import UserError

SINGLE = {"id": "single", "image": "a.png", "width": 96, "height": 64,
          "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape ?"},
                            {"from": "gpt", "value": "red"}]}
MULTI_TURN = {"id": "multi_turn", "image": "b.jpg",
              "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape ?"},
                                {"from": "gpt", "value": "blue"},
                                {"from": "human", "value": "what kind of shape is it ?"},
                                {"from": "gpt", "value": "circle"}]}
TWO_IMAGES = {"id": "two", "image": ["c.png", "sub/d.png"],
              "conversations": [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nwhich is red ?"},
                                {"from": "gpt", "value": "the second"}]}
TWO_IMAGES_NO_PLACEHOLDER = {"id": "two_bare", "image": ["c.png", "d.png"],
                             "conversations": [{"from": "human", "value": "which is red ?"},
                                               {"from": "gpt", "value": "the first"}]}
TEXT_ONLY = {"id": "text", "conversations": [{"from": "human", "value": "what is one plus two ?"},
                                             {"from": "gpt", "value": "3"}]}
RECORDS = [SINGLE, MULTI_TURN, TWO_IMAGES, TWO_IMAGES_NO_PLACEHOLDER, TEXT_ONLY]


def write_jsonl(path, items):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(item) + "\n" for item in items))
  return path


def write_meta(path, entries):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(entries))
  return str(path)


def check_records(records, root):
  root = str(root)
  assert [r["images"] for r in records] == [
      [os.path.join(root, "a.png")], [os.path.join(root, "b.jpg")],
      [os.path.join(root, "c.png"), os.path.join(root, "sub", "d.png")],
      [os.path.join(root, "c.png"), os.path.join(root, "d.png")], []]
  assert records[0]["turns"] == [("<image>\nwhat colour is the shape ?", "red")]
  assert records[1]["turns"] == [("<image>\nwhat colour is the shape ?", "blue"),
                                 ("what kind of shape is it ?", "circle")]
  assert records[3]["turns"] == [("which is red ?", "the first")]
  assert [r["golds"] for r in records] == [["red"], ["circle"], ["the second"], ["the first"], ["3"]]
  assert [r["group"] for r in records] == list(range(len(records)))
  for r in records:
    assert set(r) == set(record.KEYS) and r["options"] == [] and r["subset"] == ""


def test_meta_and_jsonl_give_records_with_full_paths_turns_and_golds(tmp_path):
  write_jsonl(tmp_path / "ann" / "train.jsonl", RECORDS)
  meta = write_meta(tmp_path / "meta.json", {"ds": {"root": str(tmp_path / "imgs"),
                                                   "annotation": str(tmp_path / "ann" / "train.jsonl"),
                                                   "repeat_time": 1, "length": 5, "data_augment": False}})
  check_records(conversations.read_internvl_meta(meta), tmp_path / "imgs")


def test_single_jsonl_without_meta(tmp_path):
  path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
  check_records(conversations.read_internvl_jsonl(str(path), str(tmp_path / "imgs")), tmp_path / "imgs")
  # default root: the JSONL file's directory
  assert conversations.read_internvl_jsonl(str(path))[0]["images"] == [str(tmp_path / "a.png")]


def test_relative_paths_resolve_against_the_meta_files_directory(tmp_path, monkeypatch):
  write_jsonl(tmp_path / "data" / "ann" / "train.jsonl", RECORDS)
  write_meta(tmp_path / "data" / "meta.json", {"ds": {"root": "imgs", "annotation": "ann/train.jsonl",
                                                       "repeat_time": 1, "length": 5}})
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  check_records(conversations.read_internvl_meta(os.path.join("..", "data", "meta.json")),
                tmp_path / "data" / "imgs")


def test_repeat_time_keeps_the_leading_fraction_or_repeats(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [dict(TEXT_ONLY, id=i, conversations=[
      {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]) for i in range(4)])
  write_jsonl(tmp_path / "b.jsonl", [SINGLE, TEXT_ONLY])

  def golds(entries):
    records = conversations.read_internvl_meta(write_meta(tmp_path / "meta.json", entries))
    assert [r["group"] for r in records] == list(range(len(records)))
    return [r["golds"][0] for r in records]

  assert golds({"a": {"root": "", "annotation": "a.jsonl", "repeat_time": 0.5}}) == ["a0", "a1"]
  assert golds({"a": {"root": "", "annotation": "a.jsonl", "repeat_time": 0.3}}) == ["a0"]  # int(4 * 0.3)
  assert golds({"a": {"root": "", "annotation": "a.jsonl", "repeat_time": 2}}) == ["a0", "a1", "a2", "a3"] * 2
  assert golds({"a": {"root": "", "annotation": "a.jsonl", "repeat_time": 2.0}}) == ["a0", "a1", "a2", "a3"] * 2
  assert golds({"a": {"root": "", "annotation": "a.jsonl"}}) == ["a0", "a1", "a2", "a3"]
  # several entries concatenated in file order, each with its own root and repeat_time
  records = conversations.read_internvl_meta(write_meta(tmp_path / "meta.json", {
      "b": {"root": "rb", "annotation": "b.jsonl", "repeat_time": 2},
      "a": {"root": "ra", "annotation": "a.jsonl", "repeat_time": 0.25}}))
  assert [r["golds"][0] for r in records] == ["red", "3", "red", "3", "a0"]
  assert records[0]["images"] == [str(tmp_path / "rb" / "a.png")]
  records[0]["images"].append("x")  # repeated records share no lists
  assert records[2]["images"] == [str(tmp_path / "rb" / "a.png")]


def test_length_mismatch_warns_but_reads(tmp_path, caplog):
  write_jsonl(tmp_path / "a.jsonl", [SINGLE, TEXT_ONLY])
  meta = write_meta(tmp_path / "meta.json", {"a": {"root": "", "annotation": "a.jsonl", "length": 7}})
  with caplog.at_level(logging.WARNING):
    assert len(conversations.read_internvl_meta(meta)) == 2
  assert "length 7" in caplog.text and "a.jsonl" in caplog.text


def test_placeholders_must_match_the_images(tmp_path):
  root = str(tmp_path)
  two = conversations.conversation_record(TWO_IMAGES, root)
  assert two["images"] == [str(tmp_path / "c.png"), str(tmp_path / "sub" / "d.png")]
  assert conversations.conversation_record(TWO_IMAGES_NO_PLACEHOLDER, root)["turns"][0][0] == "which is red ?"
  assert conversations.conversation_record(TEXT_ONLY, root)["images"] == []
  assert conversations.conversation_record(dict(TEXT_ONLY, image=[]), root)["images"] == []
  # a placeholder in a later human turn counts too
  later = {"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                               {"from": "human", "value": "<image>\ncolour ?"},
                                               {"from": "gpt", "value": "red"}]}
  assert len(conversations.conversation_record(later, root)["turns"]) == 2
  one_placeholder = dict(TWO_IMAGES, conversations=[{"from": "human", "value": "<image>\nwhich is red ?"},
                                                    {"from": "gpt", "value": "x"}])
  path = write_jsonl(tmp_path / "bad.jsonl", [SINGLE, one_placeholder])
  with pytest.raises(UserError, match=r"bad\.jsonl line 2 \(id 'two'\).*1 <image> placeholder.*2 image"):
    conversations.read_internvl_jsonl(str(path), root)
  text_with_placeholder = dict(TEXT_ONLY, conversations=[{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}])
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([SINGLE, SINGLE, text_with_placeholder]))
  with pytest.raises(UserError, match=r"bad\.json record 2 \(id 'text'\).*0 image"):
    conversations.read_llava_json(str(path), root)


def test_absolute_image_paths_are_kept(tmp_path):
  item = dict(SINGLE, image=["/data/x.png", "gs://bucket/y.png"],
              conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])
  assert conversations.conversation_record(item, str(tmp_path))["images"] == ["/data/x.png", "gs://bucket/y.png"]


def test_system_turn_is_ignored_and_roles_must_alternate(tmp_path):
  with_system = dict(SINGLE, conversations=[{"from": "system", "value": "be brief"}] + SINGLE["conversations"])
  assert conversations.conversation_record(with_system, str(tmp_path))["turns"] == [
      ("<image>\nwhat colour is the shape ?", "red")]
  for bad in ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
              [{"from": "human", "value": "q"}],
              [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}],
              [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}],
              []):
    with pytest.raises(UserError, match=r"f\.json record 0 \(id 'text'\).*alternate 'human' and 'gpt'"):
      conversations.conversation_record(dict(TEXT_ONLY, conversations=bad), str(tmp_path), source="f.json record 0")


def test_llava_json_gives_the_same_records_as_the_jsonl(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", RECORDS)
  (tmp_path / "train.json").write_text(json.dumps(RECORDS, indent=2))
  root = str(tmp_path / "images")
  llava = conversations.read_llava_json(str(tmp_path / "train.json"), root)
  assert llava == conversations.read_internvl_jsonl(str(tmp_path / "train.jsonl"), root)
  check_records(llava, tmp_path / "images")
  # a meta entry whose annotation is a JSON array reads it the same way
  meta = write_meta(tmp_path / "meta.json", {"a": {"root": "images", "annotation": "train.json"}})
  assert conversations.read_internvl_meta(meta) == llava


def test_paths_as_str_and_epath(tmp_path):
  (tmp_path / "train.json").write_text(json.dumps(RECORDS))
  from_str = conversations.read_llava_json(os.path.join(str(tmp_path), "train.json"), str(tmp_path))
  from_epath = conversations.read_llava_json(epath.Path(tmp_path) / "train.json", epath.Path(tmp_path))
  assert from_str == from_epath
  check_records(from_str, tmp_path)
  assert all(isinstance(p, str) for r in from_epath for p in r["images"])


class _FakeGCS(MemoryFileSystem):
  """An in-memory stand-in for gcsfs (fsspec), behind epath's gs:// backend."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


def test_gs_paths_read_through_epath_fsspec(monkeypatch):
  fake = _FakeGCS()
  _FakeGCS.store.clear()
  monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem", lambda name: fake)
  bucket = epath.Path("gs://bucket/cl")
  assert type(bucket._backend) is type(epath_backend.fsspec_backend)  # pylint: disable=protected-access
  (bucket / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  (bucket / "meta.json").write_text(json.dumps({"ds": {"root": "imgs", "annotation": "train.jsonl"}}))
  (bucket / "llava.json").write_text(json.dumps(RECORDS))
  records = conversations.read_internvl_meta("gs://bucket/cl/meta.json")
  assert records[0]["images"] == ["gs://bucket/cl/imgs/a.png"]
  assert records[2]["images"] == ["gs://bucket/cl/imgs/c.png", "gs://bucket/cl/imgs/sub/d.png"]
  assert conversations.read_llava_json("gs://bucket/cl/llava.json", "gs://bucket/img")[1]["images"] == [
      "gs://bucket/img/b.jpg"]
  with pytest.raises(UserError, match=r"not found: gs://bucket/cl/none\.json"):
    conversations.read_llava_json("gs://bucket/cl/none.json", "gs://bucket/img")
  _FakeGCS.store.clear()


# ----------------------------------------------------------------------------- errors


def test_missing_files(tmp_path):
  with pytest.raises(UserError, match=r"meta file not found: .*nope\.json"):
    conversations.read_internvl_meta(str(tmp_path / "nope.json"))
  with pytest.raises(UserError, match=r"not found: .*nope\.json"):
    conversations.read_llava_json(str(tmp_path / "nope.json"), str(tmp_path))
  with pytest.raises(UserError, match=r"not found: .*nope\.jsonl"):
    conversations.read_internvl_jsonl(str(tmp_path / "nope.jsonl"), str(tmp_path))
  meta = write_meta(tmp_path / "meta.json", {"ds": {"root": "", "annotation": "gone.jsonl"}})
  with pytest.raises(UserError, match=r"annotation file not found: .*gone\.jsonl"):
    conversations.read_internvl_meta(meta)


def test_invalid_json_names_the_file_and_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(SINGLE) + "\n\n" + json.dumps(TEXT_ONLY)[:-3] + "\n")
  with pytest.raises(UserError, match=r"train\.jsonl line 3 is not valid JSON"):
    conversations.read_internvl_jsonl(str(path), str(tmp_path))
  path = tmp_path / "train.json"
  path.write_text("[\n" + json.dumps(SINGLE) + ",\n{oops}\n]")
  with pytest.raises(UserError, match=r"train\.json is not valid JSON: .* line 3"):
    conversations.read_llava_json(str(path), str(tmp_path))
  path.write_text(json.dumps({"not": "a list"}))
  with pytest.raises(UserError, match=r"train\.json must hold a JSON array"):
    conversations.read_llava_json(str(path), str(tmp_path))
  meta = tmp_path / "meta.json"
  meta.write_text('{"ds": {"root": "",\n "annotation": }')
  with pytest.raises(UserError, match=r"meta file .*meta\.json is not valid JSON: .* line 2"):
    conversations.read_internvl_meta(str(meta))


def test_record_errors_name_file_line_and_id(tmp_path):
  no_conversations = {"id": "x1", "image": "a.png"}
  path = write_jsonl(tmp_path / "train.jsonl", [SINGLE, TEXT_ONLY, no_conversations])
  with pytest.raises(UserError, match=r"train\.jsonl line 3 \(id 'x1'\): record has no 'conversations'"):
    conversations.read_internvl_jsonl(str(path), str(tmp_path))
  no_value = dict(SINGLE, id=5, conversations=[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "text": "a"}])
  (tmp_path / "train.json").write_text(json.dumps([SINGLE, no_value]))
  with pytest.raises(UserError, match=r"train\.json record 1 \(id 5\): conversations\[1\] has no 'value'"):
    conversations.read_llava_json(str(tmp_path / "train.json"), str(tmp_path))
  video = {"id": "v", "video": "clip.mp4", "conversations": TEXT_ONLY["conversations"]}
  path = write_jsonl(tmp_path / "video.jsonl", [video])
  with pytest.raises(UserError, match=r"video\.jsonl line 1 \(id 'v'\): video records are not supported"):
    conversations.read_internvl_jsonl(str(path), str(tmp_path))
  bad_image = dict(SINGLE, image=3)
  path = write_jsonl(tmp_path / "img.jsonl", [bad_image])
  with pytest.raises(UserError, match=r"img\.jsonl line 1 \(id 'single'\): 'image' must be a path"):
    conversations.read_internvl_jsonl(str(path), str(tmp_path))


def test_meta_errors(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [SINGLE, TEXT_ONLY])
  cases = [({"ds": {"root": ""}}, r"entry 'ds' has no 'annotation'"),
           ({"ds": {"annotation": "a.jsonl"}}, r"entry 'ds' has no 'root'"),
           ({"ds": {"root": "", "annotation": "a.jsonl", "repeat_time": 1.5}},
            r"entry 'ds' has repeat_time 1\.5.*whole"),
           ({"ds": {"root": "", "annotation": "a.jsonl", "repeat_time": "2"}}, r"entry 'ds' has repeat_time '2'"),
           ({"ds": {"root": "", "annotation": "a.jsonl", "repeat_time": -1}}, r"entry 'ds' has repeat_time -1"),
           ({"ds": "a.jsonl"}, r"entry 'ds' must be an object"),
           ([{"root": "", "annotation": "a.jsonl"}], r"must hold a JSON object")]
  for entries, message in cases:
    meta = write_meta(tmp_path / "meta.json", entries)
    with pytest.raises(UserError, match=r"meta file .*meta\.json.*" + message):
      conversations.read_internvl_meta(meta)


def test_errors_are_one_line(tmp_path):
  path = write_jsonl(tmp_path / "train.jsonl", [{"id": "x", "conversations": [{"from": "human"}]}])
  with pytest.raises(UserError) as info:
    conversations.read_internvl_jsonl(str(path), str(tmp_path))
  assert "\n" not in str(info.value) and str(path) in str(info.value)


# ----------------------------------------------------------------------------- fixture


def test_write_fixture_reads_back(tmp_path):
  paths = conversations.write_fixture(str(tmp_path), seed=3, size=8)
  for key in ("meta", "internvl_train", "internvl_test", "llava_train", "llava_test"):
    assert os.path.isfile(paths[key]), key
  train = conversations.read_internvl_meta(paths["meta"])
  test = conversations.read_internvl_jsonl(paths["internvl_test"], paths["internvl_images"])
  llava_train = conversations.read_llava_json(paths["llava_train"], paths["llava_root"])
  llava_test = conversations.read_llava_json(paths["llava_test"])  # image paths relative to the file's folder
  assert [len(x) for x in (train, test, llava_train, llava_test)] == [8, 8, 8, 8]
  for records in (train, test, llava_train, llava_test):
    # kinds cycle: one image, two with placeholders, two without, text-only, two-turn, one without placeholder
    assert [len(r["images"]) for r in records] == [1, 2, 2, 0, 1, 1, 1, 2]
    assert [len(r["turns"]) for r in records] == [1, 1, 1, 1, 2, 1, 1, 1]
    assert records[1]["turns"][0][0].count("<image>") == 2 and "<image>" not in records[2]["turns"][0][0]
    assert records[0]["turns"][0][0] == "<image>\nwhat colour is the shape ?"
    assert records[0]["golds"][0] in ("red", "green", "blue", "yellow", "purple", "orange")
    formats, sizes = set(), set()
    for r in records:
      for p in r["images"]:
        with Image.open(p) as img:
          formats.add(img.format)
          sizes.add(img.size)
    assert formats == {"PNG", "JPEG"} and all(w != h for w, h in sizes) and len(sizes) > 1
  # the shape's colour is readable from the image: the dominant non-background colour matches the answer
  with Image.open(train[0]["images"][0]) as img:
    pixels = list(img.convert("RGB").getdata())
  brightest = max(set(pixels), key=sum)  # the shape is brighter than its dark background
  from drex.data import render
  colour = min(render.COLOURS, key=lambda c: sum(abs(a - b) for a, b in zip(render.COLOURS[c], brightest)))
  assert colour == train[0]["golds"][0]
  # deterministic: same seed, same files
  again = conversations.write_fixture(str(tmp_path / "again"), seed=3, size=8)
  assert epath.Path(again["meta"]).parent.joinpath("train.jsonl").read_text() == \
      epath.Path(paths["internvl_train"]).read_text()
  assert epath.Path(again["llava_train"]).read_text() == epath.Path(paths["llava_train"]).read_text()
  with open(paths["internvl_images"] + "/train_001.jpg", "rb") as a, \
      open(os.path.join(os.path.dirname(again["internvl_train"]), "images", "train_001.jpg"), "rb") as b:
    assert a.read() == b.read()
  other = conversations.write_fixture(str(tmp_path / "other"), seed=4, size=8)
  assert epath.Path(other["internvl_train"]).read_text() != epath.Path(paths["internvl_train"]).read_text()
