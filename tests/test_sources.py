"""The data-source registry and real-data streams end to end: every layout drex reads (five benchmarks, an
InternVL JSONL task, a LLaVA JSON task) trained and evaluated through the driver on drex's fixture files."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from drex import base as base_lib
from drex import config as config_lib
from drex import task_data
from drex.cli import load_config_file
from drex.data import benchmarks, fixtures, sources
from drex.errors import UserError
from drex.stream import run_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_resolve_to_embedded_tasks_or_their_specs(tmp_path):
  assert sources.get("generic_kind", data_dir=str(tmp_path)).kind == "embedded"
  with pytest.raises(UserError, match="no config.sources.mine entry"):
    sources.get("mine")
  specs = {"mine": sources.make_spec("llava", train="/x/train.json")}
  source = sources.get("mine", specs)
  assert (source.kind, source.metric, source.max_new_tokens) == ("llava", "exact_match", 0)
  with pytest.raises(UserError, match="has no test split"):
    source.records("test")
  for bad, message in [({"kind": "coco"}, "kind 'coco' is unknown"), ({"kind": "llava", "pathh": "x"}, "unknown keys"),
                       ({"kind": "llava", "metric": "bleu"}, "metric 'bleu' is unknown"),
                       ({"kind": "chartqa", "path": "REQUIRED: the ChartQA folder"}, "path is not set")]:
    with pytest.raises(UserError, match=message) as e:
      sources.get("mine", {"mine": bad})
    assert "\n" not in str(e.value)


def test_benchmark_defaults_come_from_the_benchmark():
  source = sources.get("cq", {"cq": sources.make_spec("chartqa", path="/data/chartqa")})
  bench = benchmarks.BENCHMARKS["chartqa"]
  assert (source.metric, source.max_new_tokens, source.max_tiles, source.subsets) == (
      "relaxed_accuracy", bench.max_new_tokens, bench.max_tiles, ("human", "augmented"))
  tuned = sources.get("cq", {"cq": sources.make_spec("chartqa", path="/d", max_new_tokens=20, prompt_suffix="")})
  assert tuned.max_new_tokens == 20


def test_every_fixture_layout_yields_records(tmp_path):
  root = fixtures.ensure(str(tmp_path / "fixtures"), size=4)
  for name, spec in fixtures.specs(root).items():
    source = sources.get(name, {name: spec}, data_dir=str(tmp_path / "tfds"))
    split = "test" if name != "mmbench" else "validation"
    records = source.records(split)
    assert len(records) >= 4, name
    r = records[0]
    assert set(r) == {"images", "turns", "golds", "options", "group", "subset"}, name
    assert r["turns"] and r["golds"], name
  mc = sources.get("scienceqa", fixtures.specs(root), data_dir=str(tmp_path / "tfds")).records("test")
  asked = [r for r in mc if r["options"]][0]
  assert asked["turns"][0][0].endswith("Answer with the option's letter from the given choices directly.")
  assert asked["golds"][0] in "ABCDE"


def test_unreadable_images_are_left_out_and_counted(tmp_path):
  """A corrupt training image and a missing evaluation image: both records are left out before training,
  counted per split, and the rest is used."""
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (40, 24), (200, 0, 0)).save(images / "red.png")
  (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

  def rec(image, answer):
    return {"id": image, "image": image, "conversations": [{"from": "human", "value": "<image>\nwhat colour ?"},
                                                           {"from": "gpt", "value": answer}]}

  (tmp_path / "train.json").write_text(json.dumps([rec("images/red.png", "red"), rec("images/bad.png", "red"),
                                                   rec("images/red.png", "red")]))
  (tmp_path / "test.json").write_text(json.dumps([rec("images/red.png", "red"), rec("images/gone.png", "red")]))
  cfg = config_lib.stream_config()
  cfg.tasks, cfg.foundation = ("colour",), ()
  cfg.sources = {"colour": sources.make_spec("llava", train=str(tmp_path / "train.json"),
                                             test=str(tmp_path / "test.json"))}
  config_lib.validate(cfg)
  data = task_data.prepare(cfg, base_lib.load())
  assert data.left_out == {"colour/train": 1, "colour/test": 1}
  assert len(data.train["colour"]) == 2 and data.eval_sets["colour"].size == 1


@pytest.fixture(scope="module")
def cl_smoke(tmp_path_factory):
  """`configs/internvl2_2b_cl.py:smoke`, the paper's setting on drex's fixture files, run once."""
  cfg = load_config_file(os.path.join(ROOT, "configs", "internvl2_2b_cl.py:smoke"))
  workdir = str(tmp_path_factory.mktemp("cl_smoke") / "run")
  return cfg, workdir, run_stream(cfg, workdir)


def test_real_data_stream_trains_and_evaluates_every_format(cl_smoke):
  cfg, workdir, results = cl_smoke
  assert results["tasks"] == ["scienceqa", "textvqa", "user_jsonl", "user_llava"]
  assert results["foundation"] == ["chartqa", "docvqa", "mmbench"]
  for method in ("routing", "sequential", "mtl"):
    m = results["methods"][method]
    matrix = np.asarray(m["matrix"])
    assert matrix.shape[1] == 7 and ((0 <= matrix) & (matrix <= 1)).all()
    chartqa = m["final_subset_scores"]["chartqa"]  # ChartQA: human and augmented reported apart, score = their mean
    assert set(chartqa) == {"human", "augmented"}
    assert matrix[-1][4] == pytest.approx(np.mean(list(chartqa.values())))
    assert m["MFN"] == pytest.approx(m["average_accuracy"])
  assert results["methods"]["routing"]["MFT"] is not None and "left_out" not in results
  for task in cfg.tasks:
    assert os.path.exists(os.path.join(workdir, "adapters", task, "metadata.json")), task


def test_real_data_stream_reevaluates_from_disk(cl_smoke):
  cfg, workdir, results = cl_smoke
  again = run_stream(cfg, workdir, eval_only=True, results_name="evaluation.json")
  for method, entry in results["methods"].items():
    assert again["methods"][method]["matrix"] == entry["matrix"], method


def test_adapter_identity_follows_training_data_only(tmp_path):
  """A source's training identity changes with its training file and prompt, not with evaluation settings."""
  train = tmp_path / "train.json"
  train.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
  spec = dict(kind="llava", train=str(train), test=str(train))
  part = lambda **kw: sources.fingerprint_part(sources.get("t", {"t": sources.make_spec(**{**spec, **kw})}))
  same = part()
  assert part(metric="anls") == part(max_new_tokens=50) == part(test=str(tmp_path / "other.json")) == same
  assert part(prompt_suffix=" Answer briefly.") != same and part(max_tiles=3) != same
  train.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"}]}]))
  assert part() != same  # the file was edited
  assert sources.fingerprint_part(sources.get("generic_kind")) is None  # embedded fingerprints as before
  with pytest.raises(UserError, match="does not read"):
    sources.get("generic_kind", {"generic_kind": {"kind": "embedded", "path": "/data"}})


def test_eval_set_keeps_whole_circular_questions():
  from drex import evaluation  # pylint: disable=g-import-not-at-top
  from drex.data import record  # pylint: disable=g-import-not-at-top
  recs = [record.make([("q", "A")], group=g) for g in (7, 7, 7, 3, 3, 9)]
  assert evaluation.make_eval_set("mc", "circular_mc", recs, limit=4).size == 3  # back to the question's start
  first = evaluation.make_eval_set("mc", "circular_mc", recs, limit=1)
  assert first.size == 3 and first.groups == [0, 0, 0]  # forward to its end rather than nothing
  every = evaluation.make_eval_set("mc", "circular_mc", recs)
  assert every.groups == [1, 1, 1, 0, 0, 2] and every.num_groups == 3  # ids remapped densely, any order


def test_withheld_answers_are_refused(tmp_path):
  (tmp_path / "test.json").write_text(json.dumps([
      {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}] * 2))
  cfg = config_lib.stream_config()
  cfg.tasks, cfg.foundation = ("generic_add",), ("hidden",)
  cfg.sources = {"hidden": sources.make_spec("llava", test=str(tmp_path / "test.json"))}
  with pytest.raises(UserError, match="has no answers"):
    task_data.prepare(cfg, base_lib.load())
