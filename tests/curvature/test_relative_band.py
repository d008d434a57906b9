"""relative_sharpness_band against the closed form on quadratics, batch by batch.

Reference: task i's loss on batch k is L(θ) = ½θᵀAθ + bᵀθ with its own (A, b). Along the step
θ − ηd, L(θ − ηd) − L(θ) = −η dᵀ∇L + ½η² dᵀAd, so the loss rises exactly when
η > η* = 2 dᵀ∇L / dᵀAd (dᵀ∇L > 0 and dᵀAd > 0): λ_c = dᵀAd / dᵀ∇L, computed here in NumPy;
dᵀ∇L ≤ 0 raises the loss at every step size (the band counts it as +inf).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature

K, N, M, DIM = 4, 2, 3, 5  # batches per task, tasks, directions, parameters


def _tol_bound(k):
  # η* ∈ [lower, upper] with 1 − lower/upper ≤ t = 2^−k; the midpoint m gives
  # |λ_c/λ* − 1| ≤ t/(2 − t); plus a few float64 ulps of the bracket arithmetic.
  return 2.0 ** -k / (2 - 2.0 ** -k) + 8 * np.finfo(np.float64).eps


def _problem(seed):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(N, K, DIM, DIM))
  a = q @ np.swapaxes(q, -1, -2) / DIM + 0.1 * np.eye(DIM)  # SPD, one per task and batch
  b = rng.normal(size=(N, K, DIM))
  theta = rng.normal(size=DIM)
  dirs = rng.normal(size=(M, DIM))
  grad = np.einsum("nkij,j->nki", a, theta) + b  # ∇L at θ, [N, K, DIM]
  slope = np.einsum("nki,mi->knm", grad, dirs)  # dᵀ∇L, [K, N, M]
  curv = np.einsum("mi,nkij,mj->knm", dirs, a, dirs)  # dᵀAd
  expected = np.where(slope > 0, curv / np.where(slope > 0, slope, 1.0), np.inf)
  return a, b, theta, dirs, slope, expected


def _loss(p, batch):
  return 0.5 * p @ batch["a"] @ p + batch["b"] @ p


@pytest.mark.parametrize("seed", [0, 1])
def test_band_matches_closed_form_per_batch(seed):
  a, b, theta, dirs, slope, expected = _problem(seed)
  # The draw exercises both cases: some entries descend on every batch, some conflict on some.
  assert (slope > 0).any() and (slope <= 0).any()
  with jax.enable_x64(True):
    batches = [{"a": jnp.asarray(a[i]), "b": jnp.asarray(b[i])} for i in range(N)]
    per, band = jax.jit(lambda t, ds, bs: curvature.relative_sharpness_band(
        [_loss] * N, t, ds, bs, tol_power=8))(jnp.asarray(theta), list(jnp.asarray(dirs)),
                                               batches)
  per, band = jax.tree.map(np.asarray, (per, band))
  assert per.sharpness.shape == (K, N, M) and band.median.shape == (N, M)
  np.testing.assert_allclose(per.slope, slope, rtol=1e-12)
  descent = slope > 0
  assert np.all(per.status[descent] == curvature.STATUS_OK)
  assert np.all(per.status[~descent] == curvature.STATUS_NOT_DESCENT)
  np.testing.assert_allclose(per.sharpness[descent], expected[descent], rtol=_tol_bound(8))
  # Each measured value is within a relative δ of its exact value, and order statistics are
  # monotone in every argument, so the band's median (a mean of two order statistics), min
  # and max are within the same δ of the exact ones; infinities must match exactly.
  for got, want in ((band.median, np.median(expected, axis=0)),
                    (band.min, expected.min(axis=0)), (band.max, expected.max(axis=0))):
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=_tol_bound(8))
  np.testing.assert_array_equal(band.num_not_descent, (~descent).sum(axis=0))
  np.testing.assert_array_equal(band.num_counted, np.full((N, M), K))


def test_band_leaves_out_unmeasured_batches_and_counts_no_rise_as_zero():
  # Statuses and values set by hand: [ok 4, ok 2, unresolved, no_rise] and [nonfinite × 4].
  st = np.array([[0, 0, 5, 2], [4, 4, 4, 4]], np.int32).T  # [K=4, 2]
  sharp = np.array([[4.0, 2.0, np.nan, 0.0], [np.nan] * 4]).T
  res = curvature.CriticalSharpness(*(jnp.asarray(x) for x in (
      sharp, sharp, sharp, sharp, np.zeros_like(st), sharp, sharp, st)))
  band = jax.tree.map(np.asarray, curvature.sharpness_band(res, axis=0))
  # Counted: 4, 2, 0 (no rise) → median 2, min 0, max 4; the second entry has none counted.
  np.testing.assert_array_equal(band.num_counted, [3, 0])
  np.testing.assert_array_equal(band.median[:1], [2.0])
  np.testing.assert_array_equal(band.min[:1], [0.0])
  np.testing.assert_array_equal(band.max[:1], [4.0])
  assert np.isnan(band.median[1]) and np.isnan(band.min[1]) and np.isnan(band.max[1])


def test_band_rejects_mismatched_batches():
  theta = jnp.zeros(2)
  one = {"a": jnp.zeros((3, 2, 2)), "b": jnp.zeros((3, 2))}
  two = {"a": jnp.zeros((4, 2, 2)), "b": jnp.zeros((4, 2))}
  with pytest.raises(ValueError, match="same number of batches"):
    curvature.relative_sharpness_band([_loss, _loss], theta, [theta], [one, two])
  with pytest.raises(ValueError, match="`batches` has 1"):
    curvature.relative_sharpness_band([_loss, _loss], theta, [theta], [one])
