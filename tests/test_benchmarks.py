"""Real-benchmark builders (drex.data.benchmarks) on small fixture copies in the published layouts."""

import base64
import csv
import io
import json
import logging
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from drex.data.benchmarks import BENCHMARKS, common, mmbench, prepare, to_record
from drex.errors import UserError

LETTERS = "ABCD"


def _fixture(tmp_path, kind, **kwargs) -> pathlib.Path:
  root = tmp_path / kind
  if kind == "mmbench":
    mmbench.write_fixture(str(root), **kwargs)
  else:
    BENCHMARKS[kind].write_fixture(str(root), **kwargs)
  return root


def _records(builder, split) -> list[dict]:
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def _text(values) -> list[str]:
  return [v.decode() for v in values]


def _counts(builder) -> dict:
  return {name: split.num_examples for name, split in builder.info.splits.items()}


def test_registry_holds_internvl2_eval_settings():
  assert list(BENCHMARKS) == ["chartqa", "docvqa", "mmbench", "textvqa", "scienceqa"]
  got = {k: (b.metric, b.max_new_tokens, b.max_tiles, dict(b.splits)) for k, b in BENCHMARKS.items()}
  assert got["chartqa"] == ("relaxed_accuracy", 100, 13, {"train": "train", "validation": "val", "test": "test"})
  assert got["docvqa"] == ("anls", 100, 19, {"train": "train", "validation": "val", "test": "val"})
  assert got["mmbench"] == ("circular_mc", 100, 7, {"validation": "dev", "test": "dev"})
  assert got["textvqa"] == ("vqa_accuracy", 10, 7, {"train": "train", "validation": "val", "test": "val"})
  assert got["scienceqa"] == ("mc_accuracy", 100, 7, {"train": "train", "validation": "val", "test": "test"})
  assert BENCHMARKS["chartqa"].subsets == ("human", "augmented")
  assert BENCHMARKS["textvqa"].prompt_suffix == " Answer the question using a single word or phrase."
  assert BENCHMARKS["mmbench"].prompt_suffix == "\nAnswer with the option's letter from the given choices directly."


def test_chartqa(tmp_path):
  root = _fixture(tmp_path, "chartqa", size=6)
  builder = prepare("chartqa", str(root), str(tmp_path / "data"))
  assert _counts(builder) == {"train": 6, "val": 6, "test": 6}
  human = json.loads((root / "val" / "val_human.json").read_text())
  augmented = json.loads((root / "val" / "val_augmented.json").read_text())
  records = _records(builder, "val")
  assert [r["subset"] for r in records] == [b"human"] * len(human) + [b"augmented"] * len(augmented)
  assert [int(r["group"]) for r in records] == list(range(6))
  r, published = records[len(human)], augmented[0]  # the first augmented question
  assert r["question"].decode() == published["query"] and r["answer"].decode() == published["label"]
  assert _text(r["answers"]) == [published["label"]] and list(r["options"]) == [] and r["hint"] == b""
  assert _text(r["image_names"]) == [f"val/png/{published['imgname']}"]
  assert r["images"] == [(root / "val" / "png" / published["imgname"]).read_bytes()]
  rec = to_record(r, BENCHMARKS["chartqa"].prompt_suffix)
  assert rec["turns"] == [(published["query"] + " Answer the question using a single word or phrase.",
                           published["label"])]
  assert rec["golds"] == [published["label"]] and rec["subset"] == "augmented" and rec["group"] == len(human)
  assert rec["images"] == r["images"] and rec["options"] == []

  parent = tmp_path / "release"  # manual_dir may be the folder holding 'ChartQA Dataset/'
  shutil.copytree(root, parent / "ChartQA Dataset")
  again = prepare("chartqa", str(parent), str(tmp_path / "data"))
  assert _counts(again) == _counts(builder) and again.data_dir != builder.data_dir
  first = _records(again, "val")[0]
  assert _text(first["image_names"]) == [f"ChartQA Dataset/val/png/{human[0]['imgname']}"]
  assert first["images"] == [(root / "val" / "png" / human[0]["imgname"]).read_bytes()]


