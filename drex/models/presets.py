"""Named architectures.

* `tiny`: the CPU-sized model of the embedded default (same structure as InternVL-2: InternViT +
  pixel shuffle + mlp1 + GQA/SwiGLU decoder), sized from the measured CPU figures in
  shared/research/tiny-feasibility.md.
* `internvl2_1b` / `_2b` / `_4b` / `_8b`: the published OpenGVLab InternVL2 models (InternViT-300M-448px,
  pixel shuffle 0.5, mlp1, and Qwen2-0.5B / InternLM2-1.8B / Phi-3-mini-128k / InternLM2.5-7B), bf16.
  They give the shapes for random-weight runs (benchmarks) and document what an import should find;
  importing a checkpoint (`drex.checkpoints.hf_import`) always builds its config from the checkpoint's
  own config.json, never from these presets.

`get(name)` maps a name to its config and fails with a one-line error on unknown names.
"""

from __future__ import annotations

from typing import Callable

from drex.errors import UserError
from drex.models.config import LLMConfig, RopeConfig, VisionConfig, VLMConfig


def tiny(vocab_size: int, image_token_id: int) -> VLMConfig:
  """32-px tiles, patch 4 (8x8 grid -> 16 image tokens per tile), ViT 64x2, LLM 128x3 with GQA 4/2."""
  return VLMConfig(
      vision=VisionConfig(image_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256),
      llm=LLMConfig(vocab_size=vocab_size, d_model=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                    d_ff=384, norm_eps=1e-6, rope=RopeConfig(theta=10000.0)),
      image_token_id=image_token_id)


# InternViT-300M-448px, shared by InternVL2-1B/2B/4B/8B: 448/14 -> 32x32 patches, 1024 wide, 24 layers.
INTERNVIT_300M = VisionConfig(image_size=448, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                              norm_type="layer_norm", norm_eps=1e-6, qkv_bias=True, qk_norm=False)


def _internvl2(llm: LLMConfig, image_token_id: int, dtype: str) -> VLMConfig:
  return VLMConfig(vision=INTERNVIT_300M, llm=llm, downsample_ratio=0.5, projector_norm_eps=1e-5,
                   image_token_id=image_token_id, dtype=dtype, param_dtype=dtype)


def internvl2_1b(dtype: str = "bfloat16") -> VLMConfig:
  """InternVL2-1B: Qwen2-0.5B-Instruct (896 wide, 24 layers, GQA 14/2, q/k/v bias, untied head).

  `<IMG_CONTEXT>` = 151648 is derived from the vocabulary layout (151643 base + 3 chat + 9 InternVL
  tokens), not read from the checkpoint; an import takes the id from the checkpoint's tokenizer.
  """
  return _internvl2(LLMConfig(vocab_size=151655, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2,
                              head_dim=64, d_ff=4864, norm_eps=1e-6, qkv_bias=True, tie_embeddings=False,
                              rope=RopeConfig(theta=1e6, max_position_embeddings=32768)),
                    image_token_id=151648, dtype=dtype)


def internvl2_2b(dtype: str = "bfloat16") -> VLMConfig:
  """InternVL2-2B: internlm2-chat-1_8b (2048 wide, 24 layers, GQA 16/8, dynamic NTK RoPE factor 2)."""
  return _internvl2(LLMConfig(vocab_size=92553, d_model=2048, num_layers=24, num_heads=16, num_kv_heads=8,
                              head_dim=128, d_ff=8192, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
                              rope=RopeConfig(theta=1e6, kind="dynamic", factor=2.0, max_position_embeddings=32768)),
                    image_token_id=92546, dtype=dtype)


# Phi-3-mini-128k's longrope rescaling factors (48 = head_dim / 2 values each) are NOT reproduced here:
# which revision of Phi-3-mini-128k-instruct InternVL2-4B was built on (and so which factors its
# config.json carries) could not be verified offline. The preset uses neutral factors (1.0), so it
# only serves random-weight runs (benchmarks, shapes); an imported InternVL2-4B takes the real
# short/long factors from the checkpoint's config.json (`llm_config.rope_scaling`).
PHI3_PLACEHOLDER_FACTORS = (1.0,) * 48


def internvl2_4b(dtype: str = "bfloat16") -> VLMConfig:
  """InternVL2-4B: Phi-3-mini-128k-instruct (3072 wide, 32 layers, 32/32 heads, longrope 4096 -> 131072).

  vocab 32020 and `<IMG_CONTEXT>` 32013 are inferred (Phi-3 base tokenizer 32011 + InternVL tokens);
  the longrope factors are placeholders (see PHI3_PLACEHOLDER_FACTORS). Imports read all of these
  from the checkpoint.
  """
  return _internvl2(LLMConfig(vocab_size=32020, d_model=3072, num_layers=32, num_heads=32, num_kv_heads=32,
                              head_dim=96, d_ff=8192, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
                              rope=RopeConfig(theta=10000.0, kind="longrope", max_position_embeddings=131072,
                                              original_max_position_embeddings=4096,
                                              short_factor=PHI3_PLACEHOLDER_FACTORS,
                                              long_factor=PHI3_PLACEHOLDER_FACTORS)),
                    image_token_id=32013, dtype=dtype)


def internvl2_8b(dtype: str = "bfloat16") -> VLMConfig:
  """InternVL2-8B: internlm2_5-7b-chat (4096 wide, 32 layers, GQA 32/8, dynamic NTK RoPE factor 2)."""
  return _internvl2(LLMConfig(vocab_size=92553, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                              head_dim=128, d_ff=14336, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
                              rope=RopeConfig(theta=1e6, kind="dynamic", factor=2.0, max_position_embeddings=32768)),
                    image_token_id=92546, dtype=dtype)


PRESETS: dict[str, Callable[..., VLMConfig]] = {
    "internvl2_1b": internvl2_1b,
    "internvl2_2b": internvl2_2b,
    "internvl2_4b": internvl2_4b,
    "internvl2_8b": internvl2_8b,
}

# Chat template of each published model (drex.data.prompts names).
TEMPLATES = {"internvl2_1b": "Hermes-2", "internvl2_2b": "internlm2-chat", "internvl2_4b": "phi3-chat",
             "internvl2_8b": "internlm2-chat"}


def get(name: str, dtype: str = "bfloat16") -> VLMConfig:
  """The named preset ('internvl2_1b', 'InternVL2-2B', ... case and '-'/'_' insensitive)."""
  key = name.strip().lower().replace("-", "_")
  if key not in PRESETS:
    raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)} "
                    f"(the tiny base is built by drex.pretrain)")
  return PRESETS[key](dtype)
