"""Tile choice and the static configuration of one kernel call.

Owns `Tiles` (the tile sizes of every kernel family), `default_tiles` (per backend and shape; the
GPU values were tuned on an H100, see benchmarks/results), the backend name the kernels use
(`detect_backend`: 'gpu' | 'tpu' | 'cpu'), `KernelConfig` / `make_config` (backend, interpret mode,
tiles, precision: the hashable non-differentiable argument of the custom_vjp cores in `vjp.py`) and
the integer helpers the kernels size their grids with (`pow2`, `cdiv`, `round_up`, `rank_pad`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from drex.kernels.precision import resolve_precision

_GPU_SM_COUNT = 132  # H100 SXM; only used to size grids (more programs than SMs).


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


def pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def rank_pad(r: int, backend: str) -> int:
  """Rank as the kernels see it: a power of two, >= 16 on GPU (tensor-core operand minimum)."""
  return max(16, pow2(r)) if backend == "gpu" else pow2(r)


def default_tiles(num_tokens: int, d_in: int, d_out: int, rank: int, num_experts: int,
                  dtype: Any, backend: str) -> Tiles:
  """Tile sizes per backend and shape (GPU values tuned on an H100, see benchmarks/results)."""
  rp = rank_pad(rank, backend)
  e2 = pow2(num_experts)
  if backend == "cpu":  # interpret mode: few, large programs are fastest.
    return Tiles(block_t=min(128, max(8, pow2(num_tokens))), block_k=min(256, pow2(d_in)),
                 experts_per_down=min(e2, 16), k_splits=1, block_n=min(256, pow2(d_out)),
                 experts_per_up=min(e2, 16))
  if backend == "tpu":
    sub = 16 if jnp.dtype(dtype).itemsize < 4 else 8
    bt = 256 if num_tokens >= 256 else round_up(max(num_tokens, 1), sub)
    return Tiles(block_t=bt, block_k=min(512, round_up(d_in, 128)), experts_per_down=1,
                 k_splits=1, block_n=min(512, round_up(d_out, 128)), experts_per_up=1)
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
  bt = max(16, pow2(num_tokens))
  bc = max(rp, 128 if bt <= 16 else 64)
  gc = max(1, min(e2, bc // rp))
  chunk_bytes = bt * gc * rp * 4 * 3  # one z partial, 3 pipeline stages
  max_splits = max(1, (96 * 1024) // chunk_bytes)
  programs = cdiv(num_experts, 1)
  k_steps = cdiv(d_in, bk)
  ks = 1
  while (ks * 2 <= max_splits and programs * ks * 2 <= 2 * _GPU_SM_COUNT
         and k_steps // (ks * 2) >= 4):
    ks *= 2
  bn = 32 if d_out >= 32 * _GPU_SM_COUNT // 2 else 16
  return Tiles(block_t=bt, block_k=bk, experts_per_down=1, k_splits=ks, block_n=bn,
               experts_per_up=gc, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static configuration of one kernel call (hashable: used as a custom_vjp nondiff arg)."""

  backend: str          # 'gpu' | 'cpu' | 'tpu' (style and tile family)
  interpret: bool
  tiles: Tiles
  precision: Any        # lax.Precision for float32 products
  skip_inactive: bool


def detect_backend(backend: str | None) -> str:
  name = (backend or jax.default_backend()).lower()
  if name in ("gpu", "cuda", "rocm"):
    return "gpu"
  if name in ("tpu", "cpu"):
    return name
  raise ValueError(f"unsupported backend {backend!r}; use 'gpu', 'tpu' or 'cpu'")


def make_config(T, d_in, d_out, r, E, dtype, backend, interpret, tiles, precision, skip_inactive):
  be = detect_backend(backend)
  if interpret is None:
    interpret = jax.default_backend() == "cpu" or be == "cpu"
  if tiles is None:
    tiles = default_tiles(T, d_in, d_out, r, E, dtype, be)
  return KernelConfig(be, bool(interpret), tiles, resolve_precision(precision),
                      bool(skip_inactive))
