"""hessian_trace (Hutchinson) and spectral_density (SLQ) against the dense float64 Hessian.

Monte Carlo tolerances are derived from the sample count. For a Rademacher probe z and a
symmetric M, z^T M z = sum_i M_ii + sum_{i != j} z_i z_j M_ij, whose second term has mean 0
and variance sum_{i != j} 2 M_ij^2 (the pairs (i,j), (j,i) coincide), so

  Var[z^T M z] = 2 (||M||_F^2 - sum_i M_ii^2),

and the mean of n independent probes has standard deviation sqrt(Var / n). Tests accept
5 standard deviations (a false failure every ~1.7 million runs; the seeds are fixed anyway).
With num_iters = dim, SLQ's quadrature of each probe is exact: dim * sum_j w_j f(node_j) =
z^T f(H) z, so the same formula (with M = f(H)) gives its tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.special import ndtr

from curvature import _stochastic
from curvature._stochastic import hessian_trace
from curvature._stochastic import spectral_density


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _problem(seed=0, n=32):
  """A tanh MLP on a regression batch: 95 parameters (four leaves)."""
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(5, 12)) / 2), "b1": jnp.asarray(rng.normal(size=12)),
            "w2": jnp.asarray(rng.normal(size=(12, 2))), "b2": jnp.zeros(2)}
  x, y = jnp.asarray(rng.normal(size=(n, 5))), jnp.asarray(rng.normal(size=(n, 2)))

  def loss(p):
    return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat))
  return loss, params, h


def _mc_std(m, n):
  """Standard deviation of the mean of n Rademacher quadratic forms z^T M z (see top)."""
  return np.sqrt(2 * (np.sum(m ** 2) - np.sum(np.diag(m) ** 2)) / n)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_hutchinson_trace(x64, batch_size):
  loss, params, h = _problem()
  n = 400
  out = jax.jit(lambda p: hessian_trace(loss, p, num_samples=n, batch_size=batch_size))(params)
  assert int(out.num_samples) == n
  std = _mc_std(h, n)
  assert abs(float(out.estimate) - np.trace(h)) <= 5 * std
  # The reported standard error estimates the same std (its own relative error at n = 400
  # is a few percent, so a factor of 1.5 either way is generous).
  assert std / 1.5 <= float(out.std_error) <= 1.5 * std


def test_lanczos_quadrature_exact(x64):
  # Per probe, with m = dim the Gauss quadrature reproduces q^T H q and q^T H^2 q exactly.
  loss, params, h = _problem()
  dim = h.shape[0]
  rng = np.random.default_rng(3)
  v = rng.choice([-1.0, 1.0], size=dim)
  hm = jnp.asarray(h)
  nodes, weights = _stochastic.lanczos_quadrature(lambda u: hm @ u, jnp.asarray(v), dim)
  nodes, weights = np.asarray(nodes), np.asarray(weights)
  q = v / np.linalg.norm(v)
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(weights @ nodes, q @ h @ q, rtol=1e-10)
  np.testing.assert_allclose(weights @ nodes ** 2, q @ h @ h @ q, rtol=1e-10)
  np.testing.assert_allclose(np.sort(nodes), np.linalg.eigvalsh(h), atol=1e-10)


def test_spectral_density_moments_and_mass(x64):
  loss, params, h = _problem()
  dim = h.shape[0]
  eigs = np.linalg.eigvalsh(h)
  n = 40
  out = jax.jit(lambda p: spectral_density(loss, p, num_probes=n, num_iters=dim))(params)
  nodes, weights = np.asarray(out.nodes), np.asarray(out.weights)
  assert nodes.shape == weights.shape == (n, dim)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
  # tr f(H) ~ dim * mean over probes of sum_j w_j f(node_j), for f(x) = x and x^2.
  for f, fh in [(lambda x: x, h), (lambda x: x ** 2, h @ h)]:
    est = dim * np.mean(np.sum(weights * f(nodes), axis=1))
    assert abs(est - np.trace(fh)) <= 5 * _mc_std(fh, n)
  # The density integrates to 1 over its grid.
  grid, density = np.asarray(out.grid), np.asarray(out.density)
  np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-4)
  # Its mass sits where the eigenvalues are: the smoothed spectral CDF at a few points
  # against the exact one, tr Phi((t - H)/sigma) / dim, within 5 MC standard deviations.
  sigma = float(out.sigma)
  vecs = np.linalg.eigh(h)[1]
  for t in np.quantile(eigs, [0.1, 0.5, 0.9]):
    cdf_slq = np.trapezoid(np.where(grid <= t, density, 0.0), grid)
    f_eigs = ndtr((t - eigs) / sigma)
    cdf_exact = f_eigs.mean()
    fh = (vecs * f_eigs) @ vecs.T
    tol = 5 * _mc_std(fh, n) / dim + 2e-3          # MC + trapezoid discretisation
    assert abs(cdf_slq - cdf_exact) <= tol


def test_spectral_density_default_iters_extremes(x64):
  # With fewer steps than the dimension, the extreme nodes still converge to the ends of
  # the spectrum (Lanczos finds the extremes first).
  loss, params, h = _problem()
  eigs = np.linalg.eigvalsh(h)
  out = jax.jit(lambda p: spectral_density(loss, p, num_probes=2, num_iters=40))(params)
  np.testing.assert_allclose(np.max(np.asarray(out.nodes)), eigs[-1], rtol=1e-6)
  np.testing.assert_allclose(np.min(np.asarray(out.nodes)), eigs[0], rtol=1e-3, atol=1e-6)


def test_bad_arguments():
  params = {"w": jnp.ones(4)}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.raises(ValueError, match="num_samples"):
    hessian_trace(loss, params, num_samples=0)
  with pytest.raises(ValueError, match="num_probes"):
    spectral_density(loss, params, num_probes=0)
  with pytest.raises(ValueError, match="grid"):
    spectral_density(loss, params, grid=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="sigma"):
    spectral_density(loss, params, sigma=0.0)
  with pytest.raises(TypeError, match="loss_fn"):
    hessian_trace(lambda p: p["w"], params)
