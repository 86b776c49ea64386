"""How the kernels multiply: float32 accumulation, the bf16 hi/lo split of the float32 rank
intermediate, and which `lax.Precision` float32 products use. Shared by the Triton and TPU kernels
(`triton.py`, `tpu.py`); the tile choice (`tiles.py`) resolves the precision once per call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def resolve_precision(precision) -> Any:
  if precision is not None:
    if isinstance(precision, (tuple, list)):
      precision = precision[0]
    return lax.Precision(precision) if isinstance(precision, str) else precision
  cfg = getattr(jax.config, "jax_default_matmul_precision", None)
  cfg = str(cfg).lower() if cfg is not None else ""
  if cfg in ("highest", "float32", "f32_f32_f32"):
    return lax.Precision.HIGHEST
  return lax.Precision.DEFAULT



def dot(a, b, precision):
  """a @ b with float32 accumulation; operands promoted to a common dtype."""
  dt = jnp.promote_types(a.dtype, b.dtype)
  return jnp.dot(a.astype(dt), b.astype(dt), preferred_element_type=F32, precision=precision)


def dot_f32_lhs(z, w, precision):
  """z (float32) @ w with z kept at ~fp32 accuracy.

  bf16 weights: z = hi + lo (bf16 each), two bf16 tensor-core products (exact products, fp32
  accumulate, ~16 significant bits of z). Otherwise: float32 product at `precision`.
  """
  if w.dtype == jnp.bfloat16:
    hi = z.astype(jnp.bfloat16)
    lo = (z - hi.astype(F32)).astype(jnp.bfloat16)
    return (jnp.dot(hi, w, preferred_element_type=F32)
            + jnp.dot(lo, w, preferred_element_type=F32))
  return jnp.dot(z, w.astype(F32), preferred_element_type=F32, precision=precision)
