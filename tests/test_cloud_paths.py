"""gs:// paths for workdirs, data and checkpoints: drex reads and writes its own files through etils.epath.

No network: an in-memory fsspec filesystem stands in for gcsfs behind epath's gs:// backend. (Orbax and
TFDS reach GCS through their own drivers; what drex itself reads and writes is checked here.)
"""

import json

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from drex import base as base_lib
from drex import report
from drex.checkpoints import store
from drex.data import benchmarks, tokenizer as tok_lib
from drex.base import tiny_tokenizer


class _FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


@pytest.fixture
def gcs(monkeypatch):
  fake = _FakeGCS()
  _FakeGCS.store.clear()
  _FakeGCS.pseudo_dirs[:] = [""]
  monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem", lambda name: fake)
  return epath.Path("gs://bucket")


def test_json_staging_and_commit_on_gs(gcs):
  path = "gs://bucket/run/results.json"
  store.makedirs("gs://bucket/run")
  store.write_json(path, {"a": np.float32(0.5), "m": np.arange(3)})
  assert store.read_json(path, "results") == {"a": 0.5, "m": [0, 1, 2]}
  assert [p.name for p in (gcs / "run").iterdir()] == ["results.json"]  # no temporary file left
  staging = store.staging_for("gs://bucket/run/adapters/t")
  store.write_json(f"{staging}/metadata.json", {"task": "t"})
  store.commit(staging, "gs://bucket/run/adapters/t")
  assert store.read_json("gs://bucket/run/adapters/t/metadata.json", "metadata") == {"task": "t"}
  assert not store.exists(staging) and store.isdir("gs://bucket/run/adapters/t")
  with pytest.raises(Exception, match="refusing to overwrite"):
    store.staging_for("gs://bucket/run/adapters/t")
  assert store.absolute("gs://bucket/x") == "gs://bucket/x"


def test_report_and_plots_on_gs(gcs):
  matrix = [[0.1, 0.9], [0.8, 0.7]]
  results = {"tasks": ["t"], "foundation": ["f"], "oracle": {"t": 0.8},
             "methods": {"routing": {"columns": ["t", "f"], "rows": ["base", "after t"], "matrix": matrix}},
             "routing_profiles": {"routing": {"experts": ["t"], "profiles": {"t": [[1.0]], "f": [[1.0]]}}}}
  report.write_all("gs://bucket/run", results)
  assert (gcs / "run" / "report.md").read_text().startswith("# drex run report")
  png = (gcs / "run" / "plots" / "matrix_routing.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_round_trip_on_gs(gcs):
  tok = tiny_tokenizer(384)
  store.makedirs("gs://bucket/base")
  tok.save("gs://bucket/base")
  again = tok_lib.Tokenizer.load("gs://bucket/base")
  assert again.encode("what colour is the shape ?") == tok.encode("what colour is the shape ?")


def test_benchmark_built_from_a_gs_manual_dir(gcs, tmp_path):
  benchmarks.BENCHMARKS["chartqa"].write_fixture("gs://bucket/ChartQA", seed=0, size=3)
  built = benchmarks.prepare("chartqa", "gs://bucket/ChartQA", str(tmp_path / "tfds"))
  records = built.as_data_source("test")
  human = json.loads((gcs / "ChartQA" / "test" / "test_human.json").read_text())
  augmented = json.loads((gcs / "ChartQA" / "test" / "test_augmented.json").read_text())
  assert len(records) == len(human) + len(augmented) > 0
  first = human[0]
  assert records[0]["question"].decode() == first["query"]
  assert records[0]["images"][0] == (gcs / "ChartQA" / "test" / "png" / first["imgname"]).read_bytes()


def test_checkpoint_on_gs_is_copied_once_to_a_local_cache(gcs, tmp_path):
  (gcs / "ckpt").mkdir(parents=True)
  (gcs / "ckpt" / "config.json").write_text('{"model_type": "internvl_chat"}')
  (gcs / "ckpt" / "model.safetensors").write_bytes(b"weights")
  local = base_lib.local_copy("gs://bucket/ckpt", str(tmp_path / "cache"))
  assert open(f"{local}/model.safetensors", "rb").read() == b"weights"
  (gcs / "ckpt" / "model.safetensors").write_bytes(b"changed")
  assert base_lib.local_copy("gs://bucket/ckpt", str(tmp_path / "cache")) == local  # reused, not copied again
