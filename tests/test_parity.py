"""drex vs transformers' InternVLForConditionalGeneration on tiny random models, fp32 (needs the
`parity` extra: torch, transformers, peft).

Each tiny model is built by transformers, given random weights, saved to safetensors and imported by
drex; vision features, projector output, logits and greedy tokens must agree. The remote-code
OpenGVLab layout (InternLM2 fused wqkv interleaved by KV group) is built from a native checkpoint by
inverting the documented split, and must import to the same model. Exported PEFT adapters and merged
checkpoints must reproduce drex's LoRA outputs in transformers / peft.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from drex.adapters import lora  # pylint: disable=g-import-not-at-top
from drex.adapters import routers
from drex.checkpoints import hf_import, peft_export
from drex.models import generation, vit, vlm
from drex.models.vlm import VLM

pytestmark = pytest.mark.parity

TOL = 1e-4
IMAGE_TOKEN = 5
VOCAB = 96
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
              patch_size=14, attention_bias=True, layer_norm_eps=1e-6)


def _randomize(model, seed: int) -> None:
  """Every parameter random (HF initializes cls token / position embeddings to zero, layer scale to 0.1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.dim() == 1 and ("norm" in name or name.endswith(("lambda_1", "lambda_2"))) and name.endswith(
          ("weight", "lambda_1", "lambda_2")):
        p.copy_(1.0 + 0.2 * noise)
      elif p.dim() >= 2 and "embed" not in name and "cls_token" not in name:
        p.copy_(noise * (1.5 / np.sqrt(np.prod(p.shape[1:]))))
      else:
        p.copy_(0.5 * noise)


def build_hf(text_config, seed: int = 0):
  cfg = transformers.InternVLConfig(vision_config=VISION, text_config=text_config, image_token_id=IMAGE_TOKEN,
                                    tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.InternVLForConditionalGeneration(cfg).eval()
  _randomize(model, seed)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def qwen2_text():
  return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1e6,
                                  tie_word_embeddings=False, max_position_embeddings=4096)


def llama_text():
  return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
                                  rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
                                  max_position_embeddings=4096, tie_word_embeddings=False)


def phi3_text():
  gen = np.random.default_rng(3)
  short = [float(x) for x in np.round(1 + gen.random(8), 3)]
  long = [float(x) for x in np.round(1 + 4 * gen.random(8), 3)]
  return transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-5,
                                 max_position_embeddings=256, original_max_position_embeddings=16,
                                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                                  "long_factor": long, "original_max_position_embeddings": 16},
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def save(model, directory: str) -> str:
  model.save_pretrained(directory)
  return directory


def load_drex(directory: str):
  hf = json.load(open(os.path.join(directory, "config.json")))
  cfg = hf_import.vlm_config(hf, IMAGE_TOKEN if hf_import.layout_of(hf) == "opengvlab" else None)
  shapes = jax.eval_shape(lambda: VLM(cfg).init(jax.random.key(0), jnp.zeros((1, 1, 56, 56, 3)),
                                                jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32),
                                                jnp.ones((1, 4), bool))["params"])
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = hf_import.load_params(directory, cfg, hf, expected=nn.unbox(shapes))
  return cfg, params


def inputs(seed: int, tiles: int = 2, image: int = 56, length: int = 24, pad=(0, 3)):
  """Left-padded batch of 2 with `tiles` tiles per example, image tokens after 2 text tokens."""
  rng = np.random.default_rng(seed)
  per_tile = ((image // 14) // 2) ** 2
  ids = rng.integers(6, VOCAB, size=(2, length)).astype(np.int64)
  mask = np.ones((2, length), np.int64)
  for b, p in enumerate(pad):
    ids[b, :p] = 0
    mask[b, :p] = 0
    ids[b, p + 2:p + 2 + tiles * per_tile] = IMAGE_TOKEN
  pixels = rng.normal(size=(2, tiles, image, image, 3)).astype(np.float32)
  return pixels, ids, mask


def hf_logits(model, pixels, ids, mask):
  b, n = pixels.shape[:2]
  px = torch.from_numpy(pixels.reshape((b * n,) + pixels.shape[2:])).permute(0, 3, 1, 2)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), pixel_values=px, attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos))
  return out.logits.numpy()


def drex_logits(cfg, variables, pixels, ids, mask, adapter=lora.AdapterSpec()):
  logits, _ = VLM(cfg, adapter).apply(variables, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32),
                                      vlm.prompt_positions(jnp.asarray(mask)), jnp.asarray(mask, bool))
  return np.asarray(logits)


