"""A micro InternVL-shaped model and batches for tests (seconds to compile on a CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drex.models.config import LLMConfig, RopeConfig, VisionConfig, VLMConfig

IMAGE_TOKEN = 5
VOCAB = 48


def micro_config(**llm_overrides) -> VLMConfig:
  """16-px tiles, patch 4 (4x4 grid -> 4 image tokens), ViT 16x1, LLM 32x2, GQA 4/2."""
  llm = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
             norm_eps=1e-6, rope=RopeConfig(theta=10000.0))
  llm.update(llm_overrides)
  return VLMConfig(vision=VisionConfig(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
                   llm=LLMConfig(**llm), image_token_id=IMAGE_TOKEN)


def micro_batch(cfg: VLMConfig, batch: int = 3, length: int = 12, seed: int = 0, pad: tuple[int, ...] = ()) -> dict:
  """A left-padded batch with one image per example (tokens_per_tile image tokens after 1 BOS).

  pad[i] = number of left-padding slots of row i.
  """
  rng = np.random.default_rng(seed)
  n_img = cfg.tokens_per_tile
  ids = rng.integers(8, cfg.llm.vocab_size, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for i in range(batch):
    p = pad[i] if i < len(pad) else 0
    mask[i, :p] = 0
    ids[i, :p] = 0
    ids[i, p + 1:p + 1 + n_img] = cfg.image_token_id
  loss = np.zeros_like(mask)
  loss[:, -3:] = 1
  pixels = rng.normal(size=(batch, 1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def micro_model(cfg: VLMConfig | None = None, seed: int = 0) -> tuple[VLMConfig, dict, tuple]:
  """A micro VLM's (config, frozen base params, forward args) for tests.

  args = (pixel_values [3, 1, H, W, 3], input_ids [3, 12], positions [3, 12], attention mask [3, 12] bool),
  the positional arguments of `vlm.VLM.__call__` for `micro_batch(cfg)`.
  """
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from drex.models import vlm  # pylint: disable=g-import-not-at-top
  cfg = cfg or micro_config()
  b = micro_batch(cfg)
  args = vlm.model_inputs(b["pixel_values"], b["input_ids"], b["attention_mask"])
  params = nn.unbox(vlm.VLM(cfg).init(jax.random.key(seed), *args))["params"]
  return cfg, params, args


def random_like(tree, seed: int = 0, scale: float = 0.1):
  """A tree of the same structure with normal(0, scale) leaves (e.g. non-zero LoRA B)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [scale * jax.random.normal(k, x.shape, jnp.float32)
                                                for k, x in zip(keys, leaves)])
