"""Shapes of every module, the pixel-shuffle layout, position-embedding resizing, KV-cache decoding
and left-padding invariance of the decoder."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex import testing
from drex.models import generation, vit, vlm
from drex.models.config import VLMConfig
from drex.models.layers import rope_tables
from drex.models.config import RopeConfig


@pytest.fixture(scope="module")
def model_and_params():
  cfg, params, _ = testing.micro_model()
  return cfg, vlm.VLM(cfg), params


def test_vit_shapes():
  cfg = testing.micro_config()
  x = jnp.zeros((2, 16, 16, 3))
  out, _ = vit.InternViT(cfg.vision).init_with_output(jax.random.key(0), x)
  chex.assert_shape(out, (2, 4, 4, 16))


def test_vit_other_resolution_interpolates_positions():
  cfg = testing.micro_config()
  module = vit.InternViT(cfg.vision)
  params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  out = module.apply(params, jnp.zeros((1, 24, 32, 3)))
  chex.assert_shape(out, (1, 6, 8, 16))


def test_bicubic_resize_is_identity_at_same_size_and_preserves_constants():
  np.testing.assert_allclose(vit.bicubic_resize_matrix(5, 5), np.eye(5), atol=1e-6)
  m = vit.bicubic_resize_matrix(4, 7)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # rows are partitions of unity


def test_pixel_shuffle_closed_form():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  out = vlm.pixel_shuffle(x, 0.5)
  chex.assert_shape(out, (2, 2, 3, 12))
  i, j = 1, 2
  expected = jnp.concatenate([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j],
                              x[:, 2 * i + 1, 2 * j + 1]], -1)
  np.testing.assert_array_equal(out[:, i, j], expected)


def test_pixel_shuffle_rejects_odd_grid():
  with pytest.raises(ValueError, match="divisible by 2"):
    vlm.pixel_shuffle(jnp.zeros((1, 3, 4, 2)), 0.5)


def test_vlm_logits_shape_and_image_features_used(model_and_params):
  cfg, model, params = model_and_params
  b = testing.micro_batch(cfg)
  pos = vlm.prompt_positions(b["attention_mask"])
  logits, cache = model.apply({"params": params}, b["pixel_values"], b["input_ids"], pos,
                              b["attention_mask"].astype(bool))
  chex.assert_shape(logits, (3, 12, cfg.llm.vocab_size))
  assert cache is None
  other, _ = model.apply({"params": params}, b["pixel_values"] + 1.0, b["input_ids"], pos,
                         b["attention_mask"].astype(bool))
  assert float(jnp.abs(other - logits).max()) > 1e-4  # the image reaches the logits
  feats = model.apply({"params": params}, b["pixel_values"], method=vlm.VLM.encode_images)
  chex.assert_shape(feats, (3, cfg.tokens_per_tile, cfg.llm.d_model))


def test_left_padding_does_not_change_real_positions(model_and_params):
  cfg, model, params = model_and_params
  b = testing.micro_batch(cfg, batch=1, length=10)
  padded = {k: np.concatenate([np.zeros((1, 3) + v.shape[2:], v.dtype), v], 1) if k != "pixel_values" else v
            for k, v in b.items()}
  run = lambda bb: model.apply({"params": params}, bb["pixel_values"], bb["input_ids"],
                               vlm.prompt_positions(bb["attention_mask"]), bb["attention_mask"].astype(bool))[0]
  np.testing.assert_allclose(run(padded)[:, 3:], run(b), atol=1e-5)


def test_greedy_generation_with_cache_matches_teacher_forcing(model_and_params):
  cfg, model, params = model_and_params
  b = testing.micro_batch(cfg, pad=(0, 2, 5))
  out = generation.greedy_generate(model, {"params": params}, b["pixel_values"], b["input_ids"], b["attention_mask"],
                                   max_new_tokens=5, eos_id=-1, pad_id=0)
  chex.assert_shape(out, (3, 5))
  full = np.concatenate([b["input_ids"], np.asarray(out)], 1)
  mask = np.concatenate([b["attention_mask"], np.ones_like(out)], 1)
  logits, _ = model.apply({"params": params}, b["pixel_values"], full, vlm.prompt_positions(mask),
                          mask.astype(bool))
  np.testing.assert_array_equal(np.argmax(logits[:, 11:16], -1), out)


def test_generation_pads_after_eos(model_and_params):
  cfg, model, params = model_and_params
  b = testing.micro_batch(cfg)
  first = generation.greedy_generate(model, {"params": params}, b["pixel_values"], b["input_ids"],
                                     b["attention_mask"], 1, -1, 0)
  eos = int(first[0, 0])
  out = np.asarray(generation.greedy_generate(model, {"params": params}, b["pixel_values"], b["input_ids"],
                                              b["attention_mask"], 4, eos, 0))
  assert out[0, 0] == eos and (out[0, 1:] == 0).all()


def test_rope_kinds():
  pos = jnp.arange(6)[None]
  cos, sin = rope_tables(pos, 8, RopeConfig(theta=100.0))
  chex.assert_shape(cos, (1, 6, 8))
  np.testing.assert_allclose(cos[0, 0], 1.0)
  # Dynamic NTK only changes anything beyond max_position_embeddings.
  dyn, _ = rope_tables(pos, 8, RopeConfig(theta=100.0, kind="dynamic", factor=2.0, max_position_embeddings=16))
  np.testing.assert_allclose(dyn, cos, atol=1e-6)
  with pytest.raises(ValueError, match="unknown rope kind"):
    rope_tables(pos, 8, RopeConfig(kind="yarn"))


def test_config_roundtrip():
  cfg = testing.micro_config()
  assert VLMConfig.from_dict(cfg.to_dict()) == cfg
