"""Phase lag on synthetic ground truth (REFERENCES §7) and hysteresis areas of known loops."""

import math

import numpy as np
import pytest

from convergence import _lag

DELAY = 300


def _synthetic(seed, *, bump=True, n=4000, tau=800.0, threshold=1.2, noise=0.01):
  """Loss L(t) = 0.5 + 2 e^{−t/τ} (+ a transient bump); metric M(t) = σ((θ − L(t − 300))/0.15)."""
  rng = np.random.default_rng(seed)
  t = np.arange(n, dtype=float)

  def true_loss(s):
    out = 0.5 + 2.0 * np.exp(-s / tau)
    if bump:
      out = out + 0.15 * np.exp(-0.5 * ((s - 1800.0) / 40.0) ** 2)
    return out

  loss = true_loss(t) + noise * rng.normal(size=n)
  metric = 1 / (1 + np.exp(-(threshold - true_loss(t - DELAY)) / 0.15)) + noise * rng.normal(size=n)
  return loss, metric


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_300_step_delay_with_perturbation(seed):
  loss, metric = _synthetic(seed)
  metric[[2500, 2501]] = np.nan                  # non-finite metric samples are left out
  res = _lag.estimate_lag(loss, metric, max_lag=1000)
  assert res.status == _lag.IDENTIFIED, res.reason
  assert abs(res.lag - DELAY) <= 0.1 * DELAY                  # the issue's ±10 %
  assert res.lower <= res.lag <= res.upper
  assert res.upper - res.lower <= 0.1 * DELAY


@pytest.mark.parametrize("seed", [0, 1])
def test_smooth_monotone_loss_is_not_identifiable(seed):
  loss, metric = _synthetic(seed, bump=False)
  res = _lag.estimate_lag(loss, metric, max_lag=1000)
  assert res.status == _lag.NOT_IDENTIFIABLE
  assert res.lag is None and res.lower is None and res.upper is None
  assert res.reason


def test_pooled_smooth_runs_with_a_shared_link_identify_the_delay():
  # Three smooth, monotone runs with different speeds and one link: no single run pins the
  # delay, together they do (a wrong delay needs a different link per run).
  runs = [_synthetic(s, bump=False, tau=tau) for s, tau in enumerate((400.0, 800.0, 1600.0))]
  losses, metrics = [r[0] for r in runs], [r[1] for r in runs]
  res = _lag.estimate_lag(losses, metrics, max_lag=1000)
  assert res.status == _lag.IDENTIFIED, res.reason
  assert abs(res.lag - DELAY) <= 0.1 * DELAY
  per_run = _lag.estimate_lag(losses, metrics, max_lag=1000, shared_link=False)
  assert per_run.status == _lag.NOT_IDENTIFIABLE


def test_hysteresis_area_of_an_ellipse():
  a, b = 2.0, 0.5
  th = np.linspace(0, 2 * np.pi, 4001)[:-1]
  x, y = 1 + a * np.cos(th), 3 + b * np.sin(th)
  res = _lag.hysteresis_area(x, y)
  # Polygon with N vertices inscribed in the ellipse: area πab·sin(2π/N)/(2π/N).
  n = th.size
  exact = math.pi * a * b * math.sin(2 * math.pi / n) / (2 * math.pi / n)
  np.testing.assert_allclose(res.area, [exact], rtol=1e-12)
  np.testing.assert_allclose(res.area, [math.pi * a * b], rtol=1e-6)
  np.testing.assert_allclose(res.normalized, [math.pi / 4], rtol=1e-6)
  assert _lag.hysteresis_area(x[::-1], y[::-1]).area[0] < 0     # clockwise: negative


def test_hysteresis_area_measures_phase_lag_per_cycle():
  period, phi = 500, 0.3
  t = np.arange(3 * period + 17)                  # a trailing partial cycle is dropped
  lr = np.cos(2 * np.pi * t / period)
  metric = np.cos(2 * np.pi * t / period - phi)
  metric[700] = np.nan
  res = _lag.hysteresis_area(lr, metric, period=period)
  assert res.area.shape == (3,)
  np.testing.assert_array_equal(res.starts, [0, 500, 1000])
  # Loop x = cos θ, y = cos(θ − φ): area π sin φ; 500-gon error ~ (2π/500)²/6 relative,
  # and the dropped NaN vertex costs O(1/500²).
  np.testing.assert_allclose(res.area, math.pi * math.sin(phi), rtol=1e-3)


def test_bad_arguments():
  with pytest.raises(ValueError, match="lengths"):
    _lag.estimate_lag(np.zeros(3000), np.zeros(2999), max_lag=100)
  with pytest.raises(ValueError, match="max_lag"):
    _lag.estimate_lag(np.zeros(3000), np.zeros(3000), max_lag=0)
  with pytest.raises(ValueError, match="period"):
    _lag.hysteresis_area(np.zeros(10), np.zeros(10), period=2)
