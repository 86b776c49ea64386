"""Named architectures. `tiny` is the CPU-sized model of the embedded default (same structure as
InternVL-2: InternViT + pixel shuffle + mlp1 + GQA/SwiGLU decoder), sized from the measured CPU
figures in shared/research/tiny-feasibility.md."""

from __future__ import annotations

from drex.models.config import LLMConfig, RopeConfig, VisionConfig, VLMConfig


def tiny(vocab_size: int, image_token_id: int) -> VLMConfig:
  """32-px tiles, patch 4 (8x8 grid -> 16 image tokens per tile), ViT 64x2, LLM 128x3 with GQA 4/2."""
  return VLMConfig(
      vision=VisionConfig(image_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256),
      llm=LLMConfig(vocab_size=vocab_size, d_model=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                    d_ff=384, norm_eps=1e-6, rope=RopeConfig(theta=10000.0)),
      image_token_id=image_token_id)