def test_docvqa(tmp_path):
  root = _fixture(tmp_path, "docvqa")
  builder = prepare("docvqa", str(root), str(tmp_path / "data"))
  assert _counts(builder) == {"train": 8, "val": 8, "test": 8}
  published = json.loads((root / "val" / "val_v1.0.json").read_text())["data"]
  two = next(i for i, e in enumerate(published) if len(e["answers"]) == 2)
  r = _records(builder, "val")[two]
  assert r["id"].decode() == str(published[two]["questionId"]) and int(r["group"]) == two
  assert r["question"].decode() == published[two]["question"]
  assert _text(r["answers"]) == published[two]["answers"] and r["answer"].decode() == published[two]["answers"][0]
  assert r["images"] == [(root / "val" / published[two]["image"]).read_bytes()]
  test = _records(builder, "test")
  assert all(list(t["answers"]) == [] and t["answer"] == b"" for t in test)
  assert to_record(test[0], BENCHMARKS["docvqa"].prompt_suffix)["golds"] == [""]


def test_textvqa(tmp_path):
  root = _fixture(tmp_path, "textvqa")
  builder = prepare("textvqa", str(root), str(tmp_path / "data"))
  assert _counts(builder) == {"train": 8, "val": 8, "test": 8}
  published = json.loads((root / "TextVQA_0.5.1_val.json").read_text())["data"]
  val = _records(builder, "val")
  tie = val[1]  # 5 'CAR' / 5 'car', 'CAR' first in list order
  assert _text(tie["answers"]) == published[1]["answers"] and len(published[1]["answers"]) == 10
  assert tie["answer"].decode() == published[1]["answers"][0] and tie["answer"].decode().isupper()
  r = val[2]  # 7 / 2 / 1 votes, shuffled
  votes = published[2]["answers"]
  assert r["answer"].decode() == max(set(votes), key=votes.count) and votes.count(r["answer"].decode()) == 7
  assert r["id"].decode() == str(published[2]["question_id"]) and r["question"].decode() == published[2]["question"]
  assert r["images"] == [(root / "train_images" / f"{published[2]['image_id']}.jpg").read_bytes()]  # val images
  rec = to_record(r, BENCHMARKS["textvqa"].prompt_suffix)
  assert rec["turns"] == [(published[2]["question"] + " Answer the question using a single word or phrase.",
                           r["answer"].decode())]
  assert rec["golds"] == votes
  test = _records(builder, "test")
  test_published = json.loads((root / "TextVQA_0.5.1_test.json").read_text())["data"]
  assert all(list(t["answers"]) == [] for t in test)
  assert test[0]["images"] == [(root / "test_images" / f"{test_published[0]['image_id']}.jpg").read_bytes()]


def test_scienceqa(tmp_path):
  root = _fixture(tmp_path, "scienceqa")
  builder = prepare("scienceqa", str(root), str(tmp_path / "data"))
  assert _counts(builder) == {"train": 8, "val": 8, "test": 8, "minival": 4}
  problems = json.loads((root / "problems.json").read_text())
  pids = json.loads((root / "pid_splits.json").read_text())["val"]
  val = _records(builder, "val")
  assert _text(r["id"] for r in val) == pids
  hinted = next(i for i, p in enumerate(pids) if problems[p]["hint"] and problems[p]["image"])
  r, p = val[hinted], problems[pids[hinted]]
  assert _text(r["options"]) == p["choices"] and r["answer"].decode() == LETTERS[p["answer"]]
  assert r["images"] == [(root / "images" / "val" / pids[hinted] / "image.png").read_bytes()]
  listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(p["choices"]))
  rec = to_record(r, BENCHMARKS["scienceqa"].prompt_suffix)
  assert rec["turns"] == [(f"{p['hint']}\n{p['question']}\n{listed}\n"
                           "Answer with the option's letter from the given choices directly.", LETTERS[p["answer"]])]
  assert rec["golds"] == [LETTERS[p["answer"]]] and rec["options"] == p["choices"]
  text_only = next(i for i, pid in enumerate(pids) if problems[pid]["image"] is None)
  assert list(val[text_only]["images"]) == [] and to_record(val[text_only], "")["images"] == []
  assert {len(r["options"]) for r in val} == {2, 3, 4}
  minival = _records(builder, "minival")  # minival problems are val problems: images under images/val/
  assert [r["images"] for r in minival] == [r["images"] for r in val[:4]]


