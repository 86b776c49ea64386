"""Orbax storage: adapters and bases round-trip exactly; bad checkpoints fail loudly and by name;
nothing is ever overwritten."""

import os
import shutil

import jax
import numpy as np
import pytest

from drex import base as base_lib
from drex import testing
from drex.adapters import lora
from drex.adapters import routers
from drex.checkpoints import store
from drex.data import pipeline
from drex.data.tokenizer import train_bpe
from drex.errors import UserError
from drex.models import vlm


@pytest.fixture(scope="module")
def setup():
  cfg, params, args = testing.micro_model()
  experts = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=2)
  router = testing.random_like(lora.init_router(experts), seed=3)
  return cfg, params, experts, router, args


def test_adapter_roundtrip_gives_identical_logits(setup, tmp_path):
  cfg, params, experts, router, args = setup
  path = str(tmp_path / "adapters" / "task")
  store.save_adapter(path, experts, router, {"task": "task", "r": 4})
  ex2, rt2, meta = store.load_adapter(path, experts, router)
  assert meta == {"task": "task", "r": 4}
  model = vlm.VLM(cfg, lora.AdapterSpec(routers.TopK(k=1)))
  before = model.apply({"params": params, "experts": experts, "router": router}, *args)[0]
  after = model.apply({"params": params, "experts": ex2, "router": rt2}, *args)[0]
  np.testing.assert_array_equal(before, after)
  assert not [p for p in os.listdir(tmp_path / "adapters") if ".tmp" in p]  # no staging left behind


def test_existing_checkpoint_is_never_overwritten(setup, tmp_path):
  _, _, experts, router, _ = setup
  path = str(tmp_path / "a")
  store.save_adapter(path, experts, router, {"v": 1})
  with pytest.raises(UserError, match="refusing to overwrite"):
    store.save_adapter(path, experts, None, {"v": 2})
  assert store.read_json(os.path.join(path, "metadata.json"), "m") == {"v": 1}
  assert os.path.isdir(os.path.join(path, "router"))


def test_shape_mismatch_names_every_offender(setup, tmp_path):
  _, params, experts, _, _ = setup
  path = str(tmp_path / "experts")
  store.write_tree(path, experts)
  other = lora.init_experts(params, 2, ["q_proj", "k_proj"], jax.random.key(0))  # other rank and targets
  with pytest.raises(UserError) as e:
    store.read_tree(path, other, "adapter")
  msg = str(e.value)
  assert "does not fit the model" in msg and "\n" not in msg
  assert "language_model/layers_0/self_attn/q_proj/lora_a has shape (1, 32, 4) but the model expects (1, 32, 2)" in msg
  assert "unexpected language_model/layers_0/mlp/down_proj/lora_a" in msg


def test_missing_and_damaged_files_are_clear_errors(setup, tmp_path):
  _, _, experts, router, _ = setup
  with pytest.raises(UserError, match="adapter metadata not found"):
    store.load_adapter(str(tmp_path / "nothing"))
  path = str(tmp_path / "broken")
  store.save_adapter(path, experts, router, {})
  shutil.rmtree(os.path.join(path, "experts", "d"), ignore_errors=True)
  for name in os.listdir(os.path.join(path, "experts")):
    if name.startswith("ocdbt"):
      shutil.rmtree(os.path.join(path, "experts", name))
  with pytest.raises(UserError, match=r"broken is damaged: .*experts/d/\w+ is missing"):  # named by the manifest
    store.load_adapter(path, experts, router)
  path = str(tmp_path / "altered")
  store.save_adapter(path, experts, router, {})
  with open(os.path.join(path, "metadata.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(UserError, match=r"altered is damaged: .*metadata.json has 9 bytes"):
    store.load_adapter(path)
  os.remove(os.path.join(path, store.MANIFEST))  # a checkpoint from before manifests: the JSON itself is checked
  with pytest.raises(UserError, match="not valid JSON"):
    store.load_adapter(path)


def test_base_roundtrip(setup, tmp_path):
  cfg, params, _, _, _ = setup
  tok = train_bpe(["a b c", "d e"], 40)
  info = store.BaseInfo(cfg, "tiny", pipeline.ImageSpec(16, 1), {"command": "test"})
  store.save_base(str(tmp_path / "base"), params, info, tok)
  loaded = base_lib.load(str(tmp_path / "base"))
  assert loaded.info == info and loaded.info.provenance == {"command": "test"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, params)
  with pytest.raises(UserError, match="base checkpoint directory not found"):
    base_lib.load(str(tmp_path / "nope"))
