"""GPU kernels of the adapter mixture (Pallas, Triton lowering); on CPU the same kernels run in
interpret mode.

Two kernels. The *down* kernel computes `z = (x @ A[e]) * g[:, e] * scale` for a group of experts
per program (x tile loaded once per d_in step and reused for every expert of the group), optionally
split over d_in (partial sums, deterministic: no atomics) to fill the GPU at decode sizes. The *up*
kernel computes `y = z @ B_cat` tile by tile (optionally `+ x @ W + bias` first: `mixed_linear`).
Both skip experts whose gates are all zero in a token tile (sparse top-k routing at decode reads
only the experts in use). Ragged sizes are handled by masked loads/stores (nothing is padded or
copied) except `r`, which the kernels round up to a power of two (>= 16 on GPU, for the tensor
cores) with masked loads. The second matmul keeps `z` in float32 (see `precision.dot_f32_lhs`).

`per_sequence` (one expert per sequence) reads the expert index with a scalar load inside the
kernel: the Triton backend has no scalar prefetch.

Owns: `forward(cfg, x, a, b, gates, scale, w=None, bias=None)` and
`per_sequence(cfg, x, a, b, idx, gs)` on 2-D / 3-D inputs (no custom_vjp here: see `vjp.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from drex.kernels.precision import F32, dot, dot_f32_lhs
from drex.kernels.tiles import KernelConfig, cdiv, rank_pad

try:  # Triton-specific masked load/store (GPU lowering; also interpretable on CPU).
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None


def _and(*masks):
  out = None
  for m in masks:
    if m is None:
      continue
    out = m if out is None else out & m
  return out


def _load(ref, mask=None, other=0):
  if mask is None:
    return ref[...]
  return plgpu.load(ref, mask=mask, other=other)


def _store(ref, val, mask=None):
  if mask is None:
    ref[...] = val
  else:
    plgpu.store(ref, val, mask=mask)


def _triton_params(cfg: KernelConfig):
  if cfg.interpret or plgpu is None:
    return None
  return plgpu.CompilerParams(num_warps=cfg.tiles.num_warps, num_stages=cfg.tiles.num_stages)


def _down_kernel(x_ref, a_ref, g_ref, s_ref, z_ref, *, T, d_in, E, r, rp, bt, bk, ge, nk,
                 precision, skip):
  """z[s, tile, e*rp:(e+1)*rp] = (x[tile, ks] @ a[e, ks, :]) * g[tile, e] * scale."""
  gi, s, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row0 = i * bt
  rmask = None if T % bt == 0 else (row0 + jnp.arange(bt) < T)
  rmask2 = None if rmask is None else rmask[:, None]
  scale = s_ref[0]
  experts = [gi * ge + j for j in range(ge)]
  evalid = [None if E % ge == 0 else (e < E) for e in experts]
  gates = [
      _load(g_ref.at[pl.ds(row0, bt), e], _and(rmask, ev)).astype(F32)
      for e, ev in zip(experts, evalid)
  ]
  rr_mask = None if rp == r else (jnp.arange(rp) < r)[None, :]
  k_ragged = d_in % bk != 0
  k0 = s * (nk * bk)

  def body(kk, accs):
    k = pl.multiple_of(k0 + kk * bk, bk)
    cmask = (k + jnp.arange(bk) < d_in) if k_ragged else None
    xv = _load(x_ref.at[pl.ds(row0, bt), pl.ds(k, bk)],
               _and(rmask2, None if cmask is None else cmask[None, :]))
    out = []
    for e, ev, acc in zip(experts, evalid, accs):
      amask = _and(None if cmask is None else cmask[:, None], rr_mask, ev)
      av = _load(a_ref.at[e, pl.ds(k, bk), pl.ds(0, rp)], amask)
      out.append(acc + dot(xv, av, precision))
    return tuple(out)

  zeros = tuple(jnp.zeros((bt, rp), F32) for _ in experts)

  def compute(_):
    return lax.fori_loop(0, nk, body, zeros)

  if skip:
    active = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g)) for g in gates]) > 0
    accs = lax.cond(active, compute, lambda _: zeros, None)
  else:
    accs = compute(None)
  for e, ev, g, acc in zip(experts, evalid, gates, accs):
    zv = acc * (g * scale)[:, None]
    m = _and(rmask2, ev)
    if m is not None:
      m = jnp.broadcast_to(m, (bt, rp))
    _store(z_ref.at[s, pl.ds(row0, bt), pl.ds(e * rp, rp)], zv, m)


def _up_kernel(*refs, T, d_in, d_out, E, r, rp, bt, bk, bn, gc, n_split, n_chunks, b2d, fused,
               has_bias, precision, skip, out_dtype):
  """y[tile, cols] = z[tile, :] @ B_cat[:, cols]  (+ x[tile] @ w[:, cols] + bias[cols])."""
  if fused:
    z_ref, b_ref, g_ref, x_ref, w_ref, bias_ref, y_ref = refs
  else:
    z_ref, b_ref, g_ref, y_ref = refs
  j, i = pl.program_id(0), pl.program_id(1)
  row0, col0 = i * bt, j * bn
  rmask = None if T % bt == 0 else (row0 + jnp.arange(bt) < T)
  rmask2 = None if rmask is None else rmask[:, None]
  nmask = None if d_out % bn == 0 else (col0 + jnp.arange(bn) < d_out)
  nmask2 = None if nmask is None else nmask[None, :]
  acc = jnp.zeros((bt, bn), F32)

  if fused:  # frozen base matmul first: acc = x @ w
    k_ragged = d_in % bk != 0

    def base_body(kk, acc):
      k = pl.multiple_of(kk * bk, bk)
      cmask = (k + jnp.arange(bk) < d_in) if k_ragged else None
      xv = _load(x_ref.at[pl.ds(row0, bt), pl.ds(k, bk)],
                 _and(rmask2, None if cmask is None else cmask[None, :]))
      wv = _load(w_ref.at[pl.ds(k, bk), pl.ds(col0, bn)],
                 _and(None if cmask is None else cmask[:, None], nmask2))
      return acc + dot(xv, wv, precision)

    acc = lax.fori_loop(0, cdiv(d_in, bk), base_body, acc)

  bc = gc * rp
  e_ragged = E % gc != 0

  def chunk(c, acc):
    e0 = c * gc
    emask = (e0 + jnp.arange(gc) < E) if e_ragged else None
    # Experts whose gates are all zero in this token tile are skipped by predicating their loads
    # off (no memory traffic) rather than branching, so the loop stays software-pipelined.
    active = None
    if skip:
      gv = _load(g_ref.at[pl.ds(row0, bt), pl.ds(e0, gc)],
                 _and(rmask2, None if emask is None else emask[None, :]))
      active = jnp.max(jnp.abs(gv.astype(F32))) > 0
    zcols = None if not e_ragged else (c * bc + jnp.arange(bc) < E * rp)[None, :]
    zm = _and(rmask2, zcols, active)
    if zm is not None:
      zm = jnp.broadcast_to(zm, (bt, bc))
    zc = _load(z_ref.at[jnp.int32(0), pl.ds(row0, bt), pl.ds(c * bc, bc)], zm)
    for s in range(1, n_split):
      zc = zc + _load(z_ref.at[jnp.int32(s), pl.ds(row0, bt), pl.ds(c * bc, bc)], zm)
    if b2d:  # b viewed as [E*r, d_out]; rp == r
      bm = _and(None if emask is None else (c * bc + jnp.arange(bc) < E * r)[:, None], nmask2,
                active)
      if bm is not None:
        bm = jnp.broadcast_to(bm, (bc, bn))
      bv = _load(b_ref.at[pl.ds(c * bc, bc), pl.ds(col0, bn)], bm)
    else:  # b as [E, r, d_out]; rank padded to rp by masking
      bm = _and(None if emask is None else emask[:, None, None],
                (jnp.arange(rp) < r)[None, :, None],
                None if nmask is None else nmask[None, None, :], active)
      bv = _load(b_ref.at[pl.ds(e0, gc), pl.ds(0, rp), pl.ds(col0, bn)],
                 jnp.broadcast_to(bm, (gc, rp, bn)))
      bv = bv.reshape(bc, bn)
    return acc + dot_f32_lhs(zc, bv, precision)

  acc = lax.fori_loop(0, n_chunks, chunk, acc)
  if has_bias:
    acc = acc + _load(bias_ref.at[pl.ds(col0, bn)], nmask).astype(F32)[None, :]
  _store(y_ref.at[pl.ds(row0, bt), pl.ds(col0, bn)], acc.astype(out_dtype),
         _and(rmask2, nmask2))


def forward(cfg: KernelConfig, x, a, b, gates, scale, w=None, bias=None):
  T, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  rp = rank_pad(r, cfg.backend)
  bt, bk, ge = t.block_t, t.block_k, t.experts_per_down
  n_t = cdiv(T, bt)
  k_steps = cdiv(d_in, bk)
  nk = cdiv(k_steps, max(1, t.k_splits))
  n_split = cdiv(k_steps, nk)
  params = _triton_params(cfg)
  skip = cfg.skip_inactive
  scale_arr = jnp.reshape(scale, (1,)).astype(F32)

  down = functools.partial(_down_kernel, T=T, d_in=d_in, E=E, r=r, rp=rp, bt=bt, bk=bk, ge=ge,
                           nk=nk, precision=cfg.precision, skip=skip)
  z = pl.pallas_call(
      down,
      out_shape=jax.ShapeDtypeStruct((n_split, T, E * rp), F32),
      grid=(cdiv(E, ge), n_split, n_t),
      compiler_params=params,
      interpret=cfg.interpret,
      name="lora_mixture_down",
  )(x, a, gates, scale_arr)

  gc = t.experts_per_up
  bn = t.block_n
  b2d = rp == r
  b_in = b.reshape(E * r, d_out) if b2d else b
  fused = w is not None
  has_bias = bias is not None
  up = functools.partial(
      _up_kernel, T=T, d_in=d_in, d_out=d_out, E=E, r=r, rp=rp, bt=bt, bk=bk, bn=bn, gc=gc,
      n_split=n_split, n_chunks=cdiv(E, gc), b2d=b2d, fused=fused, has_bias=has_bias,
      precision=cfg.precision, skip=skip, out_dtype=x.dtype)
  operands = [z, b_in, gates]
  if fused:
    operands += [x, w, bias if has_bias else jnp.zeros((1,), x.dtype)]
  return pl.pallas_call(
      up,
      out_shape=jax.ShapeDtypeStruct((T, d_out), x.dtype),
      grid=(cdiv(d_out, bn), n_t),
      compiler_params=params,
      interpret=cfg.interpret,
      name="lora_mixture_up" + ("_fused" if fused else ""),
  )(*operands)


def _perseq_kernel(idx_ref, gs_ref, x_ref, a_ref, b_ref, y_ref, *, L, d_in, d_out, r, rp, bl, bk,
                   bn, precision, out_dtype):
  """y[s, tile] = gs[s] * (x[s, tile] @ a[idx[s]]) @ b[idx[s]]; one program per (tile, seq)."""
  li, si = pl.program_id(0), pl.program_id(1)
  e = idx_ref[si]
  gsv = gs_ref[si]
  row0 = li * bl
  rmask = None if L % bl == 0 else (row0 + jnp.arange(bl) < L)
  rmask2 = None if rmask is None else rmask[:, None]
  rr = None if rp == r else (jnp.arange(rp) < r)
  k_ragged = d_in % bk != 0

  def down(kk, acc):
    k = pl.multiple_of(kk * bk, bk)
    cmask = (k + jnp.arange(bk) < d_in) if k_ragged else None
    xv = _load(x_ref.at[si, pl.ds(row0, bl), pl.ds(k, bk)],
               _and(rmask2, None if cmask is None else cmask[None, :]))
    av = _load(a_ref.at[e, pl.ds(k, bk), pl.ds(0, rp)],
               _and(None if cmask is None else cmask[:, None], None if rr is None else rr[None, :]))
    return acc + dot(xv, av, precision)

  z = lax.fori_loop(0, cdiv(d_in, bk), down, jnp.zeros((bl, rp), F32)) * gsv
  n_ragged = d_out % bn != 0

  def up(n, carry):
    col0 = pl.multiple_of(n * bn, bn)
    nmask = (col0 + jnp.arange(bn) < d_out) if n_ragged else None
    bv = _load(b_ref.at[e, pl.ds(0, rp), pl.ds(col0, bn)],
               _and(None if rr is None else rr[:, None], None if nmask is None else nmask[None, :]))
    yv = dot_f32_lhs(z, bv, precision)
    _store(y_ref.at[si, pl.ds(row0, bl), pl.ds(col0, bn)], yv.astype(out_dtype),
           _and(rmask2, None if nmask is None else nmask[None, :]))
    return carry

  lax.fori_loop(0, cdiv(d_out, bn), up, 0)


def per_sequence(cfg: KernelConfig, x, a, b, idx, gs):
  B, L, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  rp = rank_pad(r, cfg.backend)
  kernel = functools.partial(_perseq_kernel, L=L, d_in=d_in, d_out=d_out, r=r, rp=rp,
                             bl=t.block_t, bk=t.block_k, bn=t.block_n, precision=cfg.precision,
                             out_dtype=x.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((B, L, d_out), x.dtype),
      grid=(cdiv(L, t.block_t), B),
      compiler_params=_triton_params(cfg),
      interpret=cfg.interpret,
      name="lora_per_sequence",
  )(idx, gs, x, a, b)
