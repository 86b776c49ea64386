"""HF / OpenGVLab checkpoint import without torch: config parsing (presets agree with the published
configs), tensor plans, dtype handling, error reporting, `drex.base.load` of a checkpoint directory,
sentencepiece tokenizers, the system prompt, and InternVL's dynamic tiling against the reference
algorithm."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from drex import base as base_lib
from drex import testing
from drex.checkpoints import hf_import, peft_export, store, tensor_names
from drex.data import images, prompts
from drex.data import tokenizer as tok_lib
from drex.errors import UserError
from drex.models import presets
from drex.models.vlm import VLM
from drex.parallel import Parallel

# ----------------------------------------------------------------------------- published configs

VISION_300M = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
               "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "image_size": 448,
               "patch_size": 14, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "qkv_bias": True,
               "qk_normalization": False, "hidden_act": "gelu", "drop_path_rate": 0.0, "initializer_factor": 1.0}
TOP = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
       "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
       "ps_version": "v2", "select_layer": -1, "use_thumbnail": True, "torch_dtype": "bfloat16"}
LLM_1B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
          "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "vocab_size": 151655, "tie_word_embeddings": False, "use_sliding_window": False,
          "max_position_embeddings": 32768, "hidden_act": "silu"}
LLM_2B = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 2048,
          "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
          "max_position_embeddings": 32768, "vocab_size": 92553, "bias": False, "tie_word_embeddings": False,
          "hidden_act": "silu"}
LLM_8B = {**LLM_2B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8}
LLM_4B = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
          "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
          "vocab_size": 32020, "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.mark.parametrize("name,llm,template,image_token", [
    ("internvl2_1b", LLM_1B, "Hermes-2", 151648), ("internvl2_2b", LLM_2B, "internlm2-chat", 92546),
    ("internvl2_4b", LLM_4B, "phi3-chat", 32013), ("internvl2_8b", LLM_8B, "internlm2-chat", 92546)])
def test_presets_match_the_published_configs(name, llm, template, image_token):
  hf = {**TOP, "template": template, "vision_config": VISION_300M, "llm_config": llm}
  assert hf_import.vlm_config(hf, image_token) == presets.get(name)
  assert hf_import.template_of(hf) == template == presets.TEMPLATES[name]
  spec = hf_import.image_spec_of(hf)
  assert (spec.tile_size, spec.max_tiles, spec.min_tiles, spec.use_thumbnail) == (448, 13, 1, True)
  assert presets.get(name).tokens_per_tile == 256


def test_preset_names():
  assert presets.get("InternVL2-2B") == presets.internvl2_2b()
  assert presets.get("internvl2_8b", "float32").param_dtype == "float32"
  with pytest.raises(UserError, match="unknown model preset 'internvl2_3b'.*internvl2_1b"):
    presets.get("internvl2_3b")


def test_phi3_longrope_factors_and_magnitude_come_from_the_config():
  factors = [1.0 + i / 10 for i in range(48)]
  llm = {**LLM_4B, "rope_scaling": {"type": "su", "short_factor": factors, "long_factor": factors[::-1]}}
  rope = hf_import.vlm_config({**TOP, "vision_config": VISION_300M, "llm_config": llm}, 32013).llm.rope
  assert rope.kind == "longrope" and rope.short_factor == tuple(factors) and rope.long_factor == tuple(factors[::-1])
  assert (rope.original_max_position_embeddings, rope.max_position_embeddings) == (4096, 131072)


@pytest.mark.parametrize("change,message", [
    ({"ps_version": "v1"}, "pixel shuffle 'v1'"), ({"select_layer": -4}, "select_layer=-4"),
    ({"llm_config": {**LLM_2B, "rope_scaling": {"type": "yarn", "factor": 4.0}}}, "unsupported RoPE scaling 'yarn'"),
    ({"llm_config": {**LLM_2B, "architectures": ["GemmaForCausalLM"], "model_type": "gemma"}}, "unsupported language")])
def test_unsupported_configs_are_one_line_errors(change, message):
  hf = {**TOP, "template": "internlm2-chat", "vision_config": VISION_300M, "llm_config": LLM_2B, **change}
  with pytest.raises(UserError, match=message):
    hf_import.vlm_config(hf, 92546)


def test_internlm2_wqkv_split_follows_the_kv_group_interleave():
  cfg = dataclasses.replace(presets.internvl2_2b().llm, num_heads=6, num_kv_heads=2, head_dim=3, d_model=5)
  h, k, d, g = 6, 2, 3, 3
  rows = np.arange((h + 2 * k) * d)[:, None] * np.ones((1, 5))  # row r holds the value r
  q, kk, v = tensor_names.KVGroupQKV(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim).to_drex(rows)  # kernels (in, out)
  for head in range(h):  # query head h at rows (h//G)(G+2)D + (h%G)D ...
    start = (head // g) * (g + 2) * d + (head % g) * d
    np.testing.assert_array_equal(q[0, head * d:(head + 1) * d], np.arange(start, start + d))
  for group in range(k):
    start = group * (g + 2) * d
    np.testing.assert_array_equal(kk[0, group * d:(group + 1) * d], np.arange(start + g * d, start + (g + 1) * d))
    np.testing.assert_array_equal(v[0, group * d:(group + 1) * d], np.arange(start + (g + 1) * d, start + (g + 2) * d))



@pytest.mark.parametrize("layout,family", [("hf", "qwen2"), ("hf", "llama"), ("hf", "phi3"), ("opengvlab", "qwen2"),
                                           ("opengvlab", "internlm2"), ("opengvlab", "phi3")])
def test_every_tensor_of_the_plan_round_trips_through_its_transform(layout, family):
  """Import and export read the same plan: each link's to_hf inverts its to_drex, names are unique."""
  cfg = testing.micro_config(qkv_bias=family == "qwen2")
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, qk_norm=True))
  names = tensor_names.NATIVE if layout == "hf" else tensor_names.names_in(layout, family, [])
  links = tensor_names.plan(cfg, family, names)
  hf_names = [n for link in links for n in link.hf]
  paths = [p for link in links for p in link.params]
  assert len(set(hf_names)) == len(hf_names) and len(set(paths)) == len(paths)
  rng = np.random.default_rng(0)
  for link in links:
    tensors = [rng.normal(size=shape).astype(np.float32) for shape in link.shapes]
    back = link.to_hf(*link.to_drex(*tensors))
    assert len(back) == len(tensors), link.hf
    for want, got in zip(tensors, back):
      np.testing.assert_array_equal(got, want, err_msg=str(link.hf))

