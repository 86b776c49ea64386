"""Pallas kernels for the batched LoRA adapter mixture (DESIGN.md §3, issue 4).

For tokens `x [..., d_in]` (leading dims are flattened to `T` tokens) and `E` stacked experts
`a [E, d_in, r]`, `b [E, r, d_out]` with routing weights `gates [..., E]`:

    y = scale * ((x @ A_cat) * (g ⊗ 1_r)) @ B_cat        A_cat = [A_0 | … | A_{E-1}]   [d_in, E*r]
                                                           B_cat = [B_0; …; B_{E-1}]     [E*r, d_out]

The rank intermediate `z = x @ A_cat` is accumulated and kept in float32 (as in
`drex.adapters.mixture.mixture_reference`); the output has `x.dtype`.

Public functions (all jit-able, all differentiable through `jax.custom_vjp`):

* `adapter_mixture(x, a, b, gates, scale)`: the mixture; same signature as the reference.
* `mixed_linear(x, w, bias, a, b, gates, scale)`: `x @ w + bias + adapter_mixture(...)` with the
  frozen base matmul fused into the up-projection kernel (one pass over the output).
* `per_sequence_lora(x [B, L, d_in], a, b, expert_index [B], scale)`: one expert per sequence
  (multi-task serving); the index picks the expert's weights inside the kernel (scalar prefetch on
  TPU, a scalar load on GPU — the Triton backend has no scalar prefetch).
* `choose_kernel(...)`: 'pallas' or 'xla' for a shape, from the H100 measurements in
  `benchmarks/results/` (the kernels win only for single-token decode with sparse gates; XLA
  is faster or equal everywhere else that was measured — see the table there).

Implementation, per backend (detected with `jax.default_backend()`, or forced with `backend=`):

* GPU (Triton lowering) and CPU (the same kernels in interpret mode, automatically): two kernels.
  The *down* kernel computes `z = (x @ A[e]) * g[:, e] * scale` for a group of experts per program
  (x tile loaded once per d_in step and reused for every expert of the group), optionally split
  over d_in (partial sums, deterministic — no atomics) to fill the GPU at decode sizes. The *up*
  kernel computes `y = z @ B_cat` tile by tile (optionally `+ x @ W + bias` first). Both kernels
  skip experts whose gates are all zero in a token tile (sparse top-k routing at decode reads only
  the experts in use). Ragged sizes are handled by masked loads/stores — nothing is padded or
  copied — except `r`, which the kernels round up to a power of two (>= 16 on GPU, for the tensor
  cores) with masked loads. The second matmul keeps `z` in float32: for bf16 weights it is split
  as `z = hi + lo` (two bf16 products, ~16 significant bits, fp32 accumulate); for float32 it
  uses TF32 by default, full IEEE float32 when `jax_default_matmul_precision` is 'highest'/'float32'
  (or `precision=jax.lax.Precision.HIGHEST`).
* TPU (Mosaic): blocked kernels with BlockSpecs; arrays are padded to the (8, 128) tiling
  (a copy only when a size is not already aligned), `A_cat`/`B_cat` are formed in XLA.
  Exercised on CPU in interpret mode by the tests; not yet measured on a TPU.

Backward (all variants): plain JAX (XLA einsums) with float32 rank intermediates, recomputing
`x @ A`. Gradients are produced for x, a, b, gates and scale; for `mixed_linear` also for the
frozen base `w` and `bias` (the true gradients: when the caller does not use them, XLA removes
their computation as dead code, so a frozen base costs nothing).

Semantics note: because inactive experts are skipped, a token whose gate is exactly 0 for an
expert gets exactly 0 from it even if `x @ A[e]` is inf/NaN (the reference would give NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific masked load/store (GPU lowering; also interpretable on CPU).
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None
try:
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None

F32 = jnp.float32
_GPU_SM_COUNT = 132  # H100 SXM; only used to size grids (more programs than SMs).


# ----------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes. All `block_*` and `experts_*` values are powers of two.

  GPU/CPU (Triton-style kernels):
    block_t: tokens per program (>= 16 on GPU: tensor-core minimum).
    block_k: d_in step of the down projection (and of the fused base matmul).
    experts_per_down: experts per down-projection program (one x tile feeds all of them).
    k_splits: programs sharing one d_in reduction (partial sums; for decode-size parallelism).
    block_n: d_out columns per up-projection program.
    experts_per_up: experts per step of the up-projection loop (the rank chunk is this * r_pad).
    num_warps, num_stages: Triton launch parameters.
  TPU (blocked kernels): block_t, block_k, block_n are the BlockSpec tile sizes.
  """

  block_t: int
  block_k: int
  experts_per_down: int
  k_splits: int
  block_n: int
  experts_per_up: int
  num_warps: int = 4
  num_stages: int = 3


