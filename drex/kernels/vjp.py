"""What makes the kernels train: the `jax.custom_vjp` cores (2-D inputs; scale a float32 scalar).

Forward: the backend's kernels (`tpu.py` on TPU, `triton.py` on GPU and CPU). Backward (all
variants): plain JAX (XLA einsums) with float32 rank intermediates, recomputing `x @ A`. Gradients
are produced for x, a, b, gates and scale; for `mixed_core` also for the frozen base `w` and
`bias` (the true gradients: when the caller does not use them, XLA removes their computation as
dead code, so a frozen base costs nothing).

Owns: `mixture_core`, `mixed_core`, `per_sequence_core` (called by `api.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drex.adapters.mixture import mixture_grads
from drex.kernels import tpu, triton
from drex.kernels.precision import F32


def _forward(cfg, x, a, b, gates, scale, w=None, bias=None):
  if cfg.backend == "tpu":
    return tpu.forward(cfg, x, a, b, gates, scale, w, bias)
  return triton.forward(cfg, x, a, b, gates, scale, w, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixture_core(cfg, x, a, b, gates, scale):
  return _forward(cfg, x, a, b, gates, scale)


def _mixture_core_fwd(cfg, x, a, b, gates, scale):
  return _forward(cfg, x, a, b, gates, scale), (x, a, b, gates, scale)


def _mixture_core_bwd(cfg, res, dy):
  del cfg
  return mixture_grads(*res, dy)


mixture_core.defvjp(_mixture_core_fwd, _mixture_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def mixed_core(cfg, has_bias, x, w, bias, a, b, gates, scale):
  return _forward(cfg, x, a, b, gates, scale, w, bias if has_bias else None)


def _mixed_core_fwd(cfg, has_bias, x, w, bias, a, b, gates, scale):
  y = _forward(cfg, x, a, b, gates, scale, w, bias if has_bias else None)
  return y, (x, w, bias, a, b, gates, scale)


def _mixed_core_bwd(cfg, has_bias, res, dy):
  del cfg
  x, w, bias, a, b, gates, scale = res
  dx, da, db, dg, ds = mixture_grads(x, a, b, gates, scale, dy)
  # Frozen base: true gradients, dead code unless the caller differentiates w.r.t. w / bias.
  dx = (dx.astype(F32) + jnp.dot(dy, w.T, preferred_element_type=F32)).astype(x.dtype)
  dw = jnp.dot(x.T, dy, preferred_element_type=F32).astype(w.dtype)
  dbias = (jnp.sum(dy.astype(F32), axis=0).astype(bias.dtype) if has_bias
           else jnp.zeros_like(bias))
  return dx, dw, dbias, da, db, dg, ds


mixed_core.defvjp(_mixed_core_fwd, _mixed_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def per_sequence_core(cfg, x, a, b, idx, gs):
  if cfg.backend == "tpu":
    return tpu.per_sequence(cfg, x, a, b, idx, gs)
  return triton.per_sequence(cfg, x, a, b, idx, gs)


def _perseq_core_fwd(cfg, x, a, b, idx, gs):
  return per_sequence_core(cfg, x, a, b, idx, gs), (x, a, b, idx, gs)


def _perseq_core_bwd(cfg, res, dy):
  del cfg
  x, a, b, idx, gs = res
  ae, be = a[idx].astype(F32), b[idx].astype(F32)
  dyf = dy.astype(F32)
  z = jnp.einsum("sld,sdr->slr", x, ae, preferred_element_type=F32)
  u = jnp.einsum("slo,sro->slr", dyf, be)
  d_gs = jnp.sum(z * u, axis=(1, 2)).astype(gs.dtype)
  ug = u * gs[:, None, None]
  dx = jnp.einsum("slr,sdr->sld", ug, ae).astype(x.dtype)
  dae = jnp.einsum("sld,slr->sdr", x.astype(F32), ug)
  dbe = jnp.einsum("slr,slo->sro", z * gs[:, None, None], dyf)
  da = jnp.zeros(a.shape, F32).at[idx].add(dae).astype(a.dtype)
  db = jnp.zeros(b.shape, F32).at[idx].add(dbe).astype(b.dtype)
  return dx, da, db, None, d_gs


per_sequence_core.defvjp(_perseq_core_fwd, _perseq_core_bwd)
