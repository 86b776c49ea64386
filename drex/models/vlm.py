"""The InternVL-2 style VLM: InternViT -> pixel shuffle -> mlp1 -> image features placed at the
`<IMG_CONTEXT>` positions of the token embeddings -> decoder LLM.

Batch layout:
  pixel_values [B, N, H, W, 3]  N tiles per example (unused tiles are padding)
  input_ids    [B, L]           left-padded; example b has (#tiles used) * tokens_per_tile
                                `<IMG_CONTEXT>` tokens, filled in order with its tiles' features
  positions    [B, L]           position ids (0 at the first real token)
  kv_mask      [B, S]           True where a key slot holds a real token
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from drex.models.config import VLMConfig
from drex.models.layers import LinearFactory, dtype_of, gelu, layer_norm
from drex.models.llm import Cache, Decoder
from drex.models.vit import InternViT


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
  """InternVL's pixel shuffle v2. x: [N, h, w, C] -> [N, h*r, w*r, C/r^2].

  With r = 0.5: out[n, i, j] = concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]).
  """
  n, h, w, c = x.shape
  f = round(1 / ratio)
  if h % f or w % f:
    raise ValueError(f"pixel shuffle {ratio} needs a patch grid divisible by {f}, got {h}x{w}")
  x = x.reshape(n, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // f, w // f, f * f * c)


class Projector(nn.Module):
  """mlp1: LayerNorm -> Linear -> GELU -> Linear. [..., 4C] -> [..., d_llm]."""

  d_model: int
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda f, axes, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                           kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes))
    # Column- then row-parallel (as an MLP): the hidden width is split over 'mlp', the output is 'embed'.
    x = layer_norm(self.eps, self.param_dtype, self.dtype, name="norm")(x)
    x = gelu(dense(self.d_model, (None, "mlp"), "linear_1")(x))
    return dense(self.d_model, ("mlp", "embed"), "linear_2")(x)


class VLM(nn.Module):
  """params: {'vision_model', 'mlp1', 'language_model'}. `linear` builds the LLM's linears (a package that
  adds to them, such as drex.adapters, injects its own factory and reads its own variable collections)."""

  config: VLMConfig
  linear: LinearFactory = LinearFactory()

  def setup(self):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.vision_model = InternViT(cfg.vision, dtype, pdtype)
    self.mlp1 = Projector(cfg.llm.d_model, cfg.projector_norm_eps, dtype, pdtype)
    self.language_model = Decoder(cfg.llm, self.linear, dtype, pdtype)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """[B, N, H, W, 3] -> image features [B, N * tokens_per_tile, d_llm]."""
    b, n = pixel_values.shape[:2]
    feats = self.vision_model(pixel_values.reshape((b * n,) + pixel_values.shape[2:]))
    feats = pixel_shuffle(feats, self.config.downsample_ratio)
    feats = self.mlp1(feats.reshape(b, -1, feats.shape[-1]))
    return nn.with_logical_constraint(feats, ("activation_batch", "activation_length", "activation_embed"))

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
    """Token embeddings with the k-th `<IMG_CONTEXT>` of each example replaced by its k-th image feature."""
    embeds = self.language_model.embed(input_ids)
    if pixel_values is None:
      return embeds
    feats = self.encode_images(pixel_values).astype(embeds.dtype)
    is_image = input_ids == self.config.image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
    gathered = jnp.take_along_axis(feats, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)

  def decode(self, embeds, positions, kv_mask, cache: Cache | None = None, cache_index=0, depth: int | None = None):
    """The LLM over embeddings [B, L, d] (`embed`'s): (logits [B, L, vocab] float32, updated cache or None);
    with `depth` only the first `depth` decoder layers run ((hidden [B, L, d], None))."""
    return self.language_model(embeds, positions, kv_mask, cache, cache_index, depth)

  def __call__(self, pixel_values, input_ids, positions, kv_mask, cache: Cache | None = None, cache_index=0):
    """Returns (logits [B, L, vocab] float32, updated cache or None). pixel_values may be None (no images)."""
    return self.decode(self.embed(input_ids, pixel_values), positions, kv_mask, cache, cache_index)


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
  """Position ids of a left-padded batch: [B, L] -> [B, L] (0 at each example's first real token)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def prepared(model: VLM, variables: dict, pixel_values, input_ids, attention_mask) -> tuple[dict, jax.Array]:
  """A left-padded prompt batch's embeddings [B, L, d] and the variables of its pass, with what the linears make
  from the prompts first (LinearFactory.prepare: e.g. each prompt's identified task). The pass itself is then
  `model.apply(variables, embeds, positions, kv_mask, ..., method='decode')`: images are encoded once."""
  embeds = model.apply(variables, input_ids, pixel_values, method="embed")
  variables = model.linear.prepare(model, variables, embeds, prompt_positions(attention_mask),
                                   attention_mask.astype(bool))
  return variables, embeds


def model_inputs(pixel_values, input_ids, attention_mask) -> tuple:
  """A left-padded batch's arrays -> VLM.__call__'s (pixel_values, input_ids, positions, kv_mask)."""
  return pixel_values, input_ids, prompt_positions(attention_mask), attention_mask.astype(bool)


def answer_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal LM loss on answer tokens only.

  Args:
    logits: [B, L, V] from the model on input_ids.
    input_ids: [B, L].
    loss_mask: [B, L] 1 where input_ids[t] is an answer token to predict (from position t-1).

  Returns:
    (sum of token losses, number of answer tokens), so callers can average across batches/hosts.
  """
  targets = input_ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return jnp.sum(nll * mask), jnp.sum(mask)