def _pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


def _rank_pad(r: int, backend: str) -> int:
  """Rank as the kernels see it: a power of two, >= 16 on GPU (tensor-core operand minimum)."""
  return max(16, _pow2(r)) if backend == "gpu" else _pow2(r)


def default_tiles(num_tokens: int, d_in: int, d_out: int, rank: int, num_experts: int,
                  dtype: Any, backend: str) -> Tiles:
  """Tile sizes per backend and shape (GPU values tuned on an H100, see benchmarks/results)."""
  rp = _rank_pad(rank, backend)
  e2 = _pow2(num_experts)
  if backend == "cpu":  # interpret mode: few, large programs are fastest.
    return Tiles(block_t=min(128, max(8, _pow2(num_tokens))), block_k=min(256, _pow2(d_in)),
                 experts_per_down=min(e2, 16), k_splits=1, block_n=min(256, _pow2(d_out)),
                 experts_per_up=min(e2, 16))
  if backend == "tpu":
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    bt = 256 if num_tokens >= 256 else _round_up(max(num_tokens, 1), sub)
    return Tiles(block_t=bt, block_k=min(512, _round_up(d_in, 128)), experts_per_down=1,
                 k_splits=1, block_n=min(512, _round_up(d_out, 128)), experts_per_up=1)
  # GPU.
  itemsize = jnp.dtype(dtype).itemsize
  bk = 64 if itemsize <= 2 else 32
  if num_tokens > 64:  # prefill: one x pass per expert group, large output tiles
    ge = 1
    while ge * 2 <= e2 and ge * 2 * rp <= 128:
      ge *= 2
    gc = max(1, min(e2, 64 // rp))
    return Tiles(block_t=64, block_k=bk, experts_per_down=ge, k_splits=1, block_n=128,
                 experts_per_up=gc, num_warps=4, num_stages=3)
  # decode: one expert per down program (skip granularity), d_in split across programs for
  # parallelism, long rank chunks in the up loop (few serial steps); the up kernel sums the
  # k_splits partials of each z chunk, so splits x chunk bytes are bounded (shared memory).
  bt = max(16, _pow2(num_tokens))
  bc = max(rp, 128 if bt <= 16 else 64)
  gc = max(1, min(e2, bc // rp))
  chunk_bytes = bt * gc * rp * 4 * 3  # one z partial, 3 pipeline stages
  max_splits = max(1, (96 * 1024) // chunk_bytes)
  programs = _cdiv(num_experts, 1)
  k_steps = _cdiv(d_in, bk)
  ks = 1
  while (ks * 2 <= max_splits and programs * ks * 2 <= 2 * _GPU_SM_COUNT
         and k_steps // (ks * 2) >= 4):
    ks *= 2
  bn = 32 if d_out >= 32 * _GPU_SM_COUNT // 2 else 16
  return Tiles(block_t=bt, block_k=bk, experts_per_down=1, k_splits=ks, block_n=bn,
               experts_per_up=gc, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static configuration of one kernel call (hashable: used as a custom_vjp nondiff arg)."""

  backend: str          # 'gpu' | 'cpu' | 'tpu' (style and tile family)
  interpret: bool
  tiles: Tiles
  precision: Any        # lax.Precision for float32 products
  skip_inactive: bool


def _detect_backend(backend: str | None) -> str:
  name = (backend or jax.default_backend()).lower()
  if name in ("gpu", "cuda", "rocm"):
    return "gpu"
  if name in ("tpu", "cpu"):
    return name
  raise ValueError(f"unsupported backend {backend!r}; use 'gpu', 'tpu' or 'cpu'")


def _resolve_precision(precision) -> Any:
  if precision is not None:
    if isinstance(precision, (tuple, list)):
      precision = precision[0]
    return lax.Precision(precision) if isinstance(precision, str) else precision
  cfg = getattr(jax.config, "jax_default_matmul_precision", None)
  cfg = str(cfg).lower() if cfg is not None else ""
  if cfg in ("highest", "float32", "f32_f32_f32"):
    return lax.Precision.HIGHEST
  return lax.Precision.DEFAULT


def _make_cfg(T, d_in, d_out, r, E, dtype, backend, interpret, tiles, precision, skip_inactive):
  be = _detect_backend(backend)
  if interpret is None:
    interpret = jax.default_backend() == "cpu" or be == "cpu"
  if tiles is None:
    tiles = default_tiles(T, d_in, d_out, r, E, dtype, be)
  return _Cfg(be, bool(interpret), tiles, _resolve_precision(precision), bool(skip_inactive))


# ----------------------------------------------------------------------------------------------
# Shared in-kernel helpers
# ----------------------------------------------------------------------------------------------


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


def _dot(a, b, precision):
  """a @ b with float32 accumulation; operands promoted to a common dtype."""
  dt = jnp.promote_types(a.dtype, b.dtype)
  return jnp.dot(a.astype(dt), b.astype(dt), preferred_element_type=F32, precision=precision)


def _dot_f32_lhs(z, w, precision):
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


def _triton_params(cfg: _Cfg):
  if cfg.interpret or plgpu is None:
    return None
  return plgpu.CompilerParams(num_warps=cfg.tiles.num_warps, num_stages=cfg.tiles.num_stages)


# ----------------------------------------------------------------------------------------------
# GPU / CPU-interpret kernels (Triton style: whole-array refs, masked pointer loads)
# ----------------------------------------------------------------------------------------------


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
      out.append(acc + _dot(xv, av, precision))
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
      return acc + _dot(xv, wv, precision)

    acc = lax.fori_loop(0, _cdiv(d_in, bk), base_body, acc)

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
    return acc + _dot_f32_lhs(zc, bv, precision)

  acc = lax.fori_loop(0, n_chunks, chunk, acc)
  if has_bias:
    acc = acc + _load(bias_ref.at[pl.ds(col0, bn)], nmask).astype(F32)[None, :]
  _store(y_ref.at[pl.ds(row0, bt), pl.ds(col0, bn)], acc.astype(out_dtype),
         _and(rmask2, nmask2))


def _triton_forward(cfg: _Cfg, x, a, b, gates, scale, w=None, bias=None):
  T, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  rp = _rank_pad(r, cfg.backend)
  bt, bk, ge = t.block_t, t.block_k, t.experts_per_down
  n_t = _cdiv(T, bt)
  k_steps = _cdiv(d_in, bk)
  nk = _cdiv(k_steps, max(1, t.k_splits))
  n_split = _cdiv(k_steps, nk)
  params = _triton_params(cfg)
  skip = cfg.skip_inactive
  scale_arr = jnp.reshape(scale, (1,)).astype(F32)

  down = functools.partial(_down_kernel, T=T, d_in=d_in, E=E, r=r, rp=rp, bt=bt, bk=bk, ge=ge,
                           nk=nk, precision=cfg.precision, skip=skip)
  z = pl.pallas_call(
      down,
      out_shape=jax.ShapeDtypeStruct((n_split, T, E * rp), F32),
      grid=(_cdiv(E, ge), n_split, n_t),
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
      n_split=n_split, n_chunks=_cdiv(E, gc), b2d=b2d, fused=fused, has_bias=has_bias,
      precision=cfg.precision, skip=skip, out_dtype=x.dtype)
  operands = [z, b_in, gates]
  if fused:
    operands += [x, w, bias if has_bias else jnp.zeros((1,), x.dtype)]
  return pl.pallas_call(
      up,
      out_shape=jax.ShapeDtypeStruct((T, d_out), x.dtype),
      grid=(_cdiv(d_out, bn), n_t),
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
    return acc + _dot(xv, av, precision)

  z = lax.fori_loop(0, _cdiv(d_in, bk), down, jnp.zeros((bl, rp), F32)) * gsv
  n_ragged = d_out % bn != 0

  def up(n, carry):
    col0 = pl.multiple_of(n * bn, bn)
    nmask = (col0 + jnp.arange(bn) < d_out) if n_ragged else None
    bv = _load(b_ref.at[e, pl.ds(0, rp), pl.ds(col0, bn)],
               _and(None if rr is None else rr[:, None], None if nmask is None else nmask[None, :]))
    yv = _dot_f32_lhs(z, bv, precision)
    _store(y_ref.at[si, pl.ds(row0, bl), pl.ds(col0, bn)], yv.astype(out_dtype),
           _and(rmask2, None if nmask is None else nmask[None, :]))
    return carry

  lax.fori_loop(0, _cdiv(d_out, bn), up, 0)


def _triton_per_sequence(cfg: _Cfg, x, a, b, idx, gs):
  B, L, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  rp = _rank_pad(r, cfg.backend)
  kernel = functools.partial(_perseq_kernel, L=L, d_in=d_in, d_out=d_out, r=r, rp=rp,
                             bl=t.block_t, bk=t.block_k, bn=t.block_n, precision=cfg.precision,
                             out_dtype=x.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((B, L, d_out), x.dtype),
      grid=(_cdiv(L, t.block_t), B),
      compiler_params=_triton_params(cfg),
      interpret=cfg.interpret,
      name="lora_per_sequence",
  )(idx, gs, x, a, b)


# ----------------------------------------------------------------------------------------------
# TPU kernels (Mosaic style: BlockSpecs over padded arrays)
# ----------------------------------------------------------------------------------------------


def _pad_to(v, shape):
  pads = [(0, s - d) for s, d in zip(shape, v.shape)]
  return v if all(p == (0, 0) for p in pads) else jnp.pad(v, pads)


def _tpu_params(cfg: _Cfg, semantics):
  if cfg.interpret or pltpu is None:
    return None
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _blk_down_kernel(x_ref, a_ref, g_ref, z_ref, *, precision):
  k = pl.program_id(1)

  @pl.when(k == 0)
  def _():
    z_ref[...] = jnp.zeros_like(z_ref)

  z_ref[...] += _dot(x_ref[...], a_ref[...], precision)

  @pl.when(k == pl.num_programs(1) - 1)
  def _():
    z_ref[...] = z_ref[...] * g_ref[...]


def _blk_up_kernel(z_ref, b_ref, y_ref, *, precision):
  y_ref[...] = _dot_f32_lhs(z_ref[...], b_ref[...], precision).astype(y_ref.dtype)


def _blk_up_fused_kernel(z_ref, b_ref, x_ref, w_ref, bias_ref, y_ref, acc_ref, *, precision):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = (_dot_f32_lhs(z_ref[...], b_ref[...], precision)
                    + bias_ref[...].astype(F32))

  acc_ref[...] += _dot(x_ref[...], w_ref[...], precision)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _tpu_forward(cfg: _Cfg, x, a, b, gates, scale, w=None, bias=None):
  T, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  bt, bk, bn = t.block_t, t.block_k, t.block_n
  Tp, Kp, Np = _round_up(T, bt), _round_up(d_in, bk), _round_up(d_out, bn)
  er_p = _round_up(E * r, 128)
  a_cat = _pad_to(jnp.transpose(a, (1, 0, 2)).reshape(d_in, E * r), (Kp, er_p))
  b_cat = _pad_to(b.reshape(E * r, d_out), (er_p, Np))
  g_exp = jnp.repeat(gates.astype(F32) * scale.astype(F32), r, axis=1)
  g_exp = _pad_to(g_exp, (Tp, er_p))
  xp = _pad_to(x, (Tp, Kp))
  n_t, n_k, n_n = Tp // bt, Kp // bk, Np // bn
  z = pl.pallas_call(
      functools.partial(_blk_down_kernel, precision=cfg.precision),
      out_shape=jax.ShapeDtypeStruct((Tp, er_p), F32),
      grid=(n_t, n_k),
      in_specs=[pl.BlockSpec((bt, bk), lambda i, k: (i, k)),
                pl.BlockSpec((bk, er_p), lambda i, k: (k, 0)),
                pl.BlockSpec((bt, er_p), lambda i, k: (i, 0))],
      out_specs=pl.BlockSpec((bt, er_p), lambda i, k: (i, 0)),
      compiler_params=_tpu_params(cfg, ("parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="lora_mixture_down_tpu",
  )(xp, a_cat, g_exp)
  if w is None:
    y = pl.pallas_call(
        functools.partial(_blk_up_kernel, precision=cfg.precision),
        out_shape=jax.ShapeDtypeStruct((Tp, Np), x.dtype),
        grid=(n_t, n_n),
        in_specs=[pl.BlockSpec((bt, er_p), lambda i, j: (i, 0)),
                  pl.BlockSpec((er_p, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bt, bn), lambda i, j: (i, j)),
        compiler_params=_tpu_params(cfg, ("parallel", "parallel")),
        interpret=cfg.interpret,
        name="lora_mixture_up_tpu",
    )(z, b_cat)
  else:
    wp = _pad_to(w.astype(x.dtype), (Kp, Np))
    bias_p = _pad_to((jnp.zeros((d_out,), x.dtype) if bias is None else bias)[None, :], (1, Np))
    y = pl.pallas_call(
        functools.partial(_blk_up_fused_kernel, precision=cfg.precision),
        out_shape=jax.ShapeDtypeStruct((Tp, Np), x.dtype),
        grid=(n_t, n_n, n_k),
        in_specs=[pl.BlockSpec((bt, er_p), lambda i, j, k: (i, 0)),
                  pl.BlockSpec((er_p, bn), lambda i, j, k: (0, j)),
                  pl.BlockSpec((bt, bk), lambda i, j, k: (i, k)),
                  pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
                  pl.BlockSpec((1, bn), lambda i, j, k: (0, j))],
        out_specs=pl.BlockSpec((bt, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bt, bn), F32)],
        compiler_params=_tpu_params(cfg, ("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="lora_mixed_linear_tpu",
    )(z, b_cat, xp, wp, bias_p)
  return y[:T, :d_out]


def _blk_seq_down_kernel(idx_ref, gs_ref, x_ref, a_ref, z_ref, *, precision):
  del idx_ref
  k = pl.program_id(2)
  gsv = gs_ref[pl.program_id(0)]

  @pl.when(k == 0)
  def _():
    z_ref[...] = jnp.zeros_like(z_ref)

  z_ref[...] += _dot(x_ref[...], a_ref[...], precision)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    z_ref[...] = z_ref[...] * gsv


def _blk_seq_up_kernel(idx_ref, gs_ref, z_ref, b_ref, y_ref, *, precision):
  del idx_ref, gs_ref
  y_ref[...] = _dot_f32_lhs(z_ref[...], b_ref[...], precision).astype(y_ref.dtype)


def _tpu_per_sequence(cfg: _Cfg, x, a, b, idx, gs):
  B, L, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  bl, bk, bn = t.block_t, t.block_k, t.block_n
  rp = _round_up(r, 128)
  Lp, Kp, Np = _round_up(L, bl), _round_up(d_in, bk), _round_up(d_out, bn)
  xp = _pad_to(x, (B, Lp, Kp))
  ap = _pad_to(a, (E, Kp, rp))
  bp = _pad_to(b, (E, rp, Np))
  sq = getattr(pl, "squeezed", None)
  z = pl.pallas_call(
      functools.partial(_blk_seq_down_kernel, precision=cfg.precision),
      out_shape=jax.ShapeDtypeStruct((B, Lp, rp), F32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, Lp // bl, Kp // bk),
          in_specs=[pl.BlockSpec((sq, bl, bk), lambda s, l, k, ix, g: (s, l, k)),
                    pl.BlockSpec((sq, bk, rp), lambda s, l, k, ix, g: (ix[s], k, 0))],
          out_specs=pl.BlockSpec((sq, bl, rp), lambda s, l, k, ix, g: (s, l, 0))),
      compiler_params=_tpu_params(cfg, ("parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="lora_per_sequence_down_tpu",
  )(idx, gs, xp, ap)
  y = pl.pallas_call(
      functools.partial(_blk_seq_up_kernel, precision=cfg.precision),
      out_shape=jax.ShapeDtypeStruct((B, Lp, Np), x.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, Lp // bl, Np // bn),
          in_specs=[pl.BlockSpec((sq, bl, rp), lambda s, l, n, ix, g: (s, l, 0)),
                    pl.BlockSpec((sq, rp, bn), lambda s, l, n, ix, g: (ix[s], 0, n))],
          out_specs=pl.BlockSpec((sq, bl, bn), lambda s, l, n, ix, g: (s, l, n))),
      compiler_params=_tpu_params(cfg, ("parallel", "parallel", "parallel")),
      interpret=cfg.interpret,
      name="lora_per_sequence_up_tpu",
  )(idx, gs, z, bp)
  return y[:, :L, :d_out]


# ----------------------------------------------------------------------------------------------
# custom_vjp cores (2-D inputs; scale is a float32 scalar array)
# ----------------------------------------------------------------------------------------------


def _forward(cfg, x, a, b, gates, scale, w=None, bias=None):
  if cfg.backend == "tpu":
    return _tpu_forward(cfg, x, a, b, gates, scale, w, bias)
  return _triton_forward(cfg, x, a, b, gates, scale, w, bias)


def _mixture_grads(x, a, b, gates, scale, dy):
  """Plain-JAX cotangents of y = scale * sum_e g_e (x @ a_e) @ b_e (fp32 rank intermediates)."""
  dyf = dy.astype(F32)
  z = jnp.einsum("td,edr->ter", x, a, preferred_element_type=F32)
  u = jnp.einsum("to,ero->ter", dyf, b.astype(F32))
  g = gates.astype(F32)
  zu = jnp.sum(z * u, axis=-1)
  d_gates = (zu * scale).astype(gates.dtype)
  d_scale = jnp.sum(zu * g).astype(scale.dtype)
  wgt = (g * scale)[..., None]
  db = jnp.einsum("ter,to->ero", z * wgt, dyf).astype(b.dtype)
  ug = u * wgt
  da = jnp.einsum("td,ter->edr", x.astype(F32), ug).astype(a.dtype)
  dx = jnp.einsum("ter,edr->td", ug, a.astype(F32)).astype(x.dtype)
  return dx, da, db, d_gates, d_scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixture_core(cfg, x, a, b, gates, scale):
  return _forward(cfg, x, a, b, gates, scale)


def _mixture_core_fwd(cfg, x, a, b, gates, scale):
  return _forward(cfg, x, a, b, gates, scale), (x, a, b, gates, scale)


def _mixture_core_bwd(cfg, res, dy):
  del cfg
  return _mixture_grads(*res, dy)


_mixture_core.defvjp(_mixture_core_fwd, _mixture_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_core(cfg, has_bias, x, w, bias, a, b, gates, scale):
  return _forward(cfg, x, a, b, gates, scale, w, bias if has_bias else None)


def _mixed_core_fwd(cfg, has_bias, x, w, bias, a, b, gates, scale):
  y = _forward(cfg, x, a, b, gates, scale, w, bias if has_bias else None)
  return y, (x, w, bias, a, b, gates, scale)


def _mixed_core_bwd(cfg, has_bias, res, dy):
  del cfg
  x, w, bias, a, b, gates, scale = res
  dx, da, db, dg, ds = _mixture_grads(x, a, b, gates, scale, dy)
  # Frozen base: true gradients, dead code unless the caller differentiates w.r.t. w / bias.
  dx = (dx.astype(F32) + jnp.dot(dy, w.T, preferred_element_type=F32)).astype(x.dtype)
  dw = jnp.dot(x.T, dy, preferred_element_type=F32).astype(w.dtype)
  dbias = (jnp.sum(dy.astype(F32), axis=0).astype(bias.dtype) if has_bias
           else jnp.zeros_like(bias))
  return dx, dw, dbias, da, db, dg, ds


_mixed_core.defvjp(_mixed_core_fwd, _mixed_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _perseq_core(cfg, x, a, b, idx, gs):
  if cfg.backend == "tpu":
    return _tpu_per_sequence(cfg, x, a, b, idx, gs)
  return _triton_per_sequence(cfg, x, a, b, idx, gs)


def _perseq_core_fwd(cfg, x, a, b, idx, gs):
  return _perseq_core(cfg, x, a, b, idx, gs), (x, a, b, idx, gs)


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


_perseq_core.defvjp(_perseq_core_fwd, _perseq_core_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


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
  cfg = _make_cfg(T, d_in, d_out, r, E, x.dtype, backend, interpret, tiles, precision,
                  skip_inactive)
  y = _mixture_core(cfg, x.reshape(T, d_in), a, b, gates.reshape(T, E),
                    jnp.asarray(scale, F32))
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
  cfg = _make_cfg(T, d_in, d_out, r, E, x.dtype, backend, interpret, tiles, precision,
                  skip_inactive)
  has_bias = bias is not None
  bias_arg = bias if has_bias else jnp.zeros((d_out,), x.dtype)
  y = _mixed_core(cfg, has_bias, x.reshape(T, d_in), w.astype(x.dtype), bias_arg, a, b,
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
  be = _detect_backend(backend)
  if tiles is None:
    t = default_tiles(L, d_in, d_out, r, 1, x.dtype, be)
    if be == "gpu":
      t = dataclasses.replace(t, block_t=max(16, min(64, _pow2(L))), block_n=128)
    tiles = t
  cfg = _make_cfg(L, d_in, d_out, r, 1, x.dtype, backend, interpret, tiles, precision, False)
  return _perseq_core(cfg, x, a, b, idx, gs)


# ----------------------------------------------------------------------------------------------
# Kernel choice
# ----------------------------------------------------------------------------------------------


def choose_kernel(num_tokens: int, d_in: int, d_out: int, rank: int, num_experts: int,
                  dtype: Any, backend: str | None = None, *, top_k: int | None = None) -> str:
  """'pallas' or 'xla' for one adapted linear, from the H100 measurements in benchmarks/results/.

  Measured on an H100 80GB HBM3 (jax 0.11.2, `benchmarks/adapter_mixture.py --quick --tune`),
  speed-up of the Pallas kernels over the best plain-JAX path (xla_dense / ragged_dot / loop):
    prefill (T = 4096..16384), bf16: 0.64-0.83x; float32: 0.28x          -> 'xla'
    decode T=16..64, E=8..32, r=16..64: 0.62-0.98x                        -> 'xla'
    decode T=8, dense gates (k=E=16): 1.00x                               -> 'xla'
    decode T=1, sparse top-k (E=32 k=2 r=64; E=8 k=1 r=16), bf16: 1.11x, 1.08x -> 'pallas'
  The only wins come from skipping the experts a single token is not routed to; XLA's dense
  path reads every expert. So: 'pallas' on GPU for one token per call (per adapted linear) with
  sparse gates (`top_k` < num_experts, or `top_k` unknown) in a 16-bit dtype; 'xla' otherwise.
  CPU runs the kernels interpreted (slow) and TPU is unmeasured: 'xla' there.
  `d_in`, `d_out` and `rank` do not change the choice in the measured range (d 2048-4096,
  r 8-64).
  """
  be = _detect_backend(backend)
  if be != "gpu":
    return "xla"
  del d_in, d_out, rank
  sparse = top_k is None or top_k < num_experts
  small_float = jnp.dtype(dtype).itemsize <= 2
  if num_tokens <= 1 and num_experts >= 2 and sparse and small_float:
    return "pallas"
  return "xla"