# ----------------------------------------------------------------------------- round trips and errors


_MICRO = {}


def _micro(image_token_id: int = testing.IMAGE_TOKEN):
  """A micro model with random weights (cached: the params do not depend on the image token id)."""
  cfg = dataclasses.replace(testing.micro_config(qkv_bias=True), image_token_id=image_token_id)
  if "params" not in _MICRO:  # random normal leaves of the model's shapes (no init compile needed)
    rng = np.random.default_rng(1)
    _MICRO["params"] = jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype),
                                              _expected(cfg))
  return cfg, _MICRO["params"]


def store_image_spec():
  from drex.data.pipeline import ImageSpec  # pylint: disable=g-import-not-at-top
  return ImageSpec(16)


def _expected(cfg):
  return base_lib.param_shapes(VLM(cfg), store_image_spec())


def _assert_trees_equal(a, b):
  fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for path in fa:
    np.testing.assert_array_equal(np.asarray(fa[path], np.float32), np.asarray(fb[path], np.float32), err_msg=str(path))


def test_native_export_imports_back_exactly(tmp_path):
  cfg, params = _micro()
  peft_export.export_merged(str(tmp_path), params, cfg, "qwen2")
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf_import.vlm_config(hf) == cfg
  _assert_trees_equal(hf_import.load_params(str(tmp_path), cfg, expected=_expected(cfg)), params)


def test_bf16_checkpoint_loads_into_float32_and_bfloat16(tmp_path):
  cfg, params = _micro()
  peft_export.export_merged(str(tmp_path), params, cfg, "qwen2", dtype="bfloat16")
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf_import.vlm_config(hf).param_dtype == "bfloat16"
  rounded = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
  _assert_trees_equal(hf_import.load_params(str(tmp_path), cfg, hf), rounded)  # cfg is float32
  as_bf16 = hf_import.load_params(str(tmp_path), hf_import.vlm_config(hf), hf)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(as_bf16))
  _assert_trees_equal(as_bf16, rounded)


