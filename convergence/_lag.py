"""Phase lag between a loss series and a downstream metric, and hysteresis-loop areas.

The "performance lag phase": the delay between an improvement of the loss and the matching
improvement of a downstream metric. From one smooth, monotone loss curve the lag is not
identifiable. If L is monotone then L(t − d) = h_d(L(t)) for a monotone
h_d, so M(t) = g(L(t − d)) = (g∘h_d)(L(t)) fits *every* delay d with another link: delay and
threshold are confounded. Only features of L that a monotone re-mapping cannot produce
(transient bumps, spikes, LR-induced kinks) or several runs sharing one link pin d down.

Lagged-link model. For each candidate delay d on a grid,

    M_r(t) = g_r(L̃_r(t − d)) + ε_t,      t ∈ [d_max, n_r),

with L̃ the noise-smoothed loss (:func:`convergence.local_derivatives`, so that batch noise in
the loss, to which the metric does not respond, does not enter the regressor), g a cubic
B-spline (half its knots at quantiles of L̃, half evenly over its range; flexible enough to
absorb any threshold / sigmoid shape), shared by all runs (``shared_link=True``) or one per
run. Every delay is fitted on the same samples t ≥ d_max, so the residual sums of squares
RSS(d) are comparable. Three checks decide whether a lag is reported.

1. No-relation test. Under pure noise the profile RSS(d) still has a sharp, random minimum
   (without this test, white noise was "identified" in 7 of 20 seeds), so the first question
   is whether the lagged loss explains the metric at all. The statistic is the best-delay fit,

       T = max_d R²(d),      R²(d) = 1 − RSS(d) / RSS₀      (RSS₀: a constant mean),

   the maximum over the (coarse) delay grid. Its null distribution comes from circular shifts
   of the metric relative to the loss: shifting the metric by s_j ≈ j·n/(B + 1), j = 1..B,
   keeps both series' autocorrelation (AR(1) noise, trends in the loss) and breaks only their
   alignment, and each shifted series is maximised over the same grid, so the search over
   delays is paid for. p = (1 + #{j : T_j ≥ T}) / (1 + B) (Besag & Diggle 1977; Harrison,
   Amarasingham & Kass 2013). Not identifiable when p > ``level``.
2. Interval. The profile likelihood ratio Λ(d) = n·log(RSS(d)/RSS(d̂)) is χ²₁ only for
   independent errors and an exact regressor; neither holds (autocorrelated metric noise,
   smoothing error in L̃, a profile roughened by it): the χ²₁ interval was [295, 298] for a
   true 300, 3 steps wide for an estimator with a standard deviation of 1.3 steps. Its
   critical value is taken from a bootstrap instead: B* replicates
   M* = ĝ(L̃(t − d̂)) + e* − ĝ'(L̃(t − d̂))·δ*(t − d̂), with e* the residuals phase-randomised
   (their periodogram kept, the power the fit absorbed at each frequency restored; Theiler
   et al. 1992) and δ* simulated smoothing error of the loss (its noise level, passed through
   the local-polynomial windows the smoother chose). Then q̂ = the ``coverage`` quantile of
   Λ*(d̂) = n·log(RSS*(d̂)/min_d RSS*(d)), no smaller than χ²₁(coverage), and

       { d : Λ(d) ≤ q̂ } = { d : n_eff·log(RSS(d)/RSS(d̂)) ≤ χ²₁(coverage) },  n_eff = n·χ²₁/q̂,

   its ends interpolated between grid points (linearly in √Λ).
3. Width. The lag is reported only when that set is narrow (width ≤ ``max_rel_width`` · d_max)
   and does not reach the end of the grid. A flat profile (smooth monotone loss, one run) is
   that case: the metric does follow the loss (the test rejects), the delay is confounded.

Measured on synthetic ground truth (tests/convergence/test_lag.py, ``python
tests/convergence/test_lag.py 100``; 1,600 steps, a loss bump, d_max = 500): an independent
white or AR(1) (φ = 0.9) metric is identified in 0.75–2 % of 400 seeds (the test alone rejects
in 5.25–6.5 %, also at 2,400 steps); planted lags 0, 120 and 300 are identified in all of 100
seeds, within 10 % (10 steps for 0), and the 95 % intervals cover the truth in 93–96 % of them,
median widths 4.4, 8.3 and 11.9 steps. Strongly autocorrelated metric noise *and* a real lag
is harder: with AR(1) (φ = 0.9) noise added, coverage was 79–89 % in 30 seeds.

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

from convergence import _trajectory


IDENTIFIED = "identified"
NOT_IDENTIFIABLE = "not_identifiable"


class LagEstimate(NamedTuple):
  """Result of :func:`estimate_lag`.

  Attributes:
    status: ``"identified"`` or ``"not_identifiable"``.
    lag: the delay d̂ in steps (None when not identifiable).
    lower, upper: the confidence interval in steps (None when not identifiable); its ends
      are interpolated between grid points.
    coverage: nominal coverage of the interval.
    reason: why the lag is not identifiable ("" when identified).
    lags: (G,) the delays evaluated (a coarse grid, refined to ``lag_step`` near d̂).
    profile: (G,) the calibrated statistic n_eff·log(RSS(d)/RSS(d̂)); the interval is where
      it is ≤ χ²₁(coverage).
    n_eff: n·χ²₁(coverage)/q̂, q̂ the bootstrap critical value of n·log(RSS(d)/RSS(d̂)) (n, the
      number of samples fitted, when the bootstrap was not needed).
    best: the grid minimiser even when not identifiable (for plots only, not an estimate).
    p_value: p-value of the no-relation test (does the lagged loss explain the metric at all).
    r2: R² of the lagged link at ``best`` against a constant mean.
    null_method: the no-relation test, in words.
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
  p_value: float
  r2: float
  null_method: str


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
  return _trajectory._scipy("interpolate").BSpline.design_matrix(xc, t, degree).toarray()