def test_mmbench_generates_rotations(tmp_path):
  root = _fixture(tmp_path, "mmbench", rotated=False)
  builder = prepare("mmbench", str(root), str(tmp_path / "data"))
  with open(root / "mmbench_dev_en_20231003.tsv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert len(rows) == 8
  dev = _records(builder, "dev")
  options = [[row[c] for c in "ABCD" if row[c]] for row in rows]
  assert len(dev) == sum(len(o) for o in options) == _counts(builder)["dev"]
  at = 0
  for row, opts in zip(rows, options):
    rotations, at = dev[at:at + len(opts)], at + len(opts)
    gold_text = opts[LETTERS.index(row["answer"])]
    for k, r in enumerate(rotations):
      assert int(r["group"]) == int(row["index"]) and r["id"].decode() == str(k * 1_000_000 + int(row["index"]))
      assert _text(r["options"]) == opts[k:] + opts[:k]
      assert _text(r["options"])[LETTERS.index(r["answer"].decode())] == gold_text  # the gold follows its option
      assert r["images"] == [base64.b64decode(row["image"])]
    assert len({r["answer"] for r in rotations}) == len(opts)
  hinted = next(i for i, row in enumerate(rows) if row["hint"])
  first = sum(len(o) for o in options[:hinted])
  listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options[hinted]))
  rec = to_record(dev[first], BENCHMARKS["mmbench"].prompt_suffix)
  assert rec["turns"] == [(f"{rows[hinted]['hint']}\n{rows[hinted]['question']}\n{listed}\n"
                           "Answer with the option's letter from the given choices directly.", rows[hinted]["answer"])]
  assert rec["golds"] == [rows[hinted]["answer"]] and rec["group"] == int(rows[hinted]["index"])
  assert dev[0]["hint"] == b"" and to_record(dev[0], "")["turns"][0][0].startswith(rows[0]["question"])
  test = _records(builder, "test")  # no answer column
  assert all(r["answer"] == b"" and list(r["answers"]) == [] for r in test)


def test_mmbench_keeps_published_rotations(tmp_path):
  image = base64.b64encode(common.fixture_image(np.zeros((32, 32, 3), np.uint8), 1)).decode()
  rows = [{"index": 7, "question": "q7", "hint": "nan", "A": "x", "B": "y", "C": "z", "D": "NaN", "answer": "C",
           "image": image},
          {"index": 9, "question": "q9", "A": "u", "B": "v", "answer": "A", "image": image}]
  published = mmbench.rotate(rows)  # originals first, then the copies at k * 1e6 + index
  published[2]["image"] = "7"  # VLMEvalKit's short form: the index of the row holding the image
  mmbench.write_tsv(tmp_path / "tsv" / "MMBench_DEV_EN.tsv", published)
  dev = _records(prepare("mmbench", str(tmp_path / "tsv"), str(tmp_path / "data")), "dev")
  assert len(dev) == len(published) == 5
  assert [int(r["id"]) for r in dev] == [7, 1_000_007, 2_000_007, 9, 1_000_009]  # rows kept, grouped
  assert [int(r["group"]) for r in dev] == [7, 7, 7, 9, 9]
  assert [_text(r["options"]) for r in dev[:3]] == [["x", "y", "z"], ["y", "z", "x"], ["z", "x", "y"]]
  assert [r["answer"] for r in dev] == [b"C", b"B", b"A", b"A", b"B"]
  assert dev[0]["hint"] == b"" and all(r["images"] == [base64.b64decode(image)] for r in dev)


