"""TPU kernels of the adapter mixture (Pallas, Mosaic lowering): blocked kernels with BlockSpecs.

Arrays are padded to the (8, 128) tiling (a copy only when a size is not already aligned);
`A_cat = [A_0 | ... | A_{E-1}]` and `B_cat = [B_0; ...; B_{E-1}]` are formed in XLA, so the down
kernel is one `x @ A_cat` (gates and scale applied at the last d_in step) and the up kernel one
`z @ B_cat` (optionally `+ x @ W + bias`: `mixed_linear`). `per_sequence` picks each sequence's
expert with scalar prefetch. Exercised on CPU in interpret mode by the tests; not yet measured on
a TPU.

Owns: `forward(cfg, x, a, b, gates, scale, w=None, bias=None)` and
`per_sequence(cfg, x, a, b, idx, gs)` (no custom_vjp here: see `vjp.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from drex.kernels.precision import F32, dot, dot_f32_lhs
from drex.kernels.tiles import KernelConfig, round_up

try:
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None


def _pad_to(v, shape):
  pads = [(0, s - d) for s, d in zip(shape, v.shape)]
  return v if all(p == (0, 0) for p in pads) else jnp.pad(v, pads)


def _tpu_params(cfg: KernelConfig, semantics):
  if cfg.interpret or pltpu is None:
    return None
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _accumulate_down(x_ref, a_ref, z_ref, k_axis, weight, precision):
  """z += x @ a over the d_in grid axis `k_axis`; at its last step z *= weight() (gates, scale)."""
  k = pl.program_id(k_axis)

  @pl.when(k == 0)
  def _():
    z_ref[...] = jnp.zeros_like(z_ref)

  z_ref[...] += dot(x_ref[...], a_ref[...], precision)

  @pl.when(k == pl.num_programs(k_axis) - 1)
  def _():
    z_ref[...] = z_ref[...] * weight()


def _blk_down_kernel(x_ref, a_ref, g_ref, z_ref, *, precision):
  _accumulate_down(x_ref, a_ref, z_ref, 1, lambda: g_ref[...], precision)


def _blk_up_kernel(z_ref, b_ref, y_ref, *, precision):
  y_ref[...] = dot_f32_lhs(z_ref[...], b_ref[...], precision).astype(y_ref.dtype)


def _blk_up_fused_kernel(z_ref, b_ref, x_ref, w_ref, bias_ref, y_ref, acc_ref, *, precision):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = (dot_f32_lhs(z_ref[...], b_ref[...], precision)
                    + bias_ref[...].astype(F32))

  acc_ref[...] += dot(x_ref[...], w_ref[...], precision)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def forward(cfg: KernelConfig, x, a, b, gates, scale, w=None, bias=None):
  T, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  bt, bk, bn = t.block_t, t.block_k, t.block_n
  Tp, Kp, Np = round_up(T, bt), round_up(d_in, bk), round_up(d_out, bn)
  er_p = round_up(E * r, 128)
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
  del idx_ref  # used by the index maps only
  gsv = gs_ref[pl.program_id(0)]
  _accumulate_down(x_ref, a_ref, z_ref, 2, lambda: gsv, precision)


def _blk_seq_up_kernel(idx_ref, gs_ref, z_ref, b_ref, y_ref, *, precision):
  del idx_ref, gs_ref  # scalar-prefetch operands, used by the index maps only
  _blk_up_kernel(z_ref, b_ref, y_ref, precision=precision)


def per_sequence(cfg: KernelConfig, x, a, b, idx, gs):
  B, L, d_in = x.shape
  E, _, r = a.shape
  d_out = b.shape[-1]
  t = cfg.tiles
  bl, bk, bn = t.block_t, t.block_k, t.block_n
  rp = round_up(r, 128)
  Lp, Kp, Np = round_up(L, bl), round_up(d_in, bk), round_up(d_out, bn)
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