def test_sharded_checkpoint_with_index(tmp_path):
  cfg, params = _micro()
  files = peft_export.export_merged(str(tmp_path), params, cfg, "llama" if not cfg.llm.qkv_bias else "qwen2",
                                    max_shard_bytes=20_000)
  assert len(files) > 2 and (tmp_path / hf_import.INDEX_FILE).exists()
  _assert_trees_equal(hf_import.load_params(str(tmp_path), cfg), params)
  os.remove(tmp_path / files[1])
  with pytest.raises(UserError, match=f"names shard {files[1]}, which is not there"):
    hf_import.load_params(str(tmp_path), cfg)


def test_missing_extra_and_misshaped_tensors_are_all_named_in_one_error(tmp_path):
  cfg, params = _micro()
  peft_export.export_merged(str(tmp_path / "good"), params, cfg, "qwen2")
  good = hf_import.Checkpoint(str(tmp_path / "good"))
  tensors = {name: good.array(name) for name in good.names()}
  del tensors["model.language_model.norm.weight"]
  tensors["model.language_model.layers.0.mlp.extra.weight"] = np.zeros((3, 3), np.float32)
  tensors["model.vision_tower.encoder.layer.0.attention.q_proj.weight"] = np.zeros((16, 15), np.float32)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
  safetensors.numpy.save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(UserError) as e:
    hf_import.load_params(str(bad), cfg)
  msg = str(e.value)
  assert "3 problem(s)" in msg and "\n" not in msg
  assert "missing model.language_model.norm.weight (expected shape (32,))" in msg
  assert "unexpected model.language_model.layers.0.mlp.extra.weight (3, 3)" in msg
  assert "model.vision_tower.encoder.layer.0.attention.q_proj.weight has shape (16, 15) but the config expects (16, 16)" in msg


def test_truncated_file_is_a_user_error(tmp_path):
  cfg, params = _micro()
  peft_export.export_merged(str(tmp_path), params, cfg, "qwen2")
  path = tmp_path / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(UserError, match="truncated"):
    hf_import.load_params(str(tmp_path), cfg)



def test_float8_checkpoint_loads(tmp_path):
  """float8 tensors (which the safetensors package cannot hand to numpy) are read from the file."""
  cfg, params = _micro()
  peft_export.export_merged(str(tmp_path / "f32"), params, cfg, "qwen2")
  f32 = hf_import.Checkpoint(str(tmp_path / "f32"))
  (tmp_path / "f8").mkdir()
  (tmp_path / "f8" / "config.json").write_text((tmp_path / "f32" / "config.json").read_text())
  safetensors.numpy.save_file({n: f32.array(n).astype(ml_dtypes.float8_e4m3fn) for n in f32.names()},
                              str(tmp_path / "f8" / "model.safetensors"))
  assert hf_import.Checkpoint(str(tmp_path / "f8")).dtype_code("lm_head.weight") == "F8_E4M3"
  rounded = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.float8_e4m3fn).astype(np.float32), params)
  _assert_trees_equal(hf_import.load_params(str(tmp_path / "f8"), cfg), rounded)

def test_base_load_imports_a_checkpoint_directory_sharded_onto_the_mesh(tmp_path):
  tokenizer = tok_lib.train_bpe(["what colour is the shape ? red blue green"] * 4, 40)
  cfg, params = _micro(image_token_id=tokenizer.token_id(tok_lib.IMG_CONTEXT))
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=48))
  peft_export.export_merged(str(tmp_path / "hf"), params, cfg, "qwen2", tokenizer=tokenizer)
  assert hf_import.is_checkpoint_dir(str(tmp_path / "hf")) and not hf_import.is_checkpoint_dir(base_lib.shipped_path())
  parallel = Parallel.create((1, 1, 1), devices=jax.devices()[:1])
  base = base_lib.load(str(tmp_path / "hf"), parallel)
  assert base.info.model == cfg and base.info.template == "Hermes-2"
  assert (base.info.image.tile_size, base.info.image.max_tiles, base.info.image.use_thumbnail) == (16, 13, True)
  assert base.info.provenance["format"] == "hf" and base.info.provenance["llm_family"] == "qwen2"
  leaf = base.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
  _assert_trees_equal(base.params, params)
  encoder = base.encoder()
  assert encoder.tokens_per_tile == 4
  # A workdir keeps it as a drex base, which loads back the same.
  store.save_base(str(tmp_path / "drex"), base.params, base.info, base.tokenizer)
  again = base_lib.load(str(tmp_path / "drex"))
  assert again.info == base.info and again.info.provenance["llm_family"] == "qwen2"
  _assert_trees_equal(again.params, params)


# ----------------------------------------------------------------------------- tokenizers and prompts