def real_max_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  model = build_hf(qwen2_text(), seed=0)
  directory = save(model, str(tmp_path_factory.mktemp("qwen2_native")))
  cfg, params = load_drex(directory)
  return model, directory, cfg, params


# ----------------------------------------------------------------------------- tests


def test_config_import(qwen):
  _, _, cfg, _ = qwen
  assert cfg.llm.num_kv_heads == 2 and cfg.llm.qkv_bias and not cfg.llm.tie_embeddings
  assert cfg.llm.rope.theta == 1e6 and cfg.vision.grid == 4 and cfg.tokens_per_tile == 4


def _vision_error(model, cfg, params, pixels) -> float:
  """Max-abs difference of the vision tower's patch features. pixels: [N, H, W, 3] float32."""
  with torch.no_grad():
    ref = model.model.vision_tower(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
  ref = ref[:, 1:].numpy()  # without the class token
  feats = vit.InternViT(cfg.vision).apply({"params": params["vision_model"]}, jnp.asarray(pixels))
  return float(np.abs(np.asarray(feats).reshape(ref.shape) - ref).max())


def _projector_error(model, cfg, params, pixels) -> float:
  """Max-abs difference of the projected image tokens (vision, pixel shuffle, mlp1). pixels: [N, H, W, 3]."""
  with torch.no_grad():
    ref = model.model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  ref = ref.pooler_output.numpy()
  proj = VLM(cfg).apply({"params": params}, jnp.asarray(pixels)[None], method=VLM.encode_images)
  return float(np.abs(np.asarray(proj).reshape(ref.shape) - ref).max())


def test_vision_features_and_projector_match(qwen):
  model, _, cfg, params = qwen
  pixels = np.random.default_rng(1).normal(size=(3, 56, 56, 3)).astype(np.float32)
  err_feats = _vision_error(model, cfg, params, pixels)
  err_proj = _projector_error(model, cfg, params, pixels)
  print(f"vision max-abs {err_feats:.2e}, projector max-abs {err_proj:.2e}")
  assert err_feats <= TOL and err_proj <= TOL


def test_other_image_sizes_interpolate_position_embeddings(qwen):
  model, _, cfg, params = qwen
  rng = np.random.default_rng(2)
  # Square 84 px (6x6 patches, 3x3 tokens): the whole image path, with bicubic position resizing.
  err_square = _projector_error(model, cfg, params, rng.normal(size=(2, 84, 84, 3)).astype(np.float32))
  # Non-square 42x70 (3x5 patches): the vision tower (transformers' projector path assumes square grids).
  err_odd = _vision_error(model, cfg, params, rng.normal(size=(2, 42, 70, 3)).astype(np.float32))
  # drex's resize against torch's bicubic interpolate directly, odd sizes up and down.
  grid = rng.normal(size=(1, 8, 4, 4)).astype(np.float32)
  err_resize = 0.0
  for size in ((5, 7), (3, 2), (9, 4)):
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=size, mode="bicubic", align_corners=False)
    ours = vit.resize_position_grid(jnp.asarray(grid[0].transpose(1, 2, 0)), *size)
    err_resize = max(err_resize, float(np.abs(np.asarray(ours) - ref[0].permute(1, 2, 0).numpy()).max()))
  print(f"84px projector {err_square:.2e}, 42x70 vision {err_odd:.2e}, bicubic resize {err_resize:.2e}")
  assert err_square <= TOL and err_odd <= TOL and err_resize <= 1e-5


def test_logits_match_with_gqa_bias_padding_and_several_tiles(qwen):
  model, _, cfg, params = qwen
  pixels, ids, mask = inputs(seed=3, tiles=2)
  err = real_max_diff(drex_logits(cfg, {"params": params}, pixels, ids, mask), hf_logits(model, pixels, ids, mask),
                      mask)
  print(f"qwen2 logits max-abs {err:.2e}")
  assert err <= TOL


def test_greedy_generation_matches(qwen):
  model, _, cfg, params = qwen
  pixels, ids, mask = inputs(seed=4, tiles=2)
  b, n = pixels.shape[:2]
  px = torch.from_numpy(pixels.reshape((b * n,) + pixels.shape[2:])).permute(0, 3, 1, 2)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=px,
                         max_new_tokens=6, do_sample=False)[:, ids.shape[1]:].numpy()
  ours = generation.greedy_generate(VLM(cfg), {"params": params}, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(mask), 6, eos_id=-1, pad_id=0)
  print("greedy tokens", np.asarray(ours).tolist(), ref.tolist())
  np.testing.assert_array_equal(np.asarray(ours), ref)


