"""`python -m drex.export`: a workdir's task expert as a PEFT folder and as a merged transformers
checkpoint (torch-free checks; tests/test_parity.py loads both with peft / transformers)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from drex import base as base_lib
from drex import testing
from drex.adapters import lora
from drex.adapters import routers
from drex.checkpoints import hf_import, peft_export, store
from drex.data import tokenizer as tok_lib
from drex.data.pipeline import ImageSpec
from drex.models import generation, vlm
from drex.models.vlm import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 4, 8.0


def _run(*args, timeout=180):
  proc = subprocess.run([sys.executable, "-m", "drex.export", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


def _random_params(cfg, image, scale: float = 0.3):
  """Random normal leaves of the model's parameter shapes (no init compile)."""
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype),
                                base_lib.param_shapes(VLM(cfg), image))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as drex.train leaves it: base/ (micro model) and adapters/t1/ (one trained expert)."""
  root = tmp_path_factory.mktemp("workdir")
  tokenizer = tok_lib.train_bpe(["what colour is the shape ? red blue"] * 4, 40)
  cfg = dataclasses.replace(testing.micro_config(qkv_bias=True), image_token_id=tokenizer.token_id(tok_lib.IMG_CONTEXT))
  image = ImageSpec(16)
  params = _random_params(cfg, image)
  info = store.BaseInfo(cfg, "Hermes-2", image, {"source": "test"})
  store.save_base(str(root / "base"), params, info, tokenizer)
  experts = lora.init_experts(params, RANK, list(lora.ALL_TARGETS), jax.random.key(2))
  experts = jax.tree_util.tree_map(lambda x, n: x + 0.1 * n, experts, testing.random_like(experts, seed=3, scale=1.0))
  store.save_adapter(str(root / "adapters" / "t1"), experts, lora.init_router(experts),
                     {"r": RANK, "lora_alpha": ALPHA, "rslora": False, "target_modules": list(lora.ALL_TARGETS)})
  return root, cfg, params, experts


def test_peft_export(workdir, tmp_path):
  root, cfg, _, experts = workdir
  code, stdout, err = _run(f"--workdir={root}", "--task=t1", f"--out={tmp_path / 'peft'}")
  assert code == 0, err
  assert json.loads(stdout)["format"] == "PEFT LoRA"
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
  target = re.compile(config["target_modules"])
  assert target.fullmatch("model.language_model.layers.1.self_attn.q_proj")
  assert target.fullmatch("model.language_model.layers.0.mlp.down_proj")
  assert not target.fullmatch("model.vision_tower.encoder.layer.0.attention.q_proj")  # vision has q_proj too
  file = safetensors.safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="numpy")
  assert len(file.keys()) == 2 * 7 * cfg.llm.num_layers
  prefix = "base_model.model.model.language_model.layers.1."
  a = file.get_tensor(prefix + "self_attn.k_proj.lora_A.weight")
  b = file.get_tensor(prefix + "self_attn.k_proj.lora_B.weight")
  module = experts["language_model"]["layers_1"]["self_attn"]["k_proj"]
  assert a.shape == (RANK, cfg.llm.d_model) and b.shape == (cfg.llm.num_kv_heads * cfg.llm.head_dim, RANK)
  np.testing.assert_array_equal(a, np.asarray(module["lora_a"][0]).T)
  np.testing.assert_array_equal(b, np.asarray(module["lora_b"][0]).T)


def test_merged_export_equals_drex_lora(workdir, tmp_path):
  root, cfg, params, experts = workdir
  code, stdout, err = _run(f"--workdir={root}", "--task=t1", f"--out={tmp_path / 'merged'}", "--merged")
  assert code == 0, err
  assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors", "tokenizer.json"]
  hf = json.loads((tmp_path / "merged" / "config.json").read_text())
  assert hf["architectures"] == ["InternVLForConditionalGeneration"] and hf["text_config"]["model_type"] == "qwen2"
  assert hf_import.vlm_config(hf) == cfg
  merged = hf_import.load_params(str(tmp_path / "merged"), cfg, hf)
  batch = testing.micro_batch(cfg, pad=(0, 2))
  mask = jnp.asarray(batch["attention_mask"])
  args = (jnp.asarray(batch["pixel_values"]), jnp.asarray(batch["input_ids"]), vlm.prompt_positions(mask),
          mask.astype(bool))
  with_lora, _ = VLM(cfg, lora.AdapterSpec(routers.Single(0), lora_alpha=ALPHA)).apply(
      {"params": params, "experts": experts}, *args)
  folded, _ = VLM(cfg).apply({"params": merged}, *args)
  real = np.asarray(batch["attention_mask"], bool)
  assert float(np.abs(np.asarray(with_lora) - np.asarray(folded))[real].max()) < 1e-4


def test_export_errors_are_one_line(workdir, tmp_path):
  root = workdir[0]
  code, _, err = _run(f"--workdir={root}", "--task=nope", f"--out={tmp_path / 'x'}")
  lines = [l for l in err if l.startswith("drex.export: error:")]
  assert code == 2 and len(lines) == 1 and not any("Traceback" in l for l in err)
  assert "no adapter for task 'nope'" in lines[0] and "trained tasks: t1" in lines[0]


def test_phi3_fused_lora_is_the_same_function():
  """q/k/v (gate/up) experts -> one LoRA of rank P*r on the fused linear, scale kept by the patterns."""
  cfg = testing.micro_config()
  params = _random_params(cfg, ImageSpec(16))
  experts = testing.random_like(lora.init_experts(params, RANK, list(lora.ALL_TARGETS), jax.random.key(1)), seed=4)
  tensors, fields = peft_export.peft_adapter(experts, 0, cfg, "phi3", RANK, ALPHA, rslora=True)
  assert fields["rank_pattern"] == {"qkv_proj": 3 * RANK, "gate_up_proj": 2 * RANK}
  x = np.random.default_rng(0).normal(size=(5, cfg.llm.d_model)).astype(np.float32)
  scale = ALPHA / np.sqrt(RANK)
  for fused, parts, group in (("qkv_proj", ("q_proj", "k_proj", "v_proj"), "self_attn"),
                              ("gate_up_proj", ("gate_proj", "up_proj"), "mlp")):
    pre = f"base_model.model.model.language_model.layers.0.{group}.{fused}."
    a, b = tensors[pre + "lora_A.weight"], tensors[pre + "lora_B.weight"]
    fused_scale = fields["alpha_pattern"][fused] / np.sqrt(fields["rank_pattern"][fused])
    got = fused_scale * (x @ a.T) @ b.T
    layer = experts["language_model"]["layers_0"][group]
    want = np.concatenate([scale * (x @ np.asarray(layer[p]["lora_a"][0])) @ np.asarray(layer[p]["lora_b"][0])
                           for p in parts], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
