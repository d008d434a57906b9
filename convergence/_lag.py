"""Phase lag between a loss series and a downstream metric, and hysteresis-loop areas.

Seed 000's "performance lag phase": the delay between an improvement of the loss and the
matching improvement of a downstream metric. REFERENCES §7: from one smooth, monotone loss
curve the lag is not identifiable. If L is monotone then L(t − d) = h_d(L(t)) for a monotone
h_d, so M(t) = g(L(t − d)) = (g∘h_d)(L(t)) fits *every* delay d with another link: delay and
threshold are confounded. Only features of L that a monotone re-mapping cannot produce
(transient bumps, spikes, LR-induced kinks) or several runs sharing one link pin d down.

Lagged-link model. For each candidate delay d on a grid,

    M_r(t) = g_r(L̃_r(t − d)) + ε_t,      t ∈ [d_max, n_r),

with L̃ the noise-smoothed loss (:func:`convergence.local_derivatives`, so that batch noise in
the loss, to which the metric does not respond, does not enter the regressor), g a cubic
B-spline with knots at quantiles of L̃ (flexible enough to absorb any threshold / sigmoid
shape), shared by all runs (``shared_link=True``) or one per run. Every delay is fitted on the
same samples t ≥ d_max, so the residual sums of squares RSS(d) are comparable. The profile
likelihood-ratio confidence set (Gaussian errors, n_eff = n(1 − ρ)/(1 + ρ) for residual lag-1
autocorrelation ρ) is

    { d : n_eff · log(RSS(d) / RSS(d̂)) ≤ χ²₁(coverage) }.

The lag is reported only when that set is narrow (width ≤ ``max_rel_width`` · d_max) and does
not reach the end of the grid; otherwise the status is ``"not_identifiable"`` and no number is
given. A flat profile (smooth monotone loss, one run) is exactly that case.

Hysteresis. When the learning rate (or any driver x) cycles and the response y lags, the
trajectory (x_t, y_t) encloses a loop whose signed area (shoelace formula)

    A = ½ Σ_i (x_i y_{i+1} − x_{i+1} y_i)     (polygon closed back to its first point)

is positive for a counter-clockwise loop. For x = cos θ, y = cos(θ − φ) it is π sin φ: the
area measures the phase lag of a periodic response.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import interpolate as _interp
from scipy import stats as _stats

from convergence import _trajectory

IDENTIFIED = "identified"
NOT_IDENTIFIABLE = "not_identifiable"


class LagEstimate(NamedTuple):
  """Result of :func:`estimate_lag`.

  Attributes:
    status: ``"identified"`` or ``"not_identifiable"``.
    lag: the delay d̂ in steps (None when not identifiable).
    lower, upper: the confidence interval in steps (None when not identifiable).
    coverage: nominal coverage of the interval.
    reason: why the lag is not identifiable ("" when identified).
    lags: (G,) the grid of candidate delays.
    profile: (G,) the likelihood-ratio statistic n_eff·log(RSS(d)/RSS(d̂)).
    n_eff: effective sample size used.
    best: the grid minimiser even when not identifiable (for plots only, not an estimate).
  """

  status: str
  lag: float | None
  lower: float | None
  upper: float | None
  coverage: float
  reason: str
  lags: np.ndarray
  profile: np.ndarray
  n_eff: float
  best: float


def _as_runs(x, name):
  if isinstance(x, np.ndarray) and x.ndim == 1:
    return [np.asarray(x, np.float64)]
  if isinstance(x, (list, tuple)) and x and np.ndim(x[0]) == 1:
    return [np.asarray(r, np.float64) for r in x]
  arr = np.asarray(x, np.float64)
  if arr.ndim == 1:
    return [arr]
  if arr.ndim == 2:
    return list(arr)
  raise ValueError(f"`{name}` must be a 1-D series or a sequence of them, got shape "
                   f"{np.shape(x)}")


def _spline_basis(x, knots_inner, lo, hi, degree=3):
  t = np.concatenate([[lo] * (degree + 1), knots_inner, [hi] * (degree + 1)])
  xc = np.clip(x, lo, hi)
  return _interp.BSpline.design_matrix(xc, t, degree).toarray()


def estimate_lag(
    loss,
    metric,
    *,
    max_lag: int,
    lag_step: int = 1,
    coverage: float = 0.95,
    num_knots: int = 8,
    shared_link: bool = True,
    smooth: bool = True,
    max_rel_width: float = 0.2,
) -> LagEstimate:
  r"""Delay between loss and a downstream metric with a confidence interval, or "not identifiable".

  See the module docstring for the model. ``loss`` and ``metric`` are 1-D series on the same
  step grid (one run), or equal-length lists of such series (several runs, pooled: one delay,
  and one link when ``shared_link``). A positive lag means the metric follows the loss.

  Non-finite samples: a non-finite loss gets weight 0 in the smoother (and its smoothed
  value is still defined); samples t whose metric or smoothed lagged loss is non-finite are
  left out of every fit (for all d alike).

  Args:
    loss, metric: the series (see above).
    max_lag: the largest delay considered (steps of the series' grid).
    lag_step: spacing of the delay grid.
    coverage: coverage of the profile-likelihood interval.
    num_knots: interior knots of the B-spline link.
    shared_link: one link for all runs (pooling identifies the lag from runs of different
      shapes) or one per run.
    smooth: regress on the noise-smoothed loss (recommended) or on the raw loss.
    max_rel_width: the largest interval width, relative to ``max_lag``, still called
      identified.

  Returns:
    A :class:`LagEstimate`.

  References: REFERENCES.md §7; Venzon & Moolgavkar (1988) for profile-likelihood
  intervals.
  """
  losses, metrics = _as_runs(loss, "loss"), _as_runs(metric, "metric")
  if len(losses) != len(metrics):
    raise ValueError(f"got {len(losses)} loss runs and {len(metrics)} metric runs")
  for i, (l, m) in enumerate(zip(losses, metrics)):
    if l.shape != m.shape:
      raise ValueError(f"run {i}: loss and metric lengths differ ({l.size} vs {m.size})")
  if not isinstance(max_lag, (int, np.integer)) or max_lag < 1:
    raise ValueError(f"`max_lag` must be an int >= 1, got {max_lag!r}")
  if not isinstance(lag_step, (int, np.integer)) or lag_step < 1:
    raise ValueError(f"`lag_step` must be an int >= 1, got {lag_step!r}")
  if not 0 < coverage < 1:
    raise ValueError(f"`coverage` must be in (0, 1), got {coverage!r}")
  if not isinstance(num_knots, int) or num_knots < 1:
    raise ValueError(f"`num_knots` must be an int >= 1, got {num_knots!r}")
  for i, l in enumerate(losses):
    if l.size < max_lag + 4 * (num_knots + 4):
      raise ValueError(f"run {i}: {l.size} samples is too short for max_lag={max_lag} "
                       f"and {num_knots} knots")

  regs = [_trajectory.local_derivatives(l).value if smooth else l for l in losses]
  pooled = np.concatenate([r[np.isfinite(r)] for r in regs])
  lo, hi = float(pooled.min()), float(pooled.max())
  lags = np.arange(0, max_lag + 1, lag_step)

  def knots(vals):
    return np.quantile(vals, np.linspace(0, 1, num_knots + 2)[1:-1])

  run_knots = [knots(pooled)] * len(regs) if shared_link else [
      knots(r[np.isfinite(r)]) for r in regs]
  run_lims = [(lo, hi)] * len(regs) if shared_link else [
      (float(np.nanmin(r)), float(np.nanmax(r))) for r in regs]
  # Samples used: t ≥ max_lag with a finite metric and finite lagged regressor at every d.
  keep = []
  for r, m in zip(regs, metrics):
    n = m.size
    ok = np.isfinite(m[max_lag:])
    for d in lags:
      ok &= np.isfinite(r[max_lag - d:n - d])
    keep.append(ok)
  n_obs = int(sum(k.sum() for k in keep))
  if n_obs < 4 * (num_knots + 4):
    raise ValueError(f"only {n_obs} usable samples after removing non-finite values")

  def fit(d):
    blocks, ys = [], []
    for ri, (r, m, ok) in enumerate(zip(regs, metrics, keep)):
      n = m.size
      x = r[max_lag - d:n - d][ok]
      blocks.append(_spline_basis(x, run_knots[ri], *run_lims[ri]))
      ys.append(m[max_lag:][ok])
    if shared_link:
      design = np.concatenate(blocks)
    else:
      k = blocks[0].shape[1]
      design = np.zeros((sum(b.shape[0] for b in blocks), k * len(blocks)))
      row = 0
      for ri, b in enumerate(blocks):
        design[row:row + b.shape[0], ri * k:(ri + 1) * k] = b
        row += b.shape[0]
    y = np.concatenate(ys)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    res = y - design @ coef
    return float(res @ res), res

  # Coarse grid first; refined to ``lag_step`` inside the coarse confidence set.
  coarse = lags[::max(1, lags.size // 100)]
  if coarse[-1] != lags[-1]:
    coarse = np.append(coarse, lags[-1])
  profile = {int(d): fit(int(d)) for d in coarse}
  crit = float(_stats.chi2.ppf(coverage, 1))

  def stats_now():
    ds = np.asarray(sorted(profile))
    rs = np.asarray([profile[int(d)][0] for d in ds])
    bi = int(np.argmin(rs))
    res = profile[int(ds[bi])][1]
    rho = float(np.clip(np.corrcoef(res[:-1], res[1:])[0, 1], 0.0, 0.99)) if res.size > 3 \
        else 0.0
    ne = n_obs * (1 - rho) / (1 + rho)
    return ds, rs, bi, ne, ne * np.log(np.maximum(rs, 1e-300) / max(rs[bi], 1e-300))

  ds, rs, bi, n_eff, stat = stats_now()
  inside = ds[stat <= crit]
  if inside.max() - inside.min() <= max_rel_width * max_lag and coarse.size < lags.size:
    gap = int(coarse[1] - coarse[0])
    for d in lags[(lags >= inside.min() - gap) & (lags <= inside.max() + gap)]:
      if int(d) not in profile:
        profile[int(d)] = fit(int(d))
    ds, rs, bi, n_eff, stat = stats_now()
  lags = ds
  best_i = bi
  inside = lags[stat <= crit]
  lower, upper = float(inside.min()), float(inside.max())
  width = upper - lower
  reason = ""
  if upper >= lags[-1] and lags[-1] > 0:
    reason = ("the confidence set reaches the largest delay considered "
              f"({int(lags[-1])}): delay and link are confounded (flat profile)")
  elif width > max_rel_width * max_lag:
    reason = (f"the confidence set spans [{lower:g}, {upper:g}], wider than "
              f"{max_rel_width:g}·max_lag: the loss curve is too smooth to separate delay "
              "from threshold")
  best = float(lags[best_i])
  if reason:
    return LagEstimate(NOT_IDENTIFIABLE, None, None, None, coverage, reason, lags, stat,
                       float(n_eff), best)
  return LagEstimate(IDENTIFIED, best, lower, upper, coverage, "", lags, stat, float(n_eff),
                     best)


class HysteresisLoops(NamedTuple):
  """Result of :func:`hysteresis_area`.

  Attributes:
    area: (C,) signed area of each cycle (counter-clockwise positive), in units of x·y.
    normalized: (C,) area / (range(x)·range(y)) over each cycle, a dimensionless index
      (π/4 for a circle traced once, 0 without hysteresis).
    starts: (C,) the index where each cycle starts.
  """

  area: np.ndarray
  normalized: np.ndarray
  starts: np.ndarray


def hysteresis_area(x, y, *, period: int | None = None) -> HysteresisLoops:
  r"""Signed area of the loop(s) traced by (x_t, y_t), e.g. learning rate vs. a metric.

  :math:`A = \tfrac12\sum_i (x_i y_{i+1} - x_{i+1} y_i)` over each cycle, the polygon closed back
  to its first point (module docstring). With ``period`` the series is cut into consecutive
  cycles of that many samples (a trailing partial cycle is dropped); without it the whole
  series is one loop. Non-finite samples are dropped from their cycle (the polygon joins
  its neighbours), and a cycle with fewer than 3 finite points gets area NaN — flagged by the
  NaN, never silent.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"`x` and `y` must be 1-D of one length, got {x.shape} and {y.shape}")
  if period is None:
    period = x.size
  if not isinstance(period, (int, np.integer)) or period < 3:
    raise ValueError(f"`period` must be an int >= 3, got {period!r}")
  num = x.size // period
  if num == 0:
    raise ValueError(f"the series ({x.size} samples) is shorter than one period ({period})")
  areas, norms, starts = [], [], []
  for c in range(num):
    sl = slice(c * period, (c + 1) * period)
    xs, ys = x[sl], y[sl]
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if xs.size < 3:
      areas.append(math.nan)
      norms.append(math.nan)
    else:
      a = 0.5 * float(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys))
      span = (xs.max() - xs.min()) * (ys.max() - ys.min())
      areas.append(a)
      norms.append(a / span if span > 0 else 0.0)
    starts.append(c * period)
  return HysteresisLoops(np.asarray(areas), np.asarray(norms), np.asarray(starts))
