"""The adapter mixture: one function, several implementations behind one signature.

For an adapted linear with input tokens `x` and stacked LoRA experts:

    delta[t] = scale * sum_e gates[t, e] * (x[t] @ a[e]) @ b[e]

The rank intermediate `x @ a` is accumulated and kept in float32. Routers (`drex.adapters.routers`)
only produce `gates`; this module mixes, and picks the implementation (`choose_kernel`: plain JAX,
or the Pallas kernels of `drex.kernels`, imported only when chosen).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

KERNELS = ("xla", "pallas", "auto")


def mixture_reference(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array,
                      scale: float) -> jax.Array:
  """Plain-JAX dense mixture.

  Args:
    x: [..., d_in] tokens.
    a: [E, d_in, r] stacked LoRA A matrices.
    b: [E, r, d_out] stacked LoRA B matrices.
    gates: [..., E] routing weights (zero for experts a token does not use).
    scale: LoRA scale (alpha / r).

  Returns:
    [..., d_out] in x.dtype.
  """
  z = jnp.einsum("...d,edr->...er", x, a, preferred_element_type=jnp.float32)
  z = z * (gates.astype(jnp.float32) * scale)[..., None]
  y = jnp.einsum("...er,ero->...o", z, b.astype(jnp.float32))
  return y.astype(x.dtype)


def mixture_grads(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, scale: jax.Array | float,
                  dy: jax.Array) -> tuple[jax.Array, ...]:
  """Cotangents of `mixture_reference` over 2-D tokens, recomputing the rank intermediate x @ a (float32).

  Args:
    x: [T, d_in]; a: [E, d_in, r]; b: [E, r, d_out]; gates: [T, E]; scale: LoRA scale; dy: [T, d_out].

  Returns:
    (dx [T, d_in], da [E, d_in, r], db [E, r, d_out], d_gates [T, E], d_scale []) in their inputs' dtypes
    (d_scale float32).

  The expert gradients contract over the T tokens with the small rank side transposed, [E*r, T] @ [T, d]:
  written as einsums over T (what autodiff of `mixture_reference` gives), XLA:CPU transposes the [T, d]
  activations or output gradient instead, for every adapted linear (a fifth of the tiny base's train step).
  """
  f32 = jnp.float32
  e, d_in, r = a.shape
  dyf = dy.astype(f32)
  z = jnp.einsum("td,edr->ter", x, a, preferred_element_type=f32)  # [T, E, r]
  u = jnp.einsum("to,ero->ter", dyf, b.astype(f32))  # dL/d(z * weight)
  g = gates.astype(f32)
  zu = jnp.sum(z * u, axis=-1)  # [T, E]
  weight = (g * scale)[..., None]
  ug = u * weight  # dL/dz
  db = ((z * weight).reshape(-1, e * r).T @ dyf).reshape(e, r, -1)
  da = (ug.reshape(-1, e * r).T @ x.astype(f32)).reshape(e, r, d_in).transpose(0, 2, 1)
  dx = jnp.einsum("ter,edr->td", ug, a.astype(f32))
  return (dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), (zu * scale).astype(gates.dtype),
          jnp.sum(zu * g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dense_mixture(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, scale: float) -> jax.Array:
  """`mixture_reference` (the 'xla' kernel) differentiated by `mixture_grads`. Shapes as there."""
  return mixture_reference(x, a, b, gates, scale)


def _dense_mixture_fwd(x, a, b, gates, scale):
  return mixture_reference(x, a, b, gates, scale), (x, a, b, gates)


def _dense_mixture_bwd(scale, residuals, dy):
  x, a, b, gates = residuals
  tokens = x.shape[:-1]
  dx, da, db, d_gates, _ = mixture_grads(x.reshape(-1, x.shape[-1]), a, b, gates.reshape(-1, gates.shape[-1]),
                                         scale, dy.reshape(-1, dy.shape[-1]))
  return dx.reshape(x.shape), da, db, d_gates.reshape(tokens + gates.shape[-1:])


dense_mixture.defvjp(_dense_mixture_fwd, _dense_mixture_bwd)


def sequence_mixture(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, experts: jax.Array,
                     scale: float) -> jax.Array:
  """The mixture when each sequence uses only a few experts (a per-sequence router's choice): those experts are
  gathered, so the cost grows with their number, not with the E experts of the bank.

  Args:
    x: [B, L, d_in] tokens.
    a, b: [E, d_in, r], [E, r, d_out] stacked experts.
    gates: [B, L, E] routing weights, zero outside each sequence's experts.
    experts: [B, c] the experts each sequence may use (indices into E).
    scale: LoRA scale.

  Returns:
    [B, L, d_out] in x.dtype (equal to `mixture_reference` up to float summation order).
  """
  weights = jnp.take_along_axis(gates.astype(jnp.float32), experts[:, None, :], axis=-1)  # [B, L, c]
  z = jnp.einsum("bld,bcdr->blcr", x, a[experts], preferred_element_type=jnp.float32)
  z = z * (weights * scale)[..., None]
  y = jnp.einsum("blcr,bcro->blo", z, b[experts].astype(jnp.float32))
  return y.astype(x.dtype)


def adapter_mixture(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, scale: float,
                    kernel: str = "xla", top_k: int | None = None) -> jax.Array:
  """Mixture of LoRA experts; `kernel` picks the implementation: 'xla', 'pallas', or 'auto' (the
  faster one for this shape and backend, from the measurements behind `choose_kernel`; `top_k` =
  experts per token when known).

  Shapes as in `mixture_reference`.
  """
  if kernel == "auto":
    num_tokens = math.prod(x.shape[:-1])
    kernel = choose_kernel(num_tokens, x.shape[-1], b.shape[-1], a.shape[-1], a.shape[0], x.dtype,
                           top_k=top_k)
  if kernel == "xla":
    return dense_mixture(x, a, b, gates, scale)
  if kernel == "pallas":
    from drex import kernels  # pylint: disable=g-import-not-at-top
    return kernels.adapter_mixture(x, a, b, gates, scale)
  raise ValueError(f"unknown adapter kernel {kernel!r}; use one of {KERNELS}")


_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def choose_kernel(num_tokens: int, d_in: int, d_out: int, rank: int, num_experts: int,
                  dtype: Any, backend: str | None = None, *, top_k: int | None = None) -> str:
  """'pallas' or 'xla' for one adapted linear, from the H100 measurements in benchmarks/results/.

  Measured on an H100 80GB HBM3 (jax 0.11.2, `benchmarks/adapter_mixture.py --quick --tune`),
  speed-up of the Pallas kernels (`drex.kernels`) over the best plain-JAX path (xla_dense /
  ragged_dot / loop):
    prefill (T = 4096..16384), bf16: 0.64-0.83x; float32: 0.28x          -> 'xla'
    decode T=16..64, E=8..32, r=16..64: 0.62-0.98x                        -> 'xla'
    decode T=8, dense gates (k=E=16): 1.00x                               -> 'xla'
    decode T=1, sparse top-k (E=32 k=2 r=64; E=8 k=1 r=16), bf16: 1.11x, 1.08x -> 'pallas'
  The only wins come from skipping the experts a single token is not routed to; XLA's dense
  path reads every expert. So: 'pallas' on GPU for one token per call (per adapted linear) with
  sparse gates (`top_k` < num_experts, or `top_k` unknown) in a 16-bit dtype; 'xla' otherwise.
  CPU runs the kernels interpreted (slow) and TPU is unmeasured: 'xla' there.
  `d_in`, `d_out` and `rank` do not change the choice in the measured range (d 2048-4096,
  r 8-64). `backend`: 'gpu' (or 'cuda', 'rocm'), 'tpu' or 'cpu'; default `jax.default_backend()`.
  """
  platform = (backend or jax.default_backend()).lower()
  if platform not in _GPU_PLATFORMS + ("tpu", "cpu"):
    raise ValueError(f"unsupported backend {backend!r}; use 'gpu', 'tpu' or 'cpu'")
  if platform not in _GPU_PLATFORMS:
    return "xla"
  del d_in, d_out, rank
  sparse = top_k is None or top_k < num_experts
  small_float = jnp.dtype(dtype).itemsize <= 2
  if num_tokens <= 1 and num_experts >= 2 and sparse and small_float:
    return "pallas"
  return "xla"