def _gram_whitener(g):
  """T with XT orthonormal for the Gram matrix G = XᵀX, so that G⁺ = TTᵀ.

  Columns are scaled to unit norm first (scaled B-spline columns are well conditioned); a
  column without support in the data (zero diagonal) is left out.
  """
  diag = np.diag(g)
  scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
  w, v = np.linalg.eigh(g * scale[:, None] * scale[None, :])
  keep = w > max(float(w[-1]), 1e-300) * 1e-12
  return scale[:, None] * v[:, keep] / np.sqrt(w[keep])


def _gram_pinv(g):
  t = _gram_whitener(g)
  return t @ t.T


def _surrogates(e, leverage, num, rng):
  r"""``num`` phase-randomised copies of the residual series e, columns of an (n, num) array.

  :math:`e^*_t = \mathcal F^{-1}[\hat e(\omega)\,(1 - p(\omega))^{-1/2} e^{i\phi_\omega}]`
  with independent uniform phases: the copies share the residual's periodogram (its
  autocovariance, circularly), the power the fit absorbed at each frequency restored. The
  residual is (I − P)ε; for a spectrum flat over the width of P's frequency response,
  E|ê(ω)|² ≈ f(ω)(1 − p(ω)) with p(ω) = Σ_j |q̂_j(ω)|² (unitary DFT of an orthonormal basis
  of the design, clipped at 0.9). Theiler et al. (1992); Braun & Kulperger (1997).
  """
  n = e.size
  spec = np.fft.rfft(e) / np.sqrt(1.0 - np.minimum(leverage, 0.9))
  phase = np.exp(2j * np.pi * rng.random((spec.size, num)))
  phase[0] = 1.0
  if n % 2 == 0:
    phase[-1] = np.where(rng.random(num) < 0.5, -1.0, 1.0)
  return np.fft.irfft(spec[:, None] * phase, n=n, axis=0)


def _sg_level(h, order=4):
  """Weights of the level of a degree-``order`` local polynomial on [−h, h] (Savitzky–Golay)."""
  return _trajectory._scipy("signal").savgol_coeffs(2 * h + 1, min(order, 2 * h))


