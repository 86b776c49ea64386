"""InternViT: the frozen vision encoder of InternVL-2.

Patch embedding (conv, stride = patch), a CLS token, a learned position embedding for the trained
grid (bicubically resized for other grids, as torch `F.interpolate(bicubic, align_corners=False)`),
pre-norm blocks with layer scale, no final norm. Output: last layer's patch tokens (CLS dropped).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drex.models.config import VisionConfig
from drex.models.layers import RMSNorm, gelu, layer_norm


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for offsets t in [0, 1): [n] -> [n, 4] (torch's a = -0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch bicubic interpolation (align_corners=False, border clamped)."""
  scale = n_in / n_out
  src = (np.arange(n_out) + 0.5) * scale - 0.5
  base = np.floor(src).astype(np.int64)
  w = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in), np.float64)
  for tap in range(4):
    idx = np.clip(base - 1 + tap, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, tap])
  return m.astype(np.float32)


def resize_position_grid(pos: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """pos: [g, g, C] -> [grid_h, grid_w, C] by separable torch-compatible bicubic interpolation."""
  g = pos.shape[0]
  if (grid_h, grid_w) == (g, g):
    return pos
  mh, mw = bicubic_resize_matrix(g, grid_h), bicubic_resize_matrix(g, grid_w)
  out = jnp.einsum("hi,wj,ijc->hwc", mh, mw, pos.astype(jnp.float32))
  return out.astype(pos.dtype)


class VisionAttention(nn.Module):
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [N, P, C] -> [N, P, C]. Fused qkv laid out [all q | all k | all v]."""
    n, p, c = x.shape
    h = self.cfg.num_heads
    qkv = nn.Dense(3 * c, use_bias=self.cfg.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv",
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "heads")))(x)
    q, k, v = jnp.split(qkv, 3, -1)
    if self.cfg.qk_norm:
      q = RMSNorm(self.cfg.norm_eps, self.param_dtype, name="q_norm")(q)
      k = RMSNorm(self.cfg.norm_eps, self.param_dtype, name="k_norm")(k)
    q, k, v = (t.reshape(n, p, h, c // h) for t in (q, k, v))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(c // h).astype(self.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32), -1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, p, c)
    return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "embed")))(out)


class VisionBlock(nn.Module):
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _norm(self, name):
    if self.cfg.norm_type == "rms_norm":
      return RMSNorm(self.cfg.norm_eps, self.param_dtype, name=name)
    return layer_norm(self.cfg.norm_eps, self.param_dtype, self.dtype, name=name)

  @nn.compact
  def __call__(self, x):
    """x: [N, P, C] -> [N, P, C]: x + ls1 * attn(norm1 x), then x + ls2 * mlp(norm2 x)."""
    c = x.shape[-1]
    scale = lambda name: self.param(name, nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,),
                                    self.param_dtype).astype(self.dtype)
    dense = lambda f, axes, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                           kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes))
    x = x + scale("ls1") * VisionAttention(self.cfg, self.dtype, self.param_dtype, name="attn")(self._norm("norm1")(x))
    hidden = gelu(dense(self.cfg.mlp_dim, ("embed", "mlp"), "fc1")(self._norm("norm2")(x)))
    x = x + scale("ls2") * dense(c, ("mlp", "embed"), "fc2")(hidden)
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class InternViT(nn.Module):
  """pixels [N, H, W, 3] (normalized) -> patch features [N, H/p, W/p, C] (CLS dropped)."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    c, p = cfg.width, cfg.patch_size
    x = nn.Conv(c, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                name="patch_embedding",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")))(
                    pixels.astype(self.dtype))
    n, gh, gw, _ = x.shape
    cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, c), self.param_dtype)
    g = cfg.grid
    pos = self.param("position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1 + g * g, c), self.param_dtype)
    patch_pos = resize_position_grid(pos[0, 1:].reshape(g, g, c), gh, gw).reshape(1, gh * gw, c)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c)), x.reshape(n, gh * gw, c)], 1)
    x = x + jnp.concatenate([pos[:, :1], patch_pos], 1).astype(self.dtype)
    for i in range(cfg.depth):
      x = VisionBlock(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
    return x[:, 1:].reshape(n, gh, gw, c)
