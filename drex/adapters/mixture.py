"""The adapter mixture: one function, several implementations behind one signature.

For an adapted linear with input tokens `x` and stacked LoRA experts:

    delta[t] = scale * sum_e gates[t, e] * (x[t] @ a[e]) @ b[e]

The rank intermediate `x @ a` is accumulated and kept in float32. Routers (`drex.adapters.routing`)
only produce `gates`; this module only mixes.
"""

from __future__ import annotations

import math

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


def adapter_mixture(x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, scale: float,
                    kernel: str = "xla", top_k: int | None = None) -> jax.Array:
  """Mixture of LoRA experts; `kernel` picks the implementation: 'xla', 'pallas', or 'auto' (the
  faster one for this shape and backend, from the measurements behind
  `drex.kernels.mixture_pallas.choose_kernel`; `top_k` = experts per token when known).

  Shapes as in `mixture_reference`.
  """
  if kernel == "auto":
    from drex.kernels import mixture_pallas  # pylint: disable=g-import-not-at-top
    num_tokens = math.prod(x.shape[:-1])
    kernel = mixture_pallas.choose_kernel(num_tokens, x.shape[-1], b.shape[-1], a.shape[-1], a.shape[0], x.dtype,
                                          top_k=top_k)
  if kernel == "xla":
    return mixture_reference(x, a, b, gates, scale)
  if kernel == "pallas":
    from drex.kernels import mixture_pallas  # pylint: disable=g-import-not-at-top
    return mixture_pallas.adapter_mixture(x, a, b, gates, scale)
  raise ValueError(f"unknown adapter kernel {kernel!r}; use one of {KERNELS}")