def _crossings(lags, stat, crit):
  """Hull of {d : stat(d) ≤ crit}, its ends placed between grid points where √stat = √crit.

  √stat is close to linear in d near a minimum (stat ≈ (d − d̂)²/sd²), so the crossing is
  interpolated linearly in √stat; at an end of the grid the end itself is returned.
  """
  idx = np.flatnonzero(stat <= crit)
  i, j = int(idx[0]), int(idx[-1])
  root = np.sqrt(np.maximum(stat, 0.0))
  rc = math.sqrt(crit)

  def between(a, b):     # a outside, b inside
    frac = (root[a] - rc) / max(root[a] - root[b], 1e-300)
    return float(lags[a] + (lags[b] - lags[a]) * frac)

  lower = float(lags[i]) if i == 0 else between(i - 1, i)
  upper = float(lags[j]) if j == lags.size - 1 else between(j + 1, j)
  return lower, upper


def _check_args(losses, metrics, *, max_lag, lag_step, coverage, num_knots, level, num_shifts,
                num_bootstrap, seed) -> None:
  """The checks of :func:`estimate_lag`'s arguments, each naming the argument."""
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
  if not 0 < level < 1:
    raise ValueError(f"`level` must be in (0, 1), got {level!r}")
  if (not isinstance(num_shifts, (int, np.integer)) or isinstance(num_shifts, bool)
      or num_shifts + 1 < 1 / level):
    raise ValueError(f"`num_shifts` must be an int >= 1/level - 1 = {math.ceil(1 / level - 1)} "
                     f"(the smallest p-value is 1/(num_shifts + 1)), got {num_shifts!r}")
  if (not isinstance(num_bootstrap, (int, np.integer)) or isinstance(num_bootstrap, bool)
      or num_bootstrap < 19):
    raise ValueError(f"`num_bootstrap` must be an int >= 19, got {num_bootstrap!r}")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise ValueError(f"`seed` must be an int, got {seed!r}")
  for i, l in enumerate(losses):
    if l.size < max_lag + 4 * (num_knots + 4):
      raise ValueError(f"run {i}: {l.size} samples is too short for max_lag={max_lag} "
                       f"and {num_knots} knots")


def _bootstrap_metric(y, fit, white_basis, u, coef, knots, lims, reg, noise, window,
                      num_bootstrap, rng) -> np.ndarray:
  """(n, B) bootstrap metrics of one run at the estimated delay: the fit, plus metric noise
  (phase-randomised residuals with the fit's leverage per frequency restored), minus the
  first-order effect of the loss-smoothing error at the lagged samples ``u``."""
  # Metric noise: phase-randomised residuals, the fit's leverage per frequency restored.
  basis_fft = np.fft.rfft(white_basis, axis=0)
  leverage = np.sum(np.abs(basis_fft) ** 2, axis=1) / y.size
  ystar = fit[:, None] + _surrogates(y - fit, leverage, num_bootstrap, rng)
  # Loss noise: δ = L̃ − L is the smoothing of the loss noise with the window the smoother
  # chose; to first order the metric fit sees −ĝ'(L̃(t − d̂))·δ(t − d̂).
  tk = np.concatenate([[lims[0]] * 4, knots, [lims[1]] * 4])
  spline = _trajectory._scipy("interpolate").BSpline(tk, coef, 3)
  slope = np.nan_to_num(spline.derivative()(np.clip(reg[u], *lims)))
  if noise > 0:
    eps = np.fft.rfft(rng.normal(0.0, noise, size=(reg.size, num_bootstrap)),
                      n=2 * reg.size, axis=0)
    hw = window[u]
    delta = np.zeros((u.size, num_bootstrap))
    for h in np.unique(hw[np.isfinite(hw)]).astype(int):
      k = _sg_level(h) if h > 0 else np.ones(1)
      kf = np.fft.rfft(k, n=2 * reg.size)
      conv = np.fft.irfft(eps * kf[:, None], n=2 * reg.size, axis=0)
      sel = hw == h
      delta[sel] = conv[u[sel] + h]          # 'same' alignment of the symmetric kernel
    ystar -= slope[:, None] * delta
  return ystar


