"""The plain-JAX adapter mixture against a per-expert loop written from the definition."""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drex
from drex.adapters import mixture

BF16 = jnp.bfloat16


def _loop(x, a, b, g, scale):
  out = np.zeros(x.shape[:-1] + (b.shape[-1],), np.float64)
  for e in range(a.shape[0]):
    out += scale * g[..., e:e + 1] * (x @ a[e] @ b[e])
  return out


@pytest.mark.parametrize("t,d,r,o,e", [(7, 16, 3, 5, 1), (32, 24, 8, 40, 4), (1, 8, 1, 8, 3)])
def test_reference_matches_loop(t, d, r, o, e):
  rng = np.random.default_rng(0)
  x, a, b = rng.normal(size=(t, d)), rng.normal(size=(e, d, r)), rng.normal(size=(e, r, o))
  g = rng.random((t, e))
  got = mixture.mixture_reference(*(jnp.asarray(v, jnp.float32) for v in (x, a, b, g)), 0.5)
  chex.assert_shape(got, (t, o))
  np.testing.assert_allclose(got, _loop(x, a, b, g, 0.5), rtol=1e-4, atol=1e-4)


def test_leading_dims_and_dtype():
  x = jnp.ones((2, 3, 8), jnp.bfloat16)
  got = mixture.adapter_mixture(x, jnp.ones((2, 8, 4)), jnp.ones((2, 4, 6)), jnp.ones((2, 3, 2)), 1.0)
  chex.assert_shape(got, (2, 3, 6))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), 64.0)


def test_unknown_kernel_is_an_error():
  with pytest.raises(ValueError, match="unknown adapter kernel 'triton'"):
    mixture.adapter_mixture(jnp.ones((1, 2)), jnp.ones((1, 2, 1)), jnp.ones((1, 1, 2)), jnp.ones((1, 1)), 1.0,
                            kernel="triton")


def test_choose_kernel_returns_a_kernel_name():
  for backend in ("cpu", "gpu", "tpu"):
    for t in (1, 16, 8192):
      assert mixture.choose_kernel(t, 4096, 4096, 16, 8, BF16, backend) in ("pallas", "xla")
  assert mixture.choose_kernel(8192, 4096, 4096, 16, 8, BF16, "cpu") == "xla"
  assert mixture.choose_kernel(8192, 4096, 4096, 16, 8, BF16, "gpu") == "xla"      # measured: loses
  assert mixture.choose_kernel(1, 4096, 4096, 64, 32, BF16, "gpu", top_k=2) == "pallas"  # wins
  assert mixture.choose_kernel(1, 4096, 4096, 64, 32, BF16, "gpu", top_k=32) == "xla"


def test_choosing_a_kernel_does_not_import_the_kernel_package(monkeypatch):
  """'auto' decides beside the mixture; Pallas (drex.kernels) is imported only for 'pallas'."""
  monkeypatch.delattr(drex, "kernels", raising=False)
  monkeypatch.setitem(sys.modules, "drex.kernels", None)  # any import of it now fails
  x = jnp.ones((2, 8), jnp.bfloat16)
  got = mixture.adapter_mixture(x, jnp.ones((2, 8, 4)), jnp.ones((2, 4, 6)), jnp.ones((2, 2)), 1.0,
                                kernel="auto", top_k=1)
  np.testing.assert_allclose(np.asarray(got, np.float32), 64.0)
  with pytest.raises(ImportError):
    mixture.adapter_mixture(x, jnp.ones((2, 8, 4)), jnp.ones((2, 4, 6)), jnp.ones((2, 2)), 1.0,
                            kernel="pallas")


def test_sequence_mixture_equals_the_dense_one_on_each_sequences_experts():
  """Gathering each sequence's experts gives the dense mixture's output when the gates are zero elsewhere."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(6, 16, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(6, 4, 8)), jnp.float32)
  used = np.asarray([[0, 3], [5, 1], [2, 4]])
  keep = np.zeros((3, 1, 6), np.float32)
  for s, experts in enumerate(used):
    keep[s, 0, experts] = 1.0
  gates = jnp.asarray(rng.uniform(size=(3, 5, 6)) * keep, jnp.float32)
  np.testing.assert_allclose(mixture.sequence_mixture(x, a, b, gates, jnp.asarray(used), 0.5),
                             mixture.mixture_reference(x, a, b, gates, 0.5), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lead,d,r,o,e,x_dtype", [((2, 5), 16, 4, 24, 3, jnp.float32), ((7,), 8, 1, 8, 1, jnp.float32),
                                                  ((3, 2, 4), 32, 8, 16, 2, BF16)])
def test_dense_mixture_gradients_equal_autodiff_of_the_reference(lead, d, r, o, e, x_dtype):
  """The 'xla' kernel's hand-written backward (mixture_grads) gives the reference's autodiff cotangents."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=lead + (d,)), x_dtype)
  a, b = jnp.asarray(rng.normal(size=(e, d, r)), jnp.float32), jnp.asarray(rng.normal(size=(e, r, o)), jnp.float32)
  gates = jnp.asarray(rng.random(lead + (e,)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=lead + (o,)), jnp.float32)

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args, 0.5).astype(jnp.float32) * probe)

  want_y, got_y = mixture.mixture_reference(x, a, b, gates, 0.5), mixture.adapter_mixture(x, a, b, gates, 0.5)
  np.testing.assert_array_equal(np.asarray(got_y, np.float32), np.asarray(want_y, np.float32))
  want = jax.grad(loss(mixture.mixture_reference), argnums=(0, 1, 2, 3))(x, a, b, gates)
  got = jax.grad(loss(mixture.dense_mixture), argnums=(0, 1, 2, 3))(x, a, b, gates)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  tol = 2e-2 if x_dtype == BF16 else 1e-4
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol * 10)
