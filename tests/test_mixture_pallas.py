"""The Pallas adapter-mixture kernels against the plain-JAX reference.

On CPU the kernels run in Pallas interpret mode (automatically). Three kernel families are
exercised here: the GPU (Triton-style, masked loads) kernels with CPU tiles and with the GPU tile
choice (`backend='gpu', interpret=True`: rank padded to 16, d_in splits, expert groups), and the
TPU (blocked, padded) kernels (`backend='tpu', interpret=True`). Tests marked `gpu` compile the
kernels for a real GPU (run with `-m gpu` on a GPU machine).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex.adapters import mixture
from drex import kernels

BF16, F32 = jnp.bfloat16, jnp.float32


def _tol(dtype):
  return 2e-2 if jnp.dtype(dtype) == BF16 else 1e-5


def assert_close(got, want, dtype, tol=None):
  tol = _tol(dtype) if tol is None else tol
  got = jax.tree.map(lambda v: np.asarray(v, np.float32), got)
  want = jax.tree.map(lambda v: np.asarray(v, np.float32), want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    chex.assert_shape(g, w.shape)
    assert np.all(np.isfinite(g)), "non-finite output"
    chex.assert_trees_all_close(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


def make_inputs(rng, lead, d_in, d_out, r, E, k, dtype):
  """Random inputs; gates are a softmax over the top-k of random logits (k == E: dense)."""
  x = rng.normal(size=lead + (d_in,))
  a = rng.normal(size=(E, d_in, r)) / np.sqrt(d_in)
  b = rng.normal(size=(E, r, d_out)) * 0.5
  logits = rng.normal(size=lead + (E,))
  kth = -np.sort(-logits, axis=-1)[..., k - 1:k]
  g = np.where(logits >= kth, np.exp(logits), 0.0)
  g = g / g.sum(-1, keepdims=True)
  cast = lambda v: jnp.asarray(v, dtype)
  return cast(x), cast(a), cast(b), jnp.asarray(g, F32)


def _loss_and_grads(fn, x, a, b, g, scale):
  def loss(x, a, b, g, scale):
    y = fn(x, a, b, g, scale)
    return jnp.sum(y.astype(F32) * jnp.cos(jnp.arange(y.size, dtype=F32)).reshape(y.shape)), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      x, a, b, g, jnp.float32(scale))
  return y, grads


# (lead dims, d_in, d_out, r, E, k, dtype, kernel options). A seeded random draw of odd sizes
# plus the required corners: E=1, k=E (dense gates), sparse top-k, r not a multiple of 8, bf16.
_RNG = np.random.default_rng(20240611)
CASES = [
    ((7,), 16, 5, 3, 1, 1, F32, {}),                                      # E = 1
    ((37,), 40, 33, 12, 5, 2, F32, dict(backend="gpu", interpret=True)),  # ragged, r=12
    ((64,), 64, 48, 8, 4, 4, BF16, {}),                                   # k = E, bf16
    ((2, 9), 24, 20, 5, 3, 1, F32, dict(backend="gpu", interpret=True)),  # leading dims, r=5
    ((int(_RNG.integers(17, 50)),), int(_RNG.integers(65, 200)), int(_RNG.integers(9, 70)),
     int(_RNG.choice([3, 6, 10])), int(_RNG.integers(2, 7)), 2, BF16,
     dict(backend="gpu", interpret=True)),                                # random odd, bf16
    ((20,), 300, 40, 16, 6, 2, BF16,                                      # d_in splits, groups
     dict(backend="gpu", interpret=True,
          tiles=kernels.Tiles(block_t=16, block_k=16, experts_per_down=4, k_splits=4,
                              block_n=16, experts_per_up=4))),
    ((19,), 40, 33, 12, 5, 2, F32, dict(backend="tpu", interpret=True)),  # TPU kernels
    ((3,), 130, 20, 4, 3, 3, BF16, dict(backend="tpu", interpret=True)),
]


@pytest.mark.parametrize("lead,d_in,d_out,r,E,k,dtype,opts", CASES,
                         ids=[f"{c[0]}x{c[1]}-{c[2]}-r{c[3]}-E{c[4]}-k{c[5]}-"
                              f"{jnp.dtype(c[6]).name}-{c[7].get('backend', 'auto')}"
                              for c in CASES])
def test_forward_and_backward_match_reference(lead, d_in, d_out, r, E, k, dtype, opts):
  x, a, b, g = make_inputs(np.random.default_rng(d_in * 31 + E), lead, d_in, d_out, r, E, k,
                           dtype)
  scale = 2.0 / r
  kern = lambda *v: kernels.adapter_mixture(*v, **opts)
  y, grads = _loss_and_grads(kern, x, a, b, g, scale)
  y_ref, grads_ref = _loss_and_grads(mixture.mixture_reference, x, a, b, g, scale)
  assert y.dtype == dtype and y.shape == lead + (d_out,)
  assert_close(y, y_ref, dtype)
  # gates/scale cotangents sum many bf16-rounded products: compare at a looser scale for bf16.
  assert_close(grads[:3], grads_ref[:3], dtype)
  assert_close(grads[3:], grads_ref[3:], dtype, tol=5e-2 if dtype == BF16 else 1e-4)


def test_zero_gated_tiles_are_skipped_correctly():
  """Whole token tiles with all-zero gates (skipped work) and one never-used expert."""
  x, a, b, g = make_inputs(np.random.default_rng(1), (40,), 32, 24, 8, 4, 2, F32)
  g = g.at[:20].set(0.0).at[:, 3].set(0.0)
  opts = dict(backend="gpu", interpret=True,
              tiles=kernels.Tiles(block_t=16, block_k=16, experts_per_down=1, k_splits=1,
                                  block_n=16, experts_per_up=1))
  got = kernels.adapter_mixture(x, a, b, g, 0.5, **opts)
  assert_close(got, mixture.mixture_reference(x, a, b, g, 0.5), F32)
  np.testing.assert_array_equal(np.asarray(got[:16]), 0.0)


def test_dispatch_from_adapter_mixture_under_jit():
  x, a, b, g = make_inputs(np.random.default_rng(2), (2, 5), 16, 8, 4, 3, 2, F32)
  f = jax.jit(lambda *v: mixture.adapter_mixture(*v, 0.25, kernel="pallas"))
  assert_close(f(x, a, b, g), mixture.mixture_reference(x, a, b, g, 0.25), F32)


@pytest.mark.parametrize("backend", [None, "tpu"])
def test_mixed_linear_matches_base_plus_mixture(backend):
  rng = np.random.default_rng(3)
  x, a, b, g = make_inputs(rng, (13,), 24, 20, 6, 3, 2, F32)
  w = jnp.asarray(rng.normal(size=(24, 20)) / 5, F32)
  bias = jnp.asarray(rng.normal(size=(20,)), F32)

  def ref(x, w, bias, a, b, g, s):
    return x @ w + bias + mixture.mixture_reference(x, a, b, g, s)

  def kern(x, w, bias, a, b, g, s):
    return kernels.mixed_linear(x, w, bias, a, b, g, s, backend=backend, interpret=True)

  args = (x, w, bias, a, b, g, jnp.float32(0.5))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda *v: jnp.sum(jnp.sin(f(*v))),
                                              argnums=tuple(range(7))))
  (l1, g1), (l2, g2) = loss(kern)(*args), loss(ref)(*args)
  assert_close(kern(*args), ref(*args), F32)
  assert_close((l1, g1), (l2, g2), F32, tol=1e-4)
  no_bias = kernels.mixed_linear(x, w, None, a, b, g, 0.5, backend=backend, interpret=True)
  assert_close(no_bias, ref(x, w, 0.0, a, b, g, 0.5), F32)


@pytest.mark.parametrize("backend,dtype", [(None, F32), ("gpu", BF16), ("tpu", F32)])
def test_per_sequence_lora_matches_gather(backend, dtype):
  rng = np.random.default_rng(4)
  B, L, d_in, d_out, r, E = 3, 5, 20, 12, 6, 4
  x = jnp.asarray(rng.normal(size=(B, L, d_in)), dtype)
  a = jnp.asarray(rng.normal(size=(E, d_in, r)) / 4, dtype)
  b = jnp.asarray(rng.normal(size=(E, r, d_out)), dtype)
  idx = jnp.asarray([2, 0, 2], jnp.int32)

  def ref(x, a, b, s):
    g = jax.nn.one_hot(idx, E, dtype=F32)[:, None, :].repeat(L, axis=1)
    return mixture.mixture_reference(x, a, b, g, s)

  def kern(x, a, b, s):
    return kernels.per_sequence_lora(x, a, b, idx, s, backend=backend, interpret=True)

  args = (x, a, b, jnp.float32(0.7))
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda *v: jnp.sum(jnp.sin(f(*v).astype(F32))), argnums=(0, 1, 2, 3)))
  assert_close(kern(*args), ref(*args), dtype)
  assert_close(loss(kern)(*args), loss(ref)(*args), dtype, tol=5e-2 if dtype == BF16 else 1e-4)


def test_mismatched_shapes_name_the_shapes():
  x, a, b, g = make_inputs(np.random.default_rng(5), (4,), 8, 6, 2, 3, 1, F32)
  with pytest.raises(ValueError, match=r"x \(4, 9\) has d_in=9 but a \(3, 8, 2\)"):
    kernels.adapter_mixture(jnp.ones((4, 9)), a, b, g, 1.0)
  with pytest.raises(ValueError, match=r"gates \(4, 2\) has 2 experts"):
    kernels.adapter_mixture(x, a, b, g[:, :2], 1.0)
  with pytest.raises(ValueError, match=r"b \(3, 3, 6\) does not match a \(3, 8, 2\)"):
    kernels.adapter_mixture(x, a, jnp.ones((3, 3, 6)), g, 1.0)
  with pytest.raises(ValueError, match=r"w \(8, 5\) must be \[d_in, d_out\]"):
    kernels.mixed_linear(x, jnp.ones((8, 5)), None, a, b, g, 1.0)
  with pytest.raises(ValueError, match=r"expert_index \(3,\) must be \[2\]"):
    kernels.per_sequence_lora(jnp.ones((2, 1, 8)), a, b, jnp.zeros((3,), jnp.int32), 1.0)


# ------------------------------------------------------------------------------------------------
# Real GPU (compiled Triton kernels). Run with: python -m pytest -m gpu tests/test_mixture_pallas.py
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    ((1000,), 512, 384, 16, 8, 2, BF16),    # prefill-like, ragged T
    ((3,), 1024, 1000, 64, 32, 2, BF16),    # decode-like, ragged d_out
    ((2, 77), 320, 200, 12, 5, 5, BF16),    # r not a power of two, dense gates
    ((129,), 256, 256, 8, 4, 1, F32),       # float32 (TF32 products by default)
    ((16,), 4096, 4096, 64, 32, 2, BF16),   # benchmark decode shape
]


@pytest.mark.gpu
@pytest.mark.parametrize("lead,d_in,d_out,r,E,k,dtype", GPU_CASES)
def test_gpu_forward_and_backward(lead, d_in, d_out, r, E, k, dtype):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  x, a, b, g = make_inputs(np.random.default_rng(r + E), lead, d_in, d_out, r, E, k, dtype)
  y, grads = _loss_and_grads(kernels.adapter_mixture, x, a, b, g, 0.5)
  with jax.default_matmul_precision("highest"):
    y_ref, grads_ref = _loss_and_grads(mixture.mixture_reference, x, a, b, g, 0.5)
  tol = 2e-2 if dtype == BF16 else 3e-3   # float32: TF32 tensor-core products
  assert_close(y, y_ref, dtype, tol=tol)
  assert_close(grads, grads_ref, dtype, tol=max(tol, 5e-2 if dtype == BF16 else 3e-3))


@pytest.mark.gpu
def test_gpu_highest_precision_float32_is_exact():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  x, a, b, g = make_inputs(np.random.default_rng(7), (100,), 256, 192, 16, 4, 2, F32)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda *v: kernels.adapter_mixture(*v, 0.5))(x, a, b, g)
    want = mixture.mixture_reference(x, a, b, g, 0.5)
  assert_close(got, want, F32, tol=1e-5)


@pytest.mark.gpu
def test_gpu_fused_and_per_sequence():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  rng = np.random.default_rng(8)
  x, a, b, g = make_inputs(rng, (300,), 512, 320, 16, 8, 2, BF16)
  w = jnp.asarray(rng.normal(size=(512, 320)) / 20, BF16)
  bias = jnp.asarray(rng.normal(size=(320,)), BF16)
  got = jax.jit(lambda *v: kernels.mixed_linear(*v, 0.5))(x, w, bias, a, b, g)
  want = (jnp.dot(x, w, preferred_element_type=F32) + bias.astype(F32)
          + mixture.mixture_reference(x, a, b, g, 0.5).astype(F32))
  assert_close(got, want, BF16)
  xs = x[:288].reshape(4, 72, 512)
  idx = jnp.asarray([3, 0, 7, 3], jnp.int32)
  got = jax.jit(lambda *v: kernels.per_sequence_lora(*v, idx, 0.5))(xs, a, b)
  one_hot = jnp.repeat(jax.nn.one_hot(idx, 8, dtype=F32)[:, None], 72, axis=1)
  assert_close(got, mixture.mixture_reference(xs, a, b, one_hot, 0.5), BF16)