def test_internvl_system_message_is_byte_identical_to_conversation_py():
  # sha256 of the UTF-8 bytes of OpenGVLab/InternVL internvl_chat/internvl/conversation.py's system_message
  # for 'Hermes-2', 'internlm2-chat' and 'phi3-chat' (checked against the repository at 2410d1d).
  digest = hashlib.sha256(prompts.INTERNVL_SYSTEM.encode()).hexdigest()
  assert digest == "da22fdde9f422876a0b725a4ecec9f15005bfaad700d33c87fe6f29b0bd09447"
  assert len(prompts.INTERNVL_SYSTEM) == 59 and "，" in prompts.INTERNVL_SYSTEM and "InternVL, " in prompts.INTERNVL_SYSTEM


def test_image_prompt_matches_internvl_chat():
  """chat(): '<image>\\n' + question, then the first '<image>' -> <img> + <IMG_CONTEXT> x 256n + </img>."""
  template = prompts.get_template("internlm2-chat")
  n = 256 * 3
  chat = ("<|im_start|>system\n" + prompts.INTERNVL_SYSTEM + "<|im_end|>" + "<|im_start|>user\n" + "<image>\nQ?"
          + "<|im_end|>" + "<|im_start|>assistant\n").replace("<image>", "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
  assert template.prompt("Q?", n) == "<s>" + chat  # the InternLM2 tokenizer adds <s>
  assert prompts.get_template("Hermes-2").prompt("Q?", n) == chat  # Qwen2 adds no BOS


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  directory = tmp_path_factory.mktemp("sp")
  model = io.BytesIO()
  text = ["the chart shows the largest bar", "what colour is the shape", "answer the question using a word"] * 20
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=32,
                                 user_defined_symbols=["<|im_start|>", "<|im_end|>"], bos_id=1, eos_id=2, unk_id=0,
                                 pad_id=-1, minloglevel=2)
  (directory / "tokenizer.model").write_bytes(model.getvalue())
  proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
  # Like InternLM2's tokenizer_config.json: the chat tokens (inside the sp model) and the InternVL tokens
  # (after it) are added tokens.
  added = {str(proc.piece_to_id(t)): {"content": t, "special": True} for t in ["<|im_start|>", "<|im_end|>"]}
  added.update({str(32 + i): {"content": t, "special": True} for i, t in enumerate(["<img>", "</img>", "<IMG_CONTEXT>"])})
  (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
  return directory


def test_sentencepiece_tokenizer_handles_added_and_control_tokens(sp_dir, tmp_path):
  tok = tok_lib.Tokenizer.load(str(sp_dir))
  assert tok.kind == "sentencepiece" and tok.vocab_size == 35
  assert tok.token_id("<IMG_CONTEXT>") == 34 and tok.token_id("<s>") == 1 and tok.token_id("<|im_end|>") > 2
  prompt = prompts.get_template("internlm2-chat").prompt("what colour is the shape", 4)
  ids = tok.encode(prompt)
  assert ids[0] == 1 and ids.count(34) == 4 and ids.count(32) == 1 and ids.count(33) == 1
  assert ids[1] == tok.token_id("<|im_start|>") and tok.token_id("<|im_end|>") in ids
  assert tok.decode(tok.encode("the chart shows")) == "the chart shows"
  assert tok.decode(tok.encode("<s>the chart<IMG_CONTEXT>")) == "the chart"  # specials skipped
  with pytest.raises(ValueError, match="no token '<quad>'"):
    tok.token_id("<quad>")
  tok.save(str(tmp_path))
  again = tok_lib.Tokenizer.load(str(tmp_path))
  assert again.encode(prompt) == ids and again.vocab_size == 35


# ----------------------------------------------------------------------------- dynamic tiling vs the reference


def reference_grid(width: int, height: int, image_size: int, min_num: int, max_num: int) -> tuple[int, int]:
  """InternVL's dynamic_preprocess grid choice, restated: candidates from a set sorted by tile count,
  closest aspect ratio, exact ties go to the later candidate when the image covers > half its area."""
  aspect_ratio = width / height
  target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                      if min_num <= i * j <= max_num)
  best_diff, best = float("inf"), (1, 1)
  for ratio in sorted(target_ratios, key=lambda x: x[0] * x[1]):
    diff = abs(aspect_ratio - ratio[0] / ratio[1])
    if diff < best_diff:
      best_diff, best = diff, ratio
    elif diff == best_diff and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
      best = ratio
  return best


