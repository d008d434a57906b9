"""Stochastic Hessian probes: Hutchinson trace and stochastic Lanczos quadrature density."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import optax

from curvature import _hvp
from curvature import _lanczos
from curvature import _tree

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]


class HessianTrace(NamedTuple):
  """Hutchinson estimate of :math:`\\mathrm{tr}\\,H`.

  Attributes:
    estimate: the sample mean of :math:`z^\\top H z`.
    std_error: its standard error, sample std (ddof=1) / sqrt(num_samples); NaN for one sample.
    num_samples: the number of probes.
  """
  estimate: jax.Array
  std_error: jax.Array
  num_samples: int


class SpectralDensity(NamedTuple):
  """Stochastic Lanczos quadrature of the Hessian spectrum.

  Attributes:
    nodes: ``[num_probes, m]`` Ritz values of each probe's Lanczos tridiagonal.
    weights: ``[num_probes, m]`` squared first components of its eigenvectors; each row sums
      to 1.
    grid: ``[num_grid]`` points where the density is evaluated.
    density: ``[num_grid]`` Gaussian-smoothed density, integrating to ~1 over ``grid``.
    sigma: the Gaussian width used.
  """
  nodes: jax.Array
  weights: jax.Array
  grid: jax.Array
  density: jax.Array
  sigma: jax.Array


def _check_count(value, name: str, minimum: int = 1) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
  return int(value)


def _map(fn, xs, batch_size: Optional[int]):
  """``fn`` over the leading axis: all at once (vmap) when ``batch_size`` is None."""
  if batch_size is None:
    return jax.vmap(fn)(xs)
  return lax.map(fn, xs, batch_size=_check_count(batch_size, "batch_size"))


def hessian_trace(loss_fn: LossFn, params: PyTree, *, num_samples: int = 100,
                  key: Optional[jax.Array] = None,
                  batch_size: Optional[int] = None) -> HessianTrace:
  r"""Hutchinson estimate of :math:`\mathrm{tr}\,H` with Rademacher probes.

  :math:`\widehat{\mathrm{tr}} = \frac1n \sum_{i=1}^n z_i^\top H z_i` with :math:`z_i` of
  independent ±1 entries, so :math:`E[z^\top H z] = \mathrm{tr}\,H` and
  :math:`\mathrm{Var}[z^\top H z] = 2(\|H\|_F^2 - \sum_j H_{jj}^2)`, the smallest variance of
  any i.i.d. probe distribution (Hutchinson 1990; Avron & Toledo 2011). Each probe costs one
  HVP (forward-over-reverse); quadratic forms are accumulated in float32 or wider.

  Non-finite input: a NaN or inf in the loss or an HVP gives a NaN estimate.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the point :math:`\theta`.
    num_samples: number of probes ``n >= 1``; the error falls as :math:`1/\sqrt n`.
    key: PRNG key; ``None`` means ``jax.random.PRNGKey(0)``.
    batch_size: probes per vectorised batch (``lax.map`` with ``batch_size``), to bound
      memory; ``None`` vmaps all probes at once.

  Returns:
    :class:`HessianTrace` ``(estimate, std_error, num_samples)``.

  Reference: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix
  for Laplacian smoothing splines" (1990); Ghorbani et al. 2019 (arXiv 1901.10159) §2.
  """
  _hvp.check_loss_fn(loss_fn, params)
  n = _check_count(num_samples, "num_samples")
  if key is None:
    key = jax.random.PRNGKey(0)

  def sample(k):
    z = _tree.tree_random_like(k, params, "rademacher")
    return _tree.tree_vdot(z, _hvp.hvp(loss_fn, params, z))

  samples = _map(sample, jax.random.split(key, n), batch_size)
  std_error = jnp.std(samples, ddof=1) / math.sqrt(n) if n > 1 else jnp.full((), jnp.nan,
                                                                               samples.dtype)
  return HessianTrace(jnp.mean(samples), std_error, n)


def lanczos_quadrature(matvec, v0: PyTree, num_iters: int) -> tuple[jax.Array, jax.Array]:
  r"""Gauss quadrature of the spectral measure of :math:`A` seen from ``v0``.

  With :math:`T = S\,\mathrm{diag}(\theta)\,S^\top` from ``num_iters`` Lanczos steps started at
  :math:`q_0 = v_0/\|v_0\|`, returns nodes :math:`\theta_j` and weights
  :math:`\tau_j = S_{0j}^2` such that :math:`\sum_j \tau_j f(\theta_j) = q_0^\top f(A) q_0`
  exactly for polynomials :math:`f` of degree :math:`\le 2m - 1` (Golub & Meurant).
  The weights sum to 1.
  """
  dec = _lanczos.lanczos_tridiag(matvec, v0, num_iters)
  theta, s = _lanczos.tridiag_eigh(dec.alphas, dec.betas)
  return theta, s[0] ** 2


def spectral_density(loss_fn: LossFn, params: PyTree, *, num_probes: int = 10,
                     num_iters: Optional[int] = None, key: Optional[jax.Array] = None,
                     grid: Optional[jax.Array] = None, num_grid: int = 1000,
                     sigma: Optional[float] = None,
                     batch_size: Optional[int] = 1) -> SpectralDensity:
  r"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

  For each probe :math:`v = z/\|z\|` (:math:`z` Rademacher), ``num_iters`` Lanczos steps
  with full reorthogonalisation give nodes :math:`\theta_j` (Ritz values) and weights
  :math:`\tau_j` (squared first components of the eigenvectors of :math:`T`), a Gauss
  quadrature of :math:`v^\top f(H) v`; each probe's weights sum to 1. Hence

  .. math::
     \mathrm{tr} f(H) \approx \mathrm{dim} \cdot \frac{1}{n_v} \sum_{p} \sum_j
     \tau_{pj} f(\theta_{pj}),

  exact in expectation over probes for polynomials of degree :math:`\le 2m-1` (and with
  ``num_iters = dim``, each probe's quadrature equals :math:`z^\top f(H) z/\mathrm{dim}`
  exactly).
  The density is the smoothed measure

  .. math:: \phi(t) = \frac{1}{n_v} \sum_p \sum_j \tau_{pj}\, \mathcal N(t;\ \theta_{pj}, \sigma^2),

  which integrates to 1 (up to the mass of the Gaussians outside ``grid``).

  Cost: ``num_probes * num_iters`` HVPs; memory ``batch_size * num_iters * P`` for the
  Krylov bases (probes run one at a time by default).

  Non-finite input: a NaN in the loss or an HVP gives NaN nodes, weights and density (and,
  with the default grid, a NaN grid); the iteration count is fixed, so it never hangs.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the point :math:`\theta`.
    num_probes: number of random start vectors :math:`n_v \ge 1`.
    num_iters: Lanczos steps per probe; ``None`` means ``min(dim, 80)``; clipped to ``dim``.
      Ghorbani et al. use ~90; the extreme nodes converge first, the interior is resolved
      to about (spectral width)/m.
    key: PRNG key; ``None`` means ``jax.random.PRNGKey(0)``.
    grid: 1-D points at which to evaluate the density; ``None`` means ``num_grid`` points
      spanning ``[min node - 5 sigma, max node + 5 sigma]``.
    num_grid: number of grid points when ``grid`` is None (``>= 2``).
    sigma: Gaussian width; ``None`` means 1% of the spread of the nodes.
    batch_size: probes run together (vmapped) per step of a ``lax.map``; ``None`` runs all
      at once.

  Returns:
    :class:`SpectralDensity` ``(nodes, weights, grid, density, sigma)``.

  Reference: Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization via
  Hessian Eigenvalue Density", ICML 2019 (arXiv 1901.10159); Lin, Saad & Yang, "Approximating
  spectral densities of large matrices", SIAM Review 2016.
  """
  _hvp.check_loss_fn(loss_fn, params)
  n = _check_count(num_probes, "num_probes")
  dim = optax.tree.size(params)
  if num_iters is None:
    num_iters = min(dim, 80)
  num_iters = min(_check_count(num_iters, "num_iters"), dim)
  if grid is None:
    _check_count(num_grid, "num_grid", minimum=2)
  elif jnp.ndim(grid) != 1:
    raise ValueError(f"`grid` must be a 1-D array, got shape {jnp.shape(grid)}")
  if isinstance(sigma, numbers.Real) and not sigma > 0:
    raise ValueError(f"`sigma` must be > 0 or None, got {sigma!r}")
  if key is None:
    key = jax.random.PRNGKey(0)
  dtype = _tree.accum_dtype(params)

  def matvec(v):
    return optax.tree.cast(_hvp.hvp(loss_fn, params, _lanczos.cast_like(v, params)), dtype)

  def probe(k):
    z = _tree.tree_random_like(k, optax.tree.cast(params, dtype), "rademacher")
    # Laid out like params, so the Krylov basis built from it is too (see shard_like).
    return lanczos_quadrature(matvec, _lanczos.shard_like(z, params), num_iters)

  nodes, weights = _map(probe, jax.random.split(key, n), batch_size)

  lo, hi = jnp.min(nodes), jnp.max(nodes)
  if sigma is None:
    spread = jnp.maximum(hi - lo, 1e-3 * jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    sigma = 0.01 * jnp.where(spread > 0, spread, 1.0)
  sigma = jnp.asarray(sigma, dtype)
  if grid is None:
    grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_grid, dtype=dtype)
  grid = jnp.asarray(grid, dtype)
  z = (grid[None, None, :] - nodes[:, :, None]) / sigma
  kernel = jnp.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
  density = jnp.einsum("pm,pmg->g", weights, kernel, precision=lax.Precision.HIGHEST) / n
  return SpectralDensity(nodes, weights, grid, density, sigma)
