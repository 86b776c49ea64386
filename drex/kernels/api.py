"""The public functions of the kernel package: argument checks, flattening of leading dims, the
per-call configuration, then the custom_vjp cores of `vjp.py`.

* `adapter_mixture(x, a, b, gates, scale)`: the mixture; same contract as
  `drex.adapters.mixture.mixture_reference`.
* `mixed_linear(x, w, bias, a, b, gates, scale)`: `x @ w + bias + adapter_mixture(...)` with the
  frozen base matmul fused into the up-projection kernel (one pass over the output).
* `per_sequence_lora(x [B, L, d_in], a, b, expert_index [B], scale)`: one expert per sequence
  (multi-task serving); the index picks the expert's weights inside the kernel.

All are jit-able and differentiable. Semantics note: because inactive experts are skipped, a token
whose gate is exactly 0 for an expert gets exactly 0 from it even if `x @ A[e]` is inf/NaN (the
reference would give NaN).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from drex.kernels.precision import F32
from drex.kernels.tiles import Tiles, default_tiles, detect_backend, make_config, pow2
from drex.kernels.vjp import mixed_core, mixture_core, per_sequence_core


def _check_mixture_shapes(fn, x, a, b, gates):
  if x.ndim < 1 or a.ndim != 3 or b.ndim != 3 or gates.ndim < 1:
    raise ValueError(f"{fn}: expected x [..., d_in], a [E, d_in, r], b [E, r, d_out], "
                     f"gates [..., E]; got x {x.shape}, a {a.shape}, b {b.shape}, "
                     f"gates {gates.shape}")
  E, d_in, r = a.shape
  problems = []
  if x.shape[-1] != d_in:
    problems.append(f"x {x.shape} has d_in={x.shape[-1]} but a {a.shape} has d_in={d_in}")
  if b.shape[0] != E or b.shape[1] != r:
    problems.append(f"b {b.shape} does not match a {a.shape} (expected [{E}, {r}, d_out])")
  if gates.shape[-1] != E:
    problems.append(f"gates {gates.shape} has {gates.shape[-1]} experts but a {a.shape} has {E}")
  if gates.shape[:-1] != x.shape[:-1]:
    problems.append(f"gates {gates.shape} leading dims differ from x {x.shape}")
  if problems:
    raise ValueError(f"{fn}: " + "; ".join(problems))


def adapter_mixture(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, scale,
                    *, backend: str | None = None, interpret: bool | None = None,
                    tiles: Tiles | None = None, precision=None,
                    skip_inactive: bool = True) -> jax.Array:
  """Mixture of LoRA experts with Pallas kernels; same contract as `mixture_reference`.

  Args:
    x: [..., d_in] tokens (leading dims are flattened).
    a: [E, d_in, r] stacked LoRA A.
    b: [E, r, d_out] stacked LoRA B.
    gates: [..., E] routing weights (zeros for unused experts; those are skipped).
    scale: LoRA scale (python float or scalar array; differentiable).
    backend: 'gpu' | 'tpu' | 'cpu' (default: `jax.default_backend()`); picks kernels and tiles.
    interpret: run the kernels in Pallas interpret mode (default: on CPU only).
    tiles: override the tile sizes (see `Tiles`, `default_tiles`).
    precision: precision of float32 products (default from `jax_default_matmul_precision`).
    skip_inactive: skip experts whose gates are all zero in a token tile.

  Returns:
    [..., d_out] in x.dtype.
  """
  _check_mixture_shapes("adapter_mixture", x, a, b, gates)
  lead = x.shape[:-1]
  E, d_in, r = a.shape
  d_out = b.shape[-1]
  T = math.prod(lead)
  if T == 0:
    return jnp.zeros(lead + (d_out,), x.dtype)
  cfg = make_config(T, d_in, d_out, r, E, x.dtype, backend, interpret, tiles, precision,
                    skip_inactive)
  y = mixture_core(cfg, x.reshape(T, d_in), a, b, gates.reshape(T, E), jnp.asarray(scale, F32))
  return y.reshape(lead + (d_out,))


def mixed_linear(x: jax.Array, w: jax.Array, bias: jax.Array | None, a: jax.Array, b: jax.Array,
                 gates: jax.Array, scale, *, backend: str | None = None,
                 interpret: bool | None = None, tiles: Tiles | None = None, precision=None,
                 skip_inactive: bool = True) -> jax.Array:
  """`x @ w + bias + adapter_mixture(x, a, b, gates, scale)` with the base matmul fused.

  Args:
    x: [..., d_in]; w: [d_in, d_out] frozen base kernel (cast to x.dtype if it differs);
    bias: [d_out] or None; the rest as in `adapter_mixture`.

  Returns:
    [..., d_out] in x.dtype. Gradients: x, a, b, gates, scale, and the true gradients of w and
    bias (removed by XLA as dead code when unused, e.g. for a frozen base).
  """
  _check_mixture_shapes("mixed_linear", x, a, b, gates)
  E, d_in, r = a.shape
  d_out = b.shape[-1]
  if w.shape != (d_in, d_out):
    raise ValueError(f"mixed_linear: w {w.shape} must be [d_in, d_out] = [{d_in}, {d_out}] "
                     f"(x {x.shape}, b {b.shape})")
  if bias is not None and bias.shape != (d_out,):
    raise ValueError(f"mixed_linear: bias {bias.shape} must be [{d_out}] (w {w.shape})")
  lead = x.shape[:-1]
  T = math.prod(lead)
  if T == 0:
    return jnp.zeros(lead + (d_out,), x.dtype)
  cfg = make_config(T, d_in, d_out, r, E, x.dtype, backend, interpret, tiles, precision,
                    skip_inactive)
  has_bias = bias is not None
  bias_arg = bias if has_bias else jnp.zeros((d_out,), x.dtype)
  y = mixed_core(cfg, has_bias, x.reshape(T, d_in), w.astype(x.dtype), bias_arg, a, b,
                  gates.reshape(T, E), jnp.asarray(scale, F32))
  return y.reshape(lead + (d_out,))


def per_sequence_lora(x: jax.Array, a: jax.Array, b: jax.Array, expert_index: jax.Array, scale,
                      *, backend: str | None = None, interpret: bool | None = None,
                      tiles: Tiles | None = None, precision=None) -> jax.Array:
  """One LoRA expert per sequence: `y[s] = scale * (x[s] @ a[i_s]) @ b[i_s]`, `i = expert_index`.

  Args:
    x: [B, L, d_in]; a: [E, d_in, r]; b: [E, r, d_out];
    expert_index: [B] integer expert per sequence (clipped to [0, E-1], like `jnp.take`);
    scale: python float, scalar, or [B] per-sequence scales (differentiable).

  Returns:
    [B, L, d_out] in x.dtype.
  """
  if x.ndim != 3 or a.ndim != 3 or b.ndim != 3:
    raise ValueError(f"per_sequence_lora: expected x [B, L, d_in], a [E, d_in, r], "
                     f"b [E, r, d_out]; got x {x.shape}, a {a.shape}, b {b.shape}")
  B, L, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  if a.shape[1] != d_in or b.shape[:2] != (E, r):
    raise ValueError(f"per_sequence_lora: shapes do not match: x {x.shape}, a {a.shape}, "
                     f"b {b.shape}")
  if jnp.shape(expert_index) != (B,):
    raise ValueError(f"per_sequence_lora: expert_index {jnp.shape(expert_index)} must be [{B}] "
                     f"(x {x.shape})")
  if not jnp.issubdtype(jnp.asarray(expert_index).dtype, jnp.integer):
    raise ValueError(f"per_sequence_lora: expert_index must be integer, got "
                     f"{jnp.asarray(expert_index).dtype}")
  if B * L == 0:
    return jnp.zeros((B, L, d_out), x.dtype)
  idx = jnp.clip(jnp.asarray(expert_index, jnp.int32), 0, E - 1)
  gs = jnp.broadcast_to(jnp.asarray(scale, F32), (B,))
  be = detect_backend(backend)
  if tiles is None:
    t = default_tiles(L, d_in, d_out, r, 1, x.dtype, be)
    if be == "gpu":
      t = dataclasses.replace(t, block_t=max(16, min(64, pow2(L))), block_n=128)
    tiles = t
  cfg = make_config(L, d_in, d_out, r, 1, x.dtype, backend, interpret, tiles, precision, False)
  return per_sequence_core(cfg, x, a, b, idx, gs)