class _LaggedLink:
  """The lagged-link regression shared by every delay d (module docstring).

  Holds each run's regressor (the smoothed or raw loss) with its spline basis evaluated once
  (the design at delay d is the basis rows t − d), the rows t fitted (t ≥ max_lag with a
  finite metric and a finite lagged regressor at every d) and the centred metrics y.
  """

  def __init__(self, losses, metrics, lags, *, max_lag, num_knots, num_shifts, shared_link,
               smooth):
    self.shared_link = shared_link
    if smooth:
      fps = [_trajectory.local_derivatives(l) for l in losses]
      self.regs = [f.value for f in fps]
      self.noises = [f.noise for f in fps]
      self.windows = [f.half_width[0] for f in fps]
    else:
      self.regs = losses
      self.noises = [_trajectory.robust_noise_level(l) for l in losses]
      self.windows = [np.zeros(l.size) for l in losses]    # the raw loss: δ = the noise itself
    regs = self.regs
    pooled = np.concatenate([r[np.isfinite(r)] for r in regs])
    lo, hi = float(pooled.min()), float(pooled.max())
    self.knots = [_link_knots(pooled, num_knots)] * len(regs) if shared_link else [
        _link_knots(r[np.isfinite(r)], num_knots) for r in regs]
    self.lims = [(lo, hi)] * len(regs) if shared_link else [
        (float(np.nanmin(r)), float(np.nanmax(r))) for r in regs]
    keep = []
    for r, m in zip(regs, metrics):
      n = m.size
      ok = np.isfinite(m[max_lag:])
      for d in lags:
        ok &= np.isfinite(r[max_lag - d:n - d])
      keep.append(ok)
    self.n_obs = int(sum(k.sum() for k in keep))
    if self.n_obs < 4 * (num_knots + 4):
      raise ValueError(f"only {self.n_obs} usable samples after removing non-finite values")
    for i, ok in enumerate(keep):
      if ok.sum() <= num_shifts:
        raise ValueError(f"run {i} has {int(ok.sum())} usable samples, too few for "
                         f"`num_shifts`={num_shifts} distinct circular shifts")
    self.basis = [_spline_basis(np.where(np.isfinite(r), r, lim[0]), kn, *lim)
                  for r, kn, lim in zip(regs, self.knots, self.lims)]
    self.rows = [max_lag + np.flatnonzero(ok) for ok in keep]
    ys = [m[rw] for m, rw in zip(metrics, self.rows)]
    # The constant lies in the spline span (partition of unity): centring changes no RSS and
    # makes Σy² the RSS of the no-relation model (a constant mean, per run without sharing).
    if shared_link:
      mean = float(np.mean(np.concatenate(ys)))
      ys = [y - mean for y in ys]
    else:
      ys = [y - y.mean() for y in ys]
    self.ys = ys
    self.rss0 = float(sum(y @ y for y in ys))

  def designs(self, d):
    return [b[rw - d] for b, rw in zip(self.basis, self.rows)]

  def groups(self, xs, cols):
    """(G, C) per fitted link: C = Xᵀ·cols, G = XᵀX (one link over all runs, or one per run)."""
    # einsum, not BLAS: for these thin products a multi-threaded BLAS on a busy machine is
    # ~50x slower than one plain loop.
    pairs = [(x.T @ x, np.einsum("nk,nb->kb", x, c) if c.ndim == 2 else x.T @ c)
             for x, c in zip(xs, cols)]
    if self.shared_link:
      return [(sum(g for g, _ in pairs), sum(c for _, c in pairs))]
    return pairs

  def explained(self, d, cols):
    """‖P_d y‖² per column of ``cols`` (per-run arrays): RSS(d) = Σy² − ‖P_d y‖²."""
    total = 0.0
    for g, c in self.groups(self.designs(d), cols):
      total = total + np.sum(c * (_gram_pinv(g) @ c), axis=0)
    return total


