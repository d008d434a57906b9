"""gradient_noise_top_eigenvalue against the dense per-example gradient covariance.

Reference: per-example gradients G [N, P] from ``jax.jacrev`` of the loss vector, then
Sigma = (G - mean)^T (G - mean) / N in NumPy (population convention), ``eigvalsh``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from curvature._noise import gradient_noise_top_eigenvalue


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _problem(n, seed=0):
  """A tanh MLP with per-example squared error: 115 parameters, N examples."""
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(4, 15)) / 2), "b1": jnp.asarray(rng.normal(size=15)),
            "w2": jnp.asarray(rng.normal(size=(15, 2))), "b2": jnp.zeros(2)}
  batch = {"x": jnp.asarray(rng.normal(size=(n, 4))), "y": jnp.asarray(rng.normal(size=(n, 2)))}

  def per_example_loss(p, batch):
    pred = jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return 0.5 * jnp.sum((pred - batch["y"]) ** 2, axis=-1)

  return per_example_loss, params, batch


def _dense_cov_eigs(fn, params, batch):
  flat, unravel = ravel_pytree(params)
  g = np.asarray(jax.jacrev(lambda f: fn(unravel(f), batch))(flat))        # [N, P]
  gc = g - g.mean(axis=0)
  return np.linalg.eigvalsh(gc.T @ gc / g.shape[0])[::-1]


@pytest.mark.parametrize("n, k", [(64, 3), (4, 3)])
def test_top_eigenvalues_vs_dense(x64, n, k):
  # n = 4: Sigma has rank 3, far below the 40-step basis; Lanczos breaks down and must
  # still return the three non-zero eigenvalues without NaN.
  fn, params, batch = _problem(n)
  want = _dense_cov_eigs(fn, params, batch)
  out = jax.jit(lambda p, b: gradient_noise_top_eigenvalue(fn, p, b, k=k))(params, batch)
  assert bool(out.converged)
  np.testing.assert_allclose(np.asarray(out.eigenvalues), want[:k], rtol=1e-6)


def test_float32(x64):
  fn, params, batch = _problem(32)
  want = _dense_cov_eigs(fn, params, batch)
  with jax.enable_x64(False):
    p32 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), params)
    b32 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), batch)
    out = jax.jit(lambda p, b: gradient_noise_top_eigenvalue(fn, p, b))(p32, b32)
  assert out.eigenvalues.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.eigenvalues), want[:1], rtol=1e-4)


def test_bad_per_example_loss():
  fn, params, batch = _problem(8)
  with pytest.raises(TypeError, match="per_example_loss_fn"):
    gradient_noise_top_eigenvalue(lambda p, b: jnp.sum(fn(p, b)), params, batch)
  with pytest.raises(ValueError, match="`k`"):
    gradient_noise_top_eigenvalue(fn, params, batch, k=0)