@pytest.mark.parametrize("size,min_num,max_num,grid", [
    ((448, 448), 1, 12, (1, 1)),     # square, small: the 2x2 tie loses (area < half of 4 tiles)
    ((800, 800), 1, 12, (2, 2)),     # square tie: 2x2 wins (640000 > 0.5*448^2*4), 3x3 loses (< 0.5*448^2*9)
    ((1000, 1000), 1, 12, (3, 3)),   # 3x3 wins its tie too (1e6 > 903168)
    ((500, 400), 1, 12, (4, 3)),     # aspect 1.25: 1x1/2x2/3x2 tie at .25, 4x3 (diff .083) beats them
    ((1920, 1080), 1, 12, (4, 2)),   # 2x1 (diff .222) tied exactly by 4x2, image large enough -> 4x2
    ((640, 480), 1, 6, (3, 2)),      # 4x3 needs 12 tiles; 3x2 (diff .167) beats 1x1/2x2 (.333)
    ((1000, 200), 1, 6, (5, 1)), ((300, 1000), 1, 6, (1, 3)), ((100, 1000), 1, 12, (1, 10)),
    ((500, 400), 2, 2, (1, 2)),      # 1x2 and 2x1 tie exactly (|1.25-0.5| = |1.25-2|): set order picks 1x2
])
def test_tiling_grids_match_the_reference(size, min_num, max_num, grid):
  assert reference_grid(*size, 448, min_num, max_num) == grid
  assert images.choose_grid(*size, 448, min_num, max_num) == grid


def test_tiling_matches_the_reference_on_many_sizes_including_ties():
  sizes = [(w, h) for w in (50, 224, 300, 447, 448, 449, 500, 640, 896, 1000, 1344, 2000, 4000)
           for h in (50, 224, 300, 448, 500, 768, 1000, 3000)]
  sizes += [(448 * i, 448 * j) for i in range(1, 6) for j in range(1, 6)]  # exact ratios: many exact ties
  for min_num, max_num in ((1, 12), (1, 6), (2, 2), (1, 18), (3, 9)):
    for w, h in sizes:
      assert images.choose_grid(w, h, 448, min_num, max_num) == reference_grid(w, h, 448, min_num, max_num), (w, h)


def test_tiles_and_pixels_match_the_reference_pipeline():
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8))
  cols, rows = reference_grid(700, 300, 448, 1, 12)
  resized = img.resize((448 * cols, 448 * rows), Image.BICUBIC)
  want = [resized.crop(((k % cols) * 448, (k // cols) * 448, (k % cols + 1) * 448, (k // cols + 1) * 448))
          for k in range(cols * rows)] + [img.resize((448, 448), Image.BICUBIC)]
  got = images.dynamic_tiles(img, 448, 1, 12, use_thumbnail=True)
  assert len(got) == len(want) == cols * rows + 1
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  for g, w in zip(got, want):
    ref = ((np.asarray(w, np.float64) / 255.0) - mean) / std  # ToTensor + Normalize
    np.testing.assert_allclose(images.normalize(g), ref, atol=1e-5)


_SHARDED_LOAD = r"""
import json, sys
import jax, numpy as np
from drex import base as base_lib
from drex.parallel import Parallel
parallel = Parallel.create((1, 2, 2))
base = base_lib.load(sys.argv[1], parallel)
kernel = base.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
flat = jax.tree_util.tree_leaves_with_path(base.params)
print(json.dumps({"devices": jax.device_count(), "spec": list(kernel.sharding.spec),
                  "shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
                  "sums": {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum()) for p, x in flat}}))
"""


def test_import_places_tensors_sharded_on_a_4_device_mesh(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  tokenizer = tok_lib.train_bpe(["what colour is the shape ? red blue green"] * 4, 40)
  cfg, params = _micro(image_token_id=tokenizer.token_id(tok_lib.IMG_CONTEXT))
  peft_export.export_merged(str(tmp_path), params, cfg, "qwen2", tokenizer=tokenizer)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path)], cwd=root, env=env, capture_output=True,
                        text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4 and out["spec"] == ["fsdp", "tensor"]
  assert out["shard_shapes"] == [[16, 16]]
  want = {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum())
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  assert out["sums"].keys() == want.keys()
  np.testing.assert_allclose([out["sums"][k] for k in want], list(want.values()), rtol=1e-6, atol=1e-6)