def test_prefixed_state_dict_names_import_identically(qwen, tmp_path):
  """The `model.`-prefixed names of the in-memory state dict (what transformers >= 4.52 loads) work too."""
  model, directory, cfg, params = qwen
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  _, params2 = load_drex(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def _to_remote_code(state: dict, text_cfg, directory: str) -> None:
  """OpenGVLab remote-code layout (InternLM2 LLM) from a native Llama-text state dict, by inverting the
  documented conversion: fused vision qkv, mlp1.{0,1,3}, InternLM2 names, wqkv interleaved per KV group."""
  h, k = text_cfg.num_attention_heads, text_cfg.num_key_value_heads
  d = text_cfg.hidden_size // h
  g = h // k
  out = {}
  for name, t in state.items():
    if name.startswith("model.vision_tower."):
      new = name.replace("model.vision_tower.", "vision_model.").replace("encoder.layer.", "encoder.layers.")
      new = new.replace("embeddings.cls_token", "embeddings.class_embedding")
      new = new.replace("embeddings.position_embeddings", "embeddings.position_embedding")
      new = new.replace("patch_embeddings.projection", "patch_embedding")
      new = new.replace("lambda_1", "ls1").replace("lambda_2", "ls2")
      new = new.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
      new = new.replace("attention.projection_layer", "attn.proj")
      if ".attention.q_proj." in new:
        leaf = new.rsplit(".", 1)[1]
        parts = [state[name.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
        out[new.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts, 0)
        assert leaf in ("weight", "bias")
        continue
      if ".attention.k_proj." in new or ".attention.v_proj." in new:
        continue
      out[new] = t
    elif name.startswith("model.multi_modal_projector."):
      new = name.replace("model.multi_modal_projector.", "mlp1.")
      out[new.replace("layer_norm", "0").replace("linear_1", "1").replace("linear_2", "3")] = t
    elif name == "lm_head.weight":
      out["language_model.output.weight"] = t
    else:
      rest = name[len("model.language_model."):]
      pre = "language_model.model."
      if rest.startswith("layers."):
        i, sub = rest.split(".", 2)[1:]
        lp = f"{pre}layers.{i}."
        if sub == "self_attn.q_proj.weight":
          q = state[name].reshape(k, g, d, -1)
          kk = state[name.replace("q_proj", "k_proj")].reshape(k, 1, d, -1)
          v = state[name.replace("q_proj", "v_proj")].reshape(k, 1, d, -1)
          out[lp + "attention.wqkv.weight"] = torch.cat([q, kk, v], 1).reshape((h + 2 * k) * d, -1)
        elif sub in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
          continue
        else:
          sub = {"self_attn.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
                 "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
                 "input_layernorm.weight": "attention_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight"}[sub]
          out[lp + sub] = t
      elif rest == "embed_tokens.weight":
        out[pre + "tok_embeddings.weight"] = t
      else:
        out[pre + rest] = t
  safetensors_torch.save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(directory, "model.safetensors"))
  config = {
      "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
      "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": 56,
      "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 6, "min_dynamic_patch": 1,
      "torch_dtype": "float32",
      "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "image_size": 56,
                        "patch_size": 14, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "qkv_bias": True,
                        "qk_normalization": False, "hidden_act": "gelu"},
      "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": VOCAB,
                     "hidden_size": text_cfg.hidden_size, "num_hidden_layers": text_cfg.num_hidden_layers,
                     "num_attention_heads": h, "num_key_value_heads": k,
                     "intermediate_size": text_cfg.intermediate_size, "rms_norm_eps": text_cfg.rms_norm_eps,
                     "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                     "max_position_embeddings": 4096, "bias": False, "tie_word_embeddings": False,
                     "hidden_act": "silu"}}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)


def test_internlm2_remote_code_layout_matches_native(tmp_path):
  model = build_hf(llama_text(), seed=5)
  native = save(model, str(tmp_path / "native"))
  remote = str(tmp_path / "remote")
  os.makedirs(remote)
  _to_remote_code(model.state_dict(), model.config.text_config, remote)
  cfg_n, params_n = load_drex(native)
  cfg_r, params_r = load_drex(remote)
  assert cfg_r.llm == cfg_n.llm and cfg_r.vision == cfg_n.vision and cfg_r.llm.rope.kind == "dynamic"
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_n, params_r)
  pixels, ids, mask = inputs(seed=6, tiles=2)
  ours = drex_logits(cfg_r, {"params": params_r}, pixels, ids, mask)
  err = real_max_diff(ours, hf_logits(model, pixels, ids, mask), mask)
  print(f"internlm2 (remote layout) vs transformers llama logits max-abs {err:.2e}")
  assert err <= TOL