def _link_knots(vals, num_knots):
  """Interior knots of the link: half at quantiles of the loss (where it spends its time), half
  evenly over its range (where it moves fast, e.g. the early descent, which quantiles leave
  almost without knots)."""
  num_q = (num_knots + 1) // 2
  at_q = np.quantile(vals, np.linspace(0, 1, num_q + 2)[1:-1])
  even = np.linspace(vals.min(), vals.max(), num_knots - num_q + 2)[1:-1]
  return np.sort(np.concatenate([at_q, even]))


def _shift_test(link: _LaggedLink, lags, num_shifts):
  """Check 1 on the coarse delay grid: returns (coarse grid, {d: RSS(d)}, p-value).

  The observed metric (shift 0) and its circular shifts s_r(j) ≈ j·n_r/(B+1) are fitted at
  once: Xᵀ(y rotated by s) for every s is the circular cross-correlation of X with y.
  """
  shift_idx = [np.round(np.arange(num_shifts + 1) * y.size / (num_shifts + 1)).astype(int)
               for y in link.ys]
  y_fft = [np.fft.rfft(y) for y in link.ys]
  coarse = lags[::max(1, lags.size // 100)]
  if coarse[-1] != lags[-1]:
    coarse = np.append(coarse, lags[-1])
  profile = {}
  best_rss = np.full(num_shifts + 1, np.inf)
  for d in coarse:
    xs = link.designs(int(d))
    cross = [np.fft.irfft(np.conj(np.fft.rfft(x, axis=0)) * yf[:, None], n=x.shape[0],
                          axis=0)[si].T for x, yf, si in zip(xs, y_fft, shift_idx)]
    pairs = [(x.T @ x, c) for x, c in zip(xs, cross)]
    if link.shared_link:
      pairs = [(sum(g for g, _ in pairs), sum(c for _, c in pairs))]
    rss = link.rss0 - sum(np.sum(c * (_gram_pinv(g) @ c), axis=0) for g, c in pairs)
    best_rss = np.minimum(best_rss, rss)
    profile[int(d)] = float(rss[0])
  # max R² ⇔ min RSS: Σy² is the same for every shift.
  p_value = float((1 + np.sum(best_rss[1:] <= best_rss[0])) / (num_shifts + 1))
  return coarse, profile, p_value


class _Profile:
  """RSS(d) on the delay grid, evaluated lazily: coarse first, refined near the minimum."""

  def __init__(self, link, lags, coarse, rss, *, crit, max_rel_width, max_lag):
    self.link, self.lags, self.coarse, self.rss = link, lags, coarse, rss
    self.crit, self.max_width = crit, max_rel_width * max_lag
    self.gap = int(coarse[1] - coarse[0]) if coarse.size > 1 else 1
    ds, _, bi = self.current()
    self.refine(ds[bi] - 2 * self.gap, ds[bi] + 2 * self.gap)

  def refine(self, lo_d, hi_d):
    lags = self.lags
    for d in lags[(lags >= lo_d) & (lags <= hi_d)]:
      if int(d) not in self.rss:
        self.rss[int(d)] = float(self.link.rss0 - self.link.explained(int(d), self.link.ys))

  def current(self):
    ds = np.asarray(sorted(self.rss))
    rs = np.asarray([self.rss[int(d)] for d in ds])
    return ds, rs, int(np.argmin(rs))

  def confidence(self, ne):
    """Profile statistic n_eff·log(RSS/RSS_min), refined inside a narrow set, and its ends."""
    ds, rs, bi = self.current()
    stat = ne * np.log(np.maximum(rs, 1e-300) / max(rs[bi], 1e-300))
    inside = ds[stat <= self.crit]
    if inside.max() - inside.min() <= self.max_width and self.coarse.size < self.lags.size:
      self.refine(inside.min() - self.gap, inside.max() + self.gap)
      ds, rs, bi = self.current()
      stat = ne * np.log(np.maximum(rs, 1e-300) / max(rs[bi], 1e-300))
    return (ds, rs, bi, stat) + _crossings(ds, stat, self.crit)

  def too_wide(self, ds, lower, upper):
    return (upper >= ds[-1] and ds[-1] > 0) or upper - lower > self.max_width


def _bootstrap_n_eff(link: _LaggedLink, ds, bi, *, crit, coverage, num_bootstrap, seed):
  """Check 2: n_eff = n·χ²₁/q̂, q̂ the ``coverage`` quantile (≥ χ²₁) of the bootstrap statistic
  n·log(RSS*(d̂)/min_d RSS*(d)) over the delays ``ds`` evaluated so far."""
  d_hat = int(ds[bi])
  xs = link.designs(d_hat)
  pairs = link.groups(xs, link.ys)
  whiten = [_gram_whitener(g) for g, _ in pairs]
  coefs = [t @ (t.T @ c) for t, (_, c) in zip(whiten, pairs)]
  if link.shared_link:
    coefs, whiten = coefs * len(xs), whiten * len(xs)
  fit = [x @ c for x, c in zip(xs, coefs)]
  rng = np.random.default_rng(seed)
  boot = []
  for ri, (y, f, rw) in enumerate(zip(link.ys, fit, link.rows)):
    ystar = _bootstrap_metric(
        y, f, xs[ri] @ whiten[ri], rw - d_hat, coefs[ri], link.knots[ri], link.lims[ri],
        link.regs[ri], link.noises[ri], link.windows[ri], num_bootstrap, rng)
    boot.append(np.ascontiguousarray(ystar))
  boot_ss = sum(np.sum(b * b, axis=0) for b in boot)
  table = np.stack([boot_ss - link.explained(int(d), boot) for d in ds])        # (D, B*)
  n_obs = link.n_obs
  lr_star = n_obs * np.log(np.maximum(table[bi], 1e-300) / np.maximum(table.min(0), 1e-300))
  q_hat = max(crit, float(np.quantile(lr_star, coverage)))
  return n_obs * crit / q_hat


def _not_identified_reason(p_value, level, r2, lower, upper, ds, max_rel_width, max_lag):
  """Why the lag is not reported (check 1 or 3), "" when it is."""
  if p_value > level:
    return (f"the lagged loss does not explain the metric: best-delay R² = {r2:.3g} is "
            f"matched by circularly shifted metrics (p = {p_value:.3g} > level {level:g})")
  if upper >= ds[-1] and ds[-1] > 0:
    return ("the confidence set reaches the largest delay considered "
            f"({int(ds[-1])}): delay and link are confounded (flat profile)")
  if upper - lower > max_rel_width * max_lag:
    return (f"the confidence set spans [{lower:.4g}, {upper:.4g}], wider than "
            f"{max_rel_width:g}·max_lag: the loss curve is too smooth to separate delay "
            "from threshold")
  return ""


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
    level: float = 0.05,
    num_shifts: int = 199,
    num_bootstrap: int = 199,
    seed: int = 0,
) -> LagEstimate:
  r"""Delay between loss and a downstream metric with a confidence interval, or "not identifiable".

  See the module docstring for the model and the three checks. ``loss`` and ``metric`` are 1-D
  series on the same step grid (one run), or equal-length lists of such series (several runs,
  pooled: one delay, and one link when ``shared_link``). A positive lag means the metric
  follows the loss.

  1. No-relation test: :math:`T = \max_d R^2(d)` over the coarse delay grid, against the same
     maximum after each of ``num_shifts`` circular shifts of the metric (evenly spaced over
     each run): :math:`p = (1 + \#\{s : T_s \ge T\}) / (1 + \text{num\_shifts})`.
  2. Interval: :math:`\{d : n\log(\mathrm{RSS}(d)/\mathrm{RSS}(\hat d)) \le \hat q\}`, with
     :math:`\hat q` the ``coverage`` quantile of the same statistic at :math:`\hat d` over
     ``num_bootstrap`` replicates (phase-randomised residuals plus simulated loss-smoothing
     error), no smaller than :math:`\chi^2_1(\text{coverage})`; ``n_eff`` =
     :math:`n\,\chi^2_1/\hat q`. Only computed when checks 1 and 3 pass at :math:`\hat q =
     \chi^2_1` (the bootstrap can only widen the interval).
  3. Identified only when p ≤ ``level``, the interval stays below ``max_lag`` and its width
     is at most ``max_rel_width``·``max_lag``.

  Non-finite samples: a non-finite loss gets weight 0 in the smoother (and its smoothed
  value is still defined); samples t whose metric or smoothed lagged loss is non-finite are
  left out of every fit (for all d alike).

  Args:
    loss, metric: the series (see above).
    max_lag: the largest delay considered (steps of the series' grid).
    lag_step: spacing of the delay grid.
    coverage: coverage of the interval.
    num_knots: interior knots of the B-spline link.
    shared_link: one link for all runs (pooling identifies the lag from runs of different
      shapes) or one per run.
    smooth: regress on the noise-smoothed loss (recommended) or on the raw loss.
    max_rel_width: the largest interval width, relative to ``max_lag``, still called
      identified.
    level: significance level of the no-relation test.
    num_shifts: circular shifts calibrating it; p-values are multiples of
      1/(num_shifts + 1), so at least 1/level − 1; every run needs more usable samples.
    num_bootstrap: bootstrap replicates calibrating the interval (≥ 19).
    seed: seed of the bootstrap (the result is deterministic given it).

  Returns:
    A :class:`LagEstimate`.

  References: Venzon & Moolgavkar (1988) for profile-likelihood
  intervals; Besag & Diggle (1977) and Harrison, Amarasingham & Kass (2013) for circular-shift
  (toroidal) tests; Theiler et al., Physica D 58 (1992) and Braun & Kulperger, Commun. Stat.
  26 (1997) for phase-randomised (Fourier) surrogates and bootstrap.
  """
  losses, metrics = _as_runs(loss, "loss"), _as_runs(metric, "metric")
  _check_args(losses, metrics, max_lag=max_lag, lag_step=lag_step, coverage=coverage,
              num_knots=num_knots, level=level, num_shifts=num_shifts,
              num_bootstrap=num_bootstrap, seed=seed)
  lags = np.arange(0, max_lag + 1, lag_step)
  link = _LaggedLink(losses, metrics, lags, max_lag=max_lag, num_knots=num_knots,
                     num_shifts=num_shifts, shared_link=shared_link, smooth=smooth)
  coarse, rss, p_value = _shift_test(link, lags, num_shifts)       # 1. no-relation test
  crit = float(_trajectory._scipy("stats").chi2.ppf(coverage, 1))
  method = (f"circular-shift test of max_d R²(d) (lagged spline link vs a constant mean), "
            f"{num_shifts} shifts, level {level:g}")
  profile = _Profile(link, lags, coarse, rss, crit=crit, max_rel_width=max_rel_width,
                     max_lag=max_lag)
  n_eff = float(link.n_obs)
  ds, rs, bi, stat, lower, upper = profile.confidence(n_eff)
  # The bootstrap only widens the i.i.d. interval: skip it when the answer is already "no".
  if p_value <= level and not profile.too_wide(ds, lower, upper):
    n_eff = _bootstrap_n_eff(link, ds, bi, crit=crit, coverage=coverage,   # 2. calibration
                             num_bootstrap=num_bootstrap, seed=seed)
    ds, rs, bi, stat, lower, upper = profile.confidence(n_eff)
  r2 = 1.0 - float(rs[bi]) / link.rss0 if link.rss0 > 0 else 0.0
  reason = _not_identified_reason(p_value, level, r2, lower, upper, ds,    # 3. width
                                  max_rel_width, max_lag)
  best = float(ds[bi])
  if reason:
    return LagEstimate(NOT_IDENTIFIABLE, None, None, None, coverage, reason, ds, stat,
                       float(n_eff), best, p_value, r2, method)
  return LagEstimate(IDENTIFIED, best, lower, upper, coverage, "", ds, stat, float(n_eff),
                     best, p_value, r2, method)


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
