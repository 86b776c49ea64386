"""Building blocks shared by the vision encoder and the LLM: linears, norms, rotary embedding, dtype names."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from drex.models.config import RopeConfig

Dtype = Any


def dtype_of(name: str | Dtype) -> Dtype:
  """'float32' | 'bfloat16' | 'float16' -> jnp dtype; a clear error for anything else."""
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"unknown dtype {name!r}; use 'float32', 'bfloat16' or 'float16'") from e


class RMSNorm(nn.Module):
  """x / rms(x) computed in float32, cast back to the input dtype, then times the weight."""

  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


class Linear(nn.Module):
  """y = x @ kernel (+ bias). kernel: [d_in, features] with logical axes `axes`; x: [..., d_in] -> [..., features].

  The LLM also passes `token_mask` ([B, L] bool, the real tokens of x), which a subclass may use (routing that
  looks at a whole sequence); this one ignores it."""

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    del token_mask
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


@dataclasses.dataclass(frozen=True)
class LinearFactory:
  """What the LLM builds for each of its linears: a plain `Linear` here. Another package can inject a
  subclass of both (drex.adapters.lora.AdapterSpec builds linears that add routed LoRA experts); the param
  paths stay those of `Linear`. Frozen and compared by value, so models holding one stay jit-static."""

  def __call__(self, features: int, axes: tuple[str, str], use_bias: bool, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.Module:
    return Linear(features, axes, use_bias, dtype, param_dtype, name=name)

  def prepare(self, model: nn.Module, variables: dict, embeds, positions, kv_mask) -> dict:
    """The variables of a pass over these prompts (embeddings [B, L, d], positions [B, L], kv_mask [B, L] bool:
    the real tokens), with whatever the linears make from the prompts first (a router that identifies each
    prompt's task adds its choice). Nothing to make here."""
    del model, embeds, positions, kv_mask
    return variables


def layer_norm(eps: float, param_dtype: Dtype, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with affine scale/bias, float32 statistics, logical axis 'norm'."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch nn.GELU() / HF 'gelu'."""
  return jax.nn.gelu(x, approximate=False)


def rope_tables(positions: jax.Array, head_dim: int, cfg: RopeConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin for rotate-half RoPE. positions: [B, L] int -> two [B, L, head_dim] float32 arrays."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  pos = positions.astype(jnp.float32)
  seq_len = jnp.max(positions) + 1
  magnitude = 1.0
  if cfg.kind == "default":
    inv_freq = cfg.theta ** -exponent
  elif cfg.kind == "dynamic":
    # NTK-aware base rescale, only once the sequence exceeds max_position_embeddings.
    longer = jnp.maximum(seq_len, cfg.max_position_embeddings).astype(jnp.float32)
    base = cfg.theta * ((cfg.factor * longer / cfg.max_position_embeddings) - (cfg.factor - 1)) ** (
        head_dim / (head_dim - 2))
    inv_freq = base ** -exponent
  elif cfg.kind == "longrope":
    short = jnp.asarray(cfg.short_factor, jnp.float32)
    long = jnp.asarray(cfg.long_factor, jnp.float32)
    ext = jnp.where(seq_len > cfg.original_max_position_embeddings, long, short)
    inv_freq = 1.0 / (ext * cfg.theta ** exponent)
    ratio = cfg.max_position_embeddings / cfg.original_max_position_embeddings
    if ratio > 1.0:
      magnitude = math.sqrt(1 + math.log(ratio) / math.log(cfg.original_max_position_embeddings))
  else:
    raise ValueError(f"unknown rope kind {cfg.kind!r}; use 'default', 'dynamic' or 'longrope'")
  freqs = pos[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], -1)
  return jnp.cos(emb) * magnitude, jnp.sin(emb) * magnitude


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, L, heads, D]; cos/sin: [B, L, D]. Rotate-half convention, computed in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)