def test_phi3_fused_longrope_matches(tmp_path):
  model = build_hf(phi3_text(), seed=7)
  cfg, params = load_drex(save(model, str(tmp_path)))
  assert cfg.llm.rope.kind == "longrope" and cfg.llm.rope.original_max_position_embeddings == 16
  errs = []
  for length, pad in ((12, (0, 2)), (30, (0, 3))):  # short factors (<= 16 positions), long factors
    pixels, ids, mask = inputs(seed=8, tiles=1, length=length, pad=pad)
    errs.append(real_max_diff(drex_logits(cfg, {"params": params}, pixels, ids, mask),
                              hf_logits(model, pixels, ids, mask), mask))
  print(f"phi3 longrope logits max-abs short {errs[0]:.2e}, long {errs[1]:.2e}")
  assert max(errs) <= TOL


def _random_expert(params, rank: int = 4):
  experts = lora.init_experts(params, rank, list(lora.ALL_TARGETS), jax.random.key(11))
  keys = iter(jax.random.split(jax.random.key(12), 100))
  return jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), experts)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "phi3"])
def test_exported_peft_adapter_and_merged_model_reproduce_drex_lora(kind, qwen, tmp_path):
  """Qwen2 (1B), Llama = converted InternLM2 with dynamic RoPE (2B/8B), Phi-3 fused qkv/gate_up (4B)."""
  peft = pytest.importorskip("peft")
  if kind == "qwen2":
    model, _, cfg, params = qwen
  else:
    model = build_hf({"llama": llama_text, "phi3": phi3_text}[kind](), seed=9)
    cfg, params = load_drex(save(model, str(tmp_path / "base")))
  experts = _random_expert(params)
  rank, alpha = 4, 8.0
  adapter = lora.AdapterSpec(routers.Single(0), lora_alpha=alpha)
  pixels, ids, mask = inputs(seed=10, tiles=2)
  ours = drex_logits(cfg, {"params": params, "experts": experts}, pixels, ids, mask, adapter)
  base_only = drex_logits(cfg, {"params": params}, pixels, ids, mask)
  assert real_max_diff(ours, base_only, mask) > 1e-2  # the expert matters
  family = peft_export.export_family(cfg)
  assert family == kind
  peft_export.export_peft(str(tmp_path / "peft"), experts, 0, cfg, family, rank, alpha)
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
  try:
    err_peft = real_max_diff(ours, hf_logits(peft_model, pixels, ids, mask), mask)
  finally:
    peft_model.unload()  # give the shared fixture model back without LoRA layers
  peft_export.export_merged(str(tmp_path / "merged"), params, cfg, family, experts, 0, adapter.scale(rank))
  merged = transformers.InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
  err_merged = real_max_diff(ours, hf_logits(merged, pixels, ids, mask), mask)
  print(f"{kind}: PEFT adapter logits max-abs {err_peft:.2e}, merged checkpoint {err_merged:.2e}")
  assert err_peft <= TOL and err_merged <= TOL


def test_qwen2_vocab_and_merges_tokenizer_matches_transformers(tmp_path):
  """A Qwen2 tokenizer saved as vocab.json + merges.txt (no tokenizer.json) encodes like transformers'."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from drex.data import prompts  # pylint: disable=g-import-not-at-top
  from drex.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  corpus = ["What colour is the shape? Answer the question using a single word or phrase.",
            "The chart's largest bar is 42; les élèves ont 3 pommes.\n\nDone  now"] * 20
  bpe.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  bpe.model.save(str(tmp_path))
  n = bpe.get_vocab_size()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "unk_token": None, "bos_token": None,
      "added_tokens_decoder": {str(n + i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                            "rstrip": False, "single_word": False} for i, t in enumerate(specials)}}))
  ours = tok_lib.Tokenizer.load(str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = prompts.get_template("Hermes-2").prompt("The chart's largest bar is 42;  les élèves\n\nDone?", 3)
  want = theirs(text, add_special_tokens=False)["input_ids"]
  assert ours.encode(text) == want
  assert ours.token_id("<IMG_CONTEXT>") == n + 5 and want.count(n + 5) == 3