def _message(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("case", ["no_files", "bad_json", "missing_key", "tsv_column", "scienceqa_half",
                                  "two_dev_tsvs", "not_a_dir"])
def test_malformed_copies_are_one_line_user_errors(tmp_path, case):
  kind = {"no_files": "textvqa", "bad_json": "chartqa", "missing_key": "docvqa", "tsv_column": "mmbench",
          "scienceqa_half": "scienceqa", "two_dev_tsvs": "mmbench", "not_a_dir": "docvqa"}[case]
  root = _fixture(tmp_path, kind, size=3)
  if case == "no_files":
    bad = root / "TextVQA_0.5.1_train.json"
    for split in ("train", "val", "test"):
      (root / f"TextVQA_0.5.1_{split}.json").unlink()
    want = [str(root), "TextVQA_0.5.1_{train,val,test}.json"]
  elif case == "bad_json":
    bad = root / "val" / "val_human.json"
    bad.write_text('[\n {"imgname": "a.png",\n  "query": }\n]')
    want = [str(bad), "not valid JSON (line 3)", "{split}_{human,augmented}.json"]
  elif case == "missing_key":
    bad = root / "train" / "train_v1.0.json"
    doc = json.loads(bad.read_text())
    del doc["data"][1]["question"]
    bad.write_text(json.dumps(doc))
    want = [str(bad), "'question'", "data[1]"]
  elif case == "tsv_column":
    bad = root / "mmbench_dev_en_20231003.tsv"
    lines = bad.read_text().split("\n")
    lines[0] = lines[0].replace("\tquestion\t", "\tquery\t")
    bad.write_text("\n".join(lines))
    want = [str(bad), "'question'"]
  elif case == "scienceqa_half":
    (root / "pid_splits.json").unlink()
    want = [str(root / "pid_splits.json"), "is missing"]
  elif case == "two_dev_tsvs":
    shutil.copy(root / "mmbench_dev_en_20231003.tsv", root / "mmbench_dev_cn_20231003.tsv")
    want = ["mmbench_dev_en_20231003.tsv", "mmbench_dev_cn_20231003.tsv", "keep one"]
  else:
    root = root / "nowhere"
    want = [str(root), "not a directory"]
  with pytest.raises(UserError) as excinfo:
    prepare(kind, str(root), str(tmp_path / "data"))
  message = _message(excinfo)
  assert message.startswith(f"{kind}: ") and all(w in message for w in want), message


def test_missing_image_is_stored_empty_with_one_warning(tmp_path, caplog):
  root = _fixture(tmp_path, "docvqa", size=4)
  published = json.loads((root / "val" / "val_v1.0.json").read_text())["data"]
  (root / "val" / published[2]["image"]).unlink()
  (root / "test" / "documents").rename(root / "test" / "moved")
  with caplog.at_level(logging.WARNING):
    builder = prepare("docvqa", str(root), str(tmp_path / "data"))
  val = _records(builder, "val")
  assert val[2]["images"] == [b""] and all(r["images"][0] for i, r in enumerate(val) if i != 2)
  assert all(r["images"] == [b""] for r in _records(builder, "test"))
  warnings = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
  assert len(warnings) == 1 and "5 image file(s) missing" in warnings[0], warnings
  assert f"val/{published[2]['image']}" in warnings[0]


def test_absent_split_is_a_user_error(tmp_path):
  builder = prepare("mmbench", str(_fixture(tmp_path, "mmbench", size=2)), str(tmp_path / "data"))
  with pytest.raises(UserError) as excinfo:
    builder.as_data_source("train")
  message = _message(excinfo)
  assert "'train'" in message and "dev, test" in message


def test_edited_annotation_file_rebuilds(tmp_path):
  root = _fixture(tmp_path, "chartqa", size=4)
  data_dir = tmp_path / "data"
  builder = prepare("chartqa", str(root), str(data_dir))
  assert prepare("chartqa", str(root), str(data_dir)) is builder  # built once
  path = root / "test" / "test_human.json"
  entries = json.loads(path.read_text())
  old = _records(builder, "test")[0]["answer"].decode()
  entries[0]["label"] = "12345"
  path.write_text(json.dumps(entries))
  rebuilt = prepare("chartqa", str(root), str(data_dir))
  assert old != "12345" and _records(rebuilt, "test")[0]["answer"] == b"12345"
  assert rebuilt.data_dir != builder.data_dir and len(list((data_dir / "chartqa").iterdir())) == 2


def test_fixtures_are_deterministic_and_varied(tmp_path):
  for kind, benchmark in BENCHMARKS.items():
    benchmark.write_fixture(str(tmp_path / "a" / kind), seed=3, size=5)
    benchmark.write_fixture(str(tmp_path / "b" / kind), seed=3, size=5)
  files = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in sorted((tmp_path / "a").rglob("*")) if p.is_file()}
  assert files == {p.relative_to(tmp_path / "b"): p.read_bytes()
                   for p in sorted((tmp_path / "b").rglob("*")) if p.is_file()}
  BENCHMARKS["chartqa"].write_fixture(str(tmp_path / "c"), seed=4, size=5)
  assert (tmp_path / "c" / "val" / "val_human.json").read_bytes() != files[pathlib.Path("chartqa/val/val_human.json")]
  images = [Image.open(io.BytesIO(data)) for p, data in files.items() if p.suffix in (".png", ".jpg")]
  with open(tmp_path / "a" / "mmbench" / "mmbench_dev_en_20231003.tsv", newline="") as f:
    images += [Image.open(io.BytesIO(base64.b64decode(row["image"]))) for row in csv.DictReader(f, delimiter="\t")]
  assert {i.format for i in images} == {"PNG", "JPEG"}
  assert {"RGB", "P", "L", "RGBA"} <= {i.mode for i in images}
  assert len({i.size for i in images}) >= 4 and all(i.size[0] != i.size[1] for i in images)
