"""The decoder LLM: RMSNorm, RoPE, grouped-query attention, SwiGLU. Every linear of the decoder layers is
built by the injected `linear` factory (drex.models.layers.LinearFactory: a plain Linear by default), so
another package can add to them (drex.adapters routes LoRA experts in) without this module knowing.

Shapes: B batch, L query length, S key/cache length, H heads, K kv heads, D head dim, d model width.
Sequences are left-padded: `kv_mask [B, S]` says which key slots hold real tokens, and slot j may be
attended from query slot i iff j <= i.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from drex.models.config import LLMConfig
from drex.models.layers import LinearFactory, RMSNorm, apply_rope, rope_tables

Cache = dict[str, dict[str, jax.Array]]  # {'layers_i': {'k': [B, S, K, D], 'v': [B, S, K, D]}}


def init_cache(cfg: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> Cache:
  """An empty KV cache with `length` slots per sequence."""
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for i in range(cfg.num_layers)}


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache."""

  cfg: LLMConfig
  linear: LinearFactory
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, kv_mask, query_mask, cache=None, cache_index=0):
    """x: [B, L, d]; cos/sin: [B, L, D]; kv_mask: [B, S]; query_mask: [B, L] (real tokens of x);
    cache: {'k','v': [B, S, K, D]} or None.

    Returns ([B, L, d], updated cache or None).
    """
    cfg = self.cfg
    b, l, _ = x.shape
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda f, axes, bias, name: self.linear(f, axes, bias, self.dtype, self.param_dtype, name=name)
    q = dense(h * d, ("embed", "heads"), cfg.qkv_bias, "q_proj")(x, query_mask).reshape(b, l, h, d)
    key = dense(k * d, ("embed", "kv_heads"), cfg.qkv_bias, "k_proj")(x, query_mask).reshape(b, l, k, d)
    value = dense(k * d, ("embed", "kv_heads"), cfg.qkv_bias, "v_proj")(x, query_mask).reshape(b, l, k, d)
    q = apply_rope(q, cos, sin)
    key = apply_rope(key, cos, sin)
    if cache is not None:
      key = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), (0, cache_index, 0, 0))
      value = jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), (0, cache_index, 0, 0))
      cache = {"k": key, "v": value}
    s = key.shape[1]
    q_slots = cache_index + jnp.arange(l)
    allowed = kv_mask[:, None, None, None, :] & (jnp.arange(s)[None, :] <= q_slots[:, None])[None, None, None]
    q = q.reshape(b, l, k, h // k, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, key.astype(q.dtype)).astype(jnp.float32) / jnp.sqrt(d)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, value.astype(self.dtype)).reshape(b, l, h * d)
    return dense(cfg.d_model, ("heads", "embed"), False, "o_proj")(out, query_mask), cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  cfg: LLMConfig
  linear: LinearFactory
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, query_mask):
    """x: [B, L, d], query_mask: [B, L] -> [B, L, d]."""
    dense = lambda f, axes, name: self.linear(f, axes, False, self.dtype, self.param_dtype, name=name)
    gate = dense(self.cfg.d_ff, ("embed", "mlp"), "gate_proj")(x, query_mask)
    up = dense(self.cfg.d_ff, ("embed", "mlp"), "up_proj")(x, query_mask)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                        ("activation_batch", "activation_length", "activation_mlp"))
    return dense(self.cfg.d_model, ("mlp", "embed"), "down_proj")(hidden, query_mask)


class DecoderLayer(nn.Module):
  cfg: LLMConfig
  linear: LinearFactory
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, kv_mask, query_mask, cache=None, cache_index=0):
    """x: [B, L, d] -> ([B, L, d], cache)."""
    eps, pd = self.cfg.norm_eps, self.param_dtype
    attn_out, cache = Attention(self.cfg, self.linear, self.dtype, pd, name="self_attn")(
        RMSNorm(eps, pd, name="input_layernorm")(x), cos, sin, kv_mask, query_mask, cache, cache_index)
    x = x + attn_out
    x = x + MLP(self.cfg, self.linear, self.dtype, pd, name="mlp")(
        RMSNorm(eps, pd, name="post_attention_layernorm")(x), query_mask)
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed")), cache


class Decoder(nn.Module):
  """Token embedding, decoder layers, final norm, LM head."""

  cfg: LLMConfig
  linear: LinearFactory = LinearFactory()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.layers = [DecoderLayer(cfg, self.linear, self.dtype, self.param_dtype, name=f"layers_{i}")
                   for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.norm_eps, self.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       ("embed", "vocab")))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, d]."""
    return self.embed_tokens(input_ids)

  def __call__(self, embeds, positions, kv_mask, cache: Cache | None = None, cache_index=0, depth: int | None = None):
    """embeds: [B, L, d]; positions: [B, L]; kv_mask: [B, S] bool (S = L without a cache).

    Returns (logits [B, L, vocab] float32, updated cache or None); with `depth`, only the first `depth` layers
    run and (their output [B, L, d], None) is returned (a pass that reads early layers' inputs only).
    """
    cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope)
    x = nn.with_logical_constraint(embeds.astype(self.dtype),
                                   ("activation_batch", "activation_length", "activation_embed"))
    b, l = embeds.shape[:2]
    query_mask = kv_mask if cache is None else jax.lax.dynamic_slice(kv_mask, (0, cache_index), (b, l))
    new_cache = {} if cache is not None else None
    for i, layer in enumerate(self.layers[:depth]):
      name = f"layers_{i}"
      x, layer_cache = layer(x, cos, sin, kv_mask, query_mask, None if cache is None else cache[name], cache_index)
      if cache is not None:
        new_cache[name] = layer_cache
    if depth is not None:
      return x, None
    x = self.norm(x)
    logits = self.embed_tokens.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                        ("activation_batch", "activation_length", "activation_vocab"))
    return logits, new_cache
