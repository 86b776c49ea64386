"""Architecture hyper-parameters of an InternVL-2 style model, as frozen (hashable) dataclasses.

The model modules take these as attributes; presets (`drex.models.presets`) build them; the base
checkpoint stores them as JSON (`to_dict` / `from_dict`) so a saved base is self-describing.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """InternViT: patch embedding, CLS token, learned position embedding, pre-norm blocks."""

  image_size: int = 448  # tile side in pixels the position embedding was trained for
  patch_size: int = 14  # square patch side in pixels
  width: int = 1024  # hidden size
  depth: int = 24  # number of transformer blocks
  num_heads: int = 16
  mlp_dim: int = 4096
  norm_type: str = "layer_norm"  # 'layer_norm' (InternViT-300M) or 'rms_norm' (InternViT-6B)
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  qk_norm: bool = False  # RMSNorm over the full q and k vectors (InternViT-6B)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding. kind: 'default' | 'dynamic' (NTK, InternLM2) | 'longrope' (Phi-3 'su')."""

  theta: float = 10000.0
  kind: str = "default"
  factor: float = 1.0  # dynamic NTK factor
  max_position_embeddings: int = 32768
  original_max_position_embeddings: int = 4096  # longrope: switch point short -> long factors
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Decoder-only language model (Qwen2 / InternLM2 / Llama / Phi-3 are one structure here)."""

  vocab_size: int = 92553
  d_model: int = 2048
  num_layers: int = 24
  num_heads: int = 16
  num_kv_heads: int = 8
  head_dim: int = 128
  d_ff: int = 8192
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2: q/k/v projections have a bias
  tie_embeddings: bool = False
  rope: RopeConfig = RopeConfig(theta=1e6)


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """The whole InternVL-2 style model."""

  vision: VisionConfig = VisionConfig()
  llm: LLMConfig = LLMConfig()
  downsample_ratio: float = 0.5  # pixel shuffle; 0.5 merges 2x2 patches into one token
  projector_norm_eps: float = 1e-5
  image_token_id: int = 92546  # <IMG_CONTEXT>
  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"

  @property
  def tokens_per_tile(self) -> int:
    side = int(self.vision.grid * self.downsample_ratio)
    return side * side

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
    d = dict(d)
    llm = dict(d.pop("llm"))
    rope = dict(llm.pop("rope"))
    rope = RopeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in rope.items()})
    return cls(vision=VisionConfig(**d.pop("vision")), llm=LLMConfig(rope=rope, **llm), **d)
