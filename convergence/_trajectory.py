"""Trajectory fingerprints: noise-aware loss derivatives with error bands, jumps, cosine decay.

The first, second and third derivatives of the loss (rate, acceleration, and the
"third-order jump" marking a structural reconfiguration) and the long-run decay of the cosine
similarity between successive gradient/update directions. Raw finite differences are useless
on noisy curves, and a Savitzky–Golay filter needs windows chosen from the noise level, with
the error band reported. Everything here follows from that.

Local polynomial regression (Savitzky & Golay 1964; Fan & Gijbels 1996, ch. 3). Around
sample t, with offsets u_j = j/h for j = −h..h and 0/1 weights w (0 for a missing or non-finite
sample, or one outside the series), fit y_{t+j} ≈ Σ_k c_k P_k(u_j) (Legendre basis P_k,
degree p) by least squares:

    c = G⁻¹ Φᵀ W y,      G = Φᵀ W Φ,
    f^{(ν)}(t) ≈ Σ_k c_k P_k^{(ν)}(0) / h^ν,      Var = σ² aᵀ G⁻¹ a,  a_k = P_k^{(ν)}(0)/h^ν.

With all weights 1 this is exactly the Savitzky–Golay filter; near the ends and around
missing samples the window simply loses points (the fit becomes one-sided and its variance
grows, which the band shows). The noise level σ comes from a robust (MAD) estimate on third
differences, Δ³y having variance 20σ² for white noise while a smooth trend contributes
|f'''| ≪ σ.

Window choice: the intersection-of-confidence-intervals rule (Goldenshluger & Nemirovski
1997; Katkovnik 1999), point by point and per derivative: for half-widths h_1 < h_2 < …,
keep the largest h_k such that the intervals [est_i ± Γ se_i], i ≤ k, still intersect.
The variance falls and the bias grows with h; the rule stops where the bias starts to show
against the noise, so the window follows the noise level (and the local curvature).

Jumps: a "third-order jump" is a moment where the second derivative changes abruptly (a spike
of f'''); more generally a discontinuity of order k ∈ {0, 1, 2} (level, slope, curvature).
It is tested by fitting the polynomial separately on the left window [t−h, t−1] and the right
window [t, t+h−1], both evaluated at t − ½, and standardising the difference of the k-th
derivatives by its standard error (the two fits use disjoint noise, so the variances add).

Cosine similarity: c_t(k) = ⟨u_t, u_{t−k}⟩ / (‖u_t‖ ‖u_{t−k}‖) for lags k = 1..K, averaged
over a sliding window of W steps; its decay rate r is the least-squares slope of
−log m(k) against k over the lags where the window mean m(k) > 0 (m(k) ≈ m(1)·e^{−r(k−1)}).
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.polynomial import legendre as _leg


def _scipy(name: str):
  """``scipy.<name>``, imported on first use: importing scipy.signal, .stats and .interpolate
  up front cost ~1 s in every process that imports losslab (the CLI, each test child)."""
  return importlib.import_module(f"scipy.{name}")


_MAD = 1.482602218505602  # 1 / Φ⁻¹(3/4): MAD → standard deviation for Gaussian noise.
_D3_VAR = 20.0            # Var(Δ³ε) / σ² = 1 + 9 + 9 + 1.


# --------------------------------------------------------------------------- helpers


def _check_order(order: int, max_derivative: int = 3) -> None:
  if not isinstance(order, int) or order < max_derivative:
    raise ValueError(f"`order` must be an int >= {max_derivative} (the highest derivative), "
                     f"got {order!r}")


def _check_coverage(coverage: float) -> None:
  if not 0.0 < coverage < 1.0:
    raise ValueError(f"`coverage` must be in (0, 1), got {coverage!r}")


def _basis(u: np.ndarray, order: int) -> np.ndarray:
  """Legendre basis P_0..P_order at points u: shape (len(u), order + 1)."""
  return np.stack([_leg.legval(u, np.eye(order + 1)[k]) for k in range(order + 1)], axis=-1)


def _basis_derivatives(u0: float, order: int, max_derivative: int) -> np.ndarray:
  """A[ν, k] = P_k^{(ν)}(u0) for ν = 0..max_derivative."""
  out = np.zeros((max_derivative + 1, order + 1))
  for k in range(order + 1):
    c = np.eye(order + 1)[k]
    for nu in range(max_derivative + 1):
      out[nu, k] = _leg.legval(u0, _leg.legder(c, nu) if nu else c)
  return out


def robust_noise_level(y: np.ndarray | Sequence[float]) -> float:
  r"""Noise standard deviation of a series from its third differences, robust to outliers.

  :math:`\hat\sigma = 1.4826\,\mathrm{MAD}(\Delta^3 y)/\sqrt{20}`: for y = f + ε with white ε,
  :math:`\Delta^3 y = \Delta^3 f + \Delta^3\varepsilon` with Var(Δ³ε) = 20σ² and Δ³f ≈ f'''
  negligible for a smooth trend; the median ignores isolated spikes and jumps. Non-finite
  samples are skipped (a difference touching one is dropped). Returns NaN only if fewer than
  8 finite differences remain.
  """
  y = np.asarray(y, np.float64)
  d = np.diff(y, 3)
  d = d[np.isfinite(d)]
  if d.size < 8:
    return float("nan")
  return float(_MAD * np.median(np.abs(d - np.median(d))) / math.sqrt(_D3_VAR))


def _as_series(y, steps):
  y = np.asarray(y, np.float64)
  if y.ndim != 1:
    raise ValueError(f"`y` must be 1-D, got shape {y.shape}")
  if steps is None:
    return y, np.arange(y.size, dtype=np.float64), 1.0
  steps = np.asarray(steps, np.float64)
  if steps.shape != y.shape:
    raise ValueError(f"`steps` must have the shape of `y`, got {steps.shape} vs {y.shape}")
  d = np.diff(steps)
  if d.size and (np.any(d <= 0) or not np.allclose(d, d[0])):
    raise ValueError("`steps` must be increasing with a constant spacing; put the series on a "
                     "regular grid with NaN for the missing samples (see `load_metric`)")
  return y, steps, float(d[0]) if d.size else 1.0


def _local_poly(y: np.ndarray, valid: np.ndarray, h: int, order: int, max_derivative: int,
                u0: float = 0.0, side: str = "both"):
  """Weighted local polynomial fits at every sample (see module docstring).

  ``side``: "both" uses j = −h..h; "left" j = −h..−1 and "right" j = 0..h−1 (for jumps, both
  evaluated at u0 given in units of h). Returns (est (D+1, n), var_factor (D+1, n), ok (n,)),
  var_factor being aᵀG⁻¹a, to be multiplied by σ².
  """
  j = np.arange(-h, h + 1)
  if side == "both":
    mask_j = np.ones(j.size)
  elif side == "left":
    mask_j = (j < 0).astype(np.float64)
  else:
    mask_j = ((j >= 0) & (j < h)).astype(np.float64)
  phi = _basis(j / h, order) * mask_j[:, None]                     # (m, p+1)
  w = valid.astype(np.float64)
  # A constant reference improves conditioning; it only moves c_0.
  ref = float(np.mean(y[valid])) if valid.any() else 0.0
  wy = np.where(valid, y - ref, 0.0)
  p1 = order + 1
  n = y.size
  gram = np.empty((n, p1, p1))
  rhs = np.empty((n, p1))
  for a in range(p1):
    rhs[:, a] = _scipy("signal").correlate(wy, phi[:, a], mode="same")
    for b in range(a, p1):
      g = _scipy("signal").correlate(w, phi[:, a] * phi[:, b], mode="same")
      gram[:, a, b] = g
      gram[:, b, a] = g
  count = _scipy("signal").correlate(w, mask_j, mode="same")
  ok = count > order + 0.5
  gram[~ok] = np.eye(p1)
  ginv = np.linalg.inv(gram)
  coef = np.einsum("nab,nb->na", ginv, rhs)
  coef[:, 0] += np.where(ok, ref, 0.0) * 1.0  # P_0 ≡ 1
  amat = _basis_derivatives(u0, order, max_derivative) / (
      float(h) ** np.arange(max_derivative + 1))[:, None]          # (D+1, p+1)
  est = coef @ amat.T                                               # (n, D+1)
  var = np.einsum("da,nab,db->nd", amat, ginv, amat)
  est[~ok] = np.nan
  var[~ok] = np.nan
  return est.T, var.T, ok


class Fingerprint(NamedTuple):
  """Smoothed level and derivatives of a series with pointwise error bands.

  Attributes:
    steps: (n,) step of each sample.
    value, d1, d2, d3: (n,) smoothed level and first to third derivatives, per unit step.
    se: (4, n) standard errors of value, d1, d2, d3 (noise only, see ``local_derivatives``).
    lower, upper: (4, n) the band est ∓ z·se at ``coverage``.
    half_width: (4, n) the half-width (in samples) chosen for each estimate.
    noise: the noise standard deviation σ used.
    coverage: nominal two-sided coverage of the band.
    valid: (n,) whether the input sample was finite (non-finite ones get weight 0).
  """

  steps: np.ndarray
  value: np.ndarray
  d1: np.ndarray
  d2: np.ndarray
  d3: np.ndarray
  se: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  half_width: np.ndarray
  noise: float
  coverage: float
  valid: np.ndarray


def _candidate_widths(n: int, order: int, min_half_width: int | None, max_half_width: int | None,
                      ratio: float) -> list[int]:
  lo = max(order + 1, 3) if min_half_width is None else int(min_half_width)
  hi = max(lo, (n - 1) // 2) if max_half_width is None else int(max_half_width)
  out, h = [], float(lo)
  while round(h) <= hi:
    if not out or round(h) > out[-1]:
      out.append(int(round(h)))
    h *= ratio
  return out


def local_derivatives(
    y,
    steps=None,
    *,
    half_width: int | None = None,
    order: int = 4,
    noise: float | None = None,
    coverage: float = 0.95,
    ici_threshold: float = 3.0,
    min_half_width: int | None = None,
    max_half_width: int | None = None,
    ratio: float = 1.25,
    undersmooth: int = 5,
) -> Fingerprint:
  r"""Noise-aware smoothed level and first three derivatives of a series, with error bands.

  Local polynomial regression of degree ``order`` in a Legendre basis (the Savitzky–Golay
  filter where the window is full; module docstring). With ``half_width=None`` the window is
  chosen point by point and separately for each derivative by the ICI rule: among half-widths
  h_1 < h_2 < … (geometric with ``ratio``), the largest h_k for which the intervals
  :math:`[\hat f^{(\nu)}_{h_i} \pm \Gamma\,\mathrm{se}_i]` (Γ = ``ici_threshold``) for all i ≤ k
  still intersect. Large σ gives long windows, sharp features short ones.

  The band is :math:`\hat f^{(\nu)} \pm z\,\mathrm{se}` with
  :math:`z = \Phi^{-1}(\tfrac12 + \tfrac{\text{coverage}}{2})` and
  :math:`\mathrm{se}^2 = \sigma^2 a^\top G^{-1} a`. It accounts for the noise; the ICI rule keeps
  the smoothing bias below about Γ·se, so the realised coverage is somewhat under nominal
  where the curve bends sharply (tests measure it). It assumes noise independent between
  samples: autocorrelated noise makes the band too narrow.

  Non-finite samples get weight 0 (the step axis is kept); they are reported in ``valid``.
  Points whose window holds fewer than ``order + 1`` finite samples get NaN with se NaN.

  Args:
    y: (n,) series (e.g. the training loss).
    steps: optional (n,) increasing, evenly spaced steps; derivatives are per step.
    half_width: a fixed half-width (Savitzky–Golay window 2h+1) instead of the ICI rule.
    order: polynomial degree (≥ 3).
    noise: σ; by default :func:`robust_noise_level` of ``y``.
    coverage: two-sided coverage of the reported band.
    ici_threshold: Γ of the ICI rule.
    min_half_width, max_half_width, ratio: the candidate half-widths.

  Returns:
    A :class:`Fingerprint`.

  References: Savitzky & Golay, Anal. Chem. 36 (1964); Fan & Gijbels, Local Polynomial
  Modelling (1996); Katkovnik, IEEE TSP 47 (1999) (the ICI rule).
  """
  _check_order(order)
  _check_coverage(coverage)
  if not ici_threshold > 0:
    raise ValueError(f"`ici_threshold` must be > 0, got {ici_threshold!r}")
  if not ratio > 1:
    raise ValueError(f"`ratio` must be > 1, got {ratio!r}")
  y, steps_arr, dt = _as_series(y, steps)
  valid = np.isfinite(y)
  if valid.sum() < order + 2:
    raise ValueError(f"need at least order + 2 = {order + 2} finite samples, got {valid.sum()}")
  sigma = robust_noise_level(y) if noise is None else float(noise)
  if not (np.isfinite(sigma) and sigma >= 0):
    raise ValueError(f"`noise` must be a finite number >= 0, got {sigma!r}")
  n = y.size
  if half_width is not None:
    if not isinstance(half_width, (int, np.integer)) or half_width < 1:
      raise ValueError(f"`half_width` must be an int >= 1, got {half_width!r}")
    widths = [int(half_width)]
  else:
    widths = _candidate_widths(n, order, min_half_width, max_half_width, ratio)
  ests, ses = [], []
  for h in widths:
    e, v, _ = _local_poly(y, valid, h, order, 3)
    ests.append(e)
    ses.append(sigma * np.sqrt(v))
  ests, ses = np.stack(ests), np.stack(ses)                        # (K, 4, n)
  idx = np.zeros((4, n), np.int64)
  if len(widths) > 1:
    lo = np.maximum.accumulate(np.where(np.isfinite(ests), ests - ici_threshold * ses, -np.inf),
                               axis=0)
    hi = np.minimum.accumulate(np.where(np.isfinite(ests), ests + ici_threshold * ses, np.inf),
                               axis=0)
    ok = lo <= hi                                                  # (K, 4, n), monotone in K
    idx = np.maximum(ok.sum(axis=0) - 1 - undersmooth, 0)
  pick = lambda a: np.take_along_axis(a, idx[None], axis=0)[0]
  est, se = pick(ests), pick(ses)
  scale = dt ** np.arange(4)[:, None]
  est, se = est / scale, se / scale
  z = float(_scipy("stats").norm.ppf(0.5 + coverage / 2))
  return Fingerprint(steps=steps_arr, value=est[0], d1=est[1], d2=est[2], d3=est[3], se=se,
                     lower=est - z * se, upper=est + z * se,
                     half_width=np.asarray(widths)[idx], noise=sigma, coverage=coverage,
                     valid=valid)


class Jumps(NamedTuple):
  """Detected discontinuities of a series.

  Attributes:
    steps: (m,) the step of each jump (the first sample after it).
    orders: (m,) the order that broke: 0 level, 1 slope, 2 curvature (a spike of f''').
    scores: (m,) the standardised size |Δ|/se of that order's change.
    sizes: (m,) the signed change of that derivative across the jump.
    score: (3, n) the standardised change of each order at every sample.
    threshold: the score threshold used.
    half_width: the one-sided window length used.
  """

  steps: np.ndarray
  orders: np.ndarray
  scores: np.ndarray
  sizes: np.ndarray
  score: np.ndarray
  threshold: float
  half_width: int


def detect_jumps(
    y,
    steps=None,
    *,
    half_width: int = 50,
    order: int = 3,
    noise: float | None = None,
    threshold: float | None = None,
    alpha: float = 0.01,
) -> Jumps:
  r"""Discontinuities of the level, slope or curvature (third-order jumps) in a noisy series.

  At every sample t, degree-``order`` polynomials are fitted on the left window
  [t−h, t−1] and on the right window [t, t+h−1] and both evaluated at t−½; for
  k = 0, 1, 2 the score is

  .. math:: s_k(t) = |\hat f^{(k)}_R - \hat f^{(k)}_L| / \sqrt{\mathrm{se}_R^2 + \mathrm{se}_L^2}.

  A smooth curve gives s_k ≈ |N(0, 1)| plus a bias of order f^{(order+1)} h^{order+1−k}; a jump
  of the k-th derivative of size δ gives s_k ≈ |δ|/se. Samples where max_k s_k exceeds the
  threshold are picked strongest first, each suppressing others within ±h (the one-sided
  windows of a single jump light up around it). The default threshold is the two-sided
  Bonferroni bound over all samples and the three orders,
  :math:`\Phi^{-1}(1 - \alpha / (6n))` (three orders, two sides). Non-finite samples get weight 0.

  Returns:
    :class:`Jumps`; a planted jump is reported within ±h samples of its step.
  """
  _check_order(order, 2)
  if not isinstance(half_width, (int, np.integer)) or half_width <= order + 1:
    raise ValueError(f"`half_width` must be an int > order + 1 = {order + 1}, got {half_width!r}")
  if not 0 < alpha < 1:
    raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
  y, steps_arr, dt = _as_series(y, steps)
  valid = np.isfinite(y)
  sigma = robust_noise_level(y) if noise is None else float(noise)
  n, h = y.size, int(half_width)
  # Left fit over j = −h..−1 and right fit over j = 0..h−1, both evaluated at u0 = −½/h.
  u0 = -0.5 / h
  el, vl, okl = _local_poly(y, valid, h, order, 2, u0=u0, side="left")
  er, vr, okr = _local_poly(y, valid, h, order, 2, u0=u0, side="right")
  score = np.abs(er - el) / (sigma * np.sqrt(vl + vr))
  score = np.where(okl & okr, score, 0.0)
  score[:, :h] = 0.0            # one-sided windows must be complete
  score[:, n - h + 1:] = 0.0
  if threshold is None:
    threshold = float(_scipy("stats").norm.ppf(1 - alpha / (6 * max(n, 1))))
  best = score.max(axis=0).copy()
  out_steps, out_orders, out_scores, out_sizes = [], [], [], []
  while True:   # greedy non-maximum suppression: the strongest first, then ±h around it
    i = int(np.argmax(best))
    if not best[i] > threshold:
      break
    k = int(np.argmax(score[:, i]))
    out_steps.append(steps_arr[i])
    out_orders.append(k)
    out_scores.append(score[k, i])
    out_sizes.append((er[k, i] - el[k, i]) / dt ** k)
    best[max(0, i - h):i + h + 1] = 0.0
  order_ = np.argsort(out_steps)
  out_steps, out_orders, out_scores, out_sizes = (
      [v[j] for j in order_] for v in (out_steps, out_orders, out_scores, out_sizes))
  return Jumps(steps=np.asarray(out_steps), orders=np.asarray(out_orders, np.int64),
               scores=np.asarray(out_scores), sizes=np.asarray(out_sizes), score=score,
               threshold=float(threshold), half_width=h)


# ----------------------------------------------------------------- cosine similarity


class CosineProfile(NamedTuple):
  """Cosine similarity of successive updates (offline form).

  Attributes:
    cos: (T, K) c_t(k) = cos(u_t, u_{t−k}); NaN where u_{t−k} does not exist or a norm is 0.
    window_mean: (T, K) the mean of c_s(k) over s in (t − window, t] where defined.
    decay_rate: (T,) the decay rate of window_mean(·) in lag (see module docstring); NaN when
      fewer than two lags have a positive mean.
  """

  cos: np.ndarray
  window_mean: np.ndarray
  decay_rate: np.ndarray


def _decay_rate_np(m: np.ndarray) -> np.ndarray:
  k = np.arange(1, m.shape[-1] + 1, dtype=np.float64)
  use = np.isfinite(m) & (m > 0)
  lm = np.where(use, np.log(np.where(use, m, 1.0)), 0.0)
  cnt = use.sum(-1)
  kbar = (use * k).sum(-1) / np.maximum(cnt, 1)
  lbar = lm.sum(-1) / np.maximum(cnt, 1)
  sxy = (use * (k - kbar[..., None]) * (lm - lbar[..., None])).sum(-1)
  sxx = (use * (k - kbar[..., None]) ** 2).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where((cnt >= 2) & (sxx > 0), -sxy / sxx, np.nan)


def cosine_profile(updates, *, max_lag: int = 4, window: int = 100) -> CosineProfile:
  """Offline :class:`CosineProfile` of a (T, D) array of flattened updates or gradients.

  Rows with a non-finite entry or zero norm are skipped as in the streaming form: they
  neither enter nor count as a lag (the lag runs over accepted rows).
  """
  u = np.asarray(updates, np.float64)
  if u.ndim != 2:
    raise ValueError(f"`updates` must be (T, D), got shape {u.shape}")
  if not isinstance(max_lag, int) or max_lag < 1:
    raise ValueError(f"`max_lag` must be an int >= 1, got {max_lag!r}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"`window` must be an int >= 1, got {window!r}")
  norms = np.linalg.norm(u, axis=1)
  ok = np.all(np.isfinite(u), axis=1) & (norms > 0)
  t_all = u.shape[0]
  cos = np.full((t_all, max_lag), np.nan)
  kept: list[int] = []
  for t in range(t_all):
    if not ok[t]:
      continue
    for k in range(1, max_lag + 1):
      if len(kept) >= k:
        s = kept[-k]
        cos[t, k - 1] = u[t] @ u[s] / (norms[t] * norms[s])
    kept.append(t)
  mean = np.full_like(cos, np.nan)
  rows = np.flatnonzero(ok)
  for i, t in enumerate(rows):
    block = cos[rows[max(0, i - window + 1):i + 1]]
    with np.errstate(invalid="ignore"):
      cnt = np.isfinite(block).sum(0)
      mean[t] = np.where(cnt > 0, np.nansum(block, 0) / np.maximum(cnt, 1), np.nan)
  for t in range(1, t_all):   # rejected rows carry the last value, as the stream does
    if not ok[t]:
      mean[t] = mean[t - 1]
  return CosineProfile(cos=cos, window_mean=mean, decay_rate=_decay_rate_np(mean))


# --------------------------------------------------------------------- streaming form


class TrajectoryInfo(NamedTuple):
  """Diagnostics of :func:`trajectory_monitor` / :func:`trajectory_update` after a step.

  Attributes:
    value, d1, d2, d3: smoothed level and derivatives at step ``count − 1 − lag`` (per step).
    se: (4,) their standard errors (σ from ``noise`` or the buffer's robust estimate).
    noise: σ used.
    z3: d3 / se3, the standardised third derivative.
    cos: (K,) cos(u_t, u_{t−k}) of this step (NaN where undefined).
    cos_mean: (K,) window mean of ``cos`` over the last W accepted updates.
    cos_decay: decay rate of ``cos_mean`` in lag.
    loss_finite, update_finite: whether this step's inputs were usable (else skipped).
    num_skipped: steps so far with a non-finite loss or update.
  """

  value: jax.Array
  d1: jax.Array
  d2: jax.Array
  d3: jax.Array
  se: jax.Array
  noise: jax.Array
  z3: jax.Array
  cos: jax.Array
  cos_mean: jax.Array
  cos_decay: jax.Array
  loss_finite: jax.Array
  update_finite: jax.Array
  num_skipped: jax.Array


class TrajectoryState(NamedTuple):
  """State of :func:`trajectory_tracker`.

  Attributes:
    count: steps seen.
    values, mask: the last 2h+1 losses and whether each was finite.
    directions: the last K accepted updates, newest first: a tuple of K pytrees, each laid
      out like the parameters (same structure, shapes and, when initialised eagerly from
      sharded parameters, the same shardings, as optax's Adam moments).
    dir_norms: (K,) their Euclidean norms (float32).
    dir_mask: (K,) whether lag k + 1 holds an update yet.
    cosines, cos_mask: the last W rows of cosines (W, K) and where they are defined.
    info: :class:`TrajectoryInfo` of the last step.
  """

  count: jax.Array
  values: jax.Array
  mask: jax.Array
  directions: tuple
  dir_norms: jax.Array
  dir_mask: jax.Array
  cosines: jax.Array
  cos_mask: jax.Array
  info: TrajectoryInfo


class TrajectoryTracker(NamedTuple):
  """A pair of pure functions: ``init(params)`` and ``update(state, loss, updates)``."""

  init: Any
  update: Any


def _vdot32(a, b) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩ accumulated in float32 (or wider): element-wise, then reduced, so
  each leaf is reduced where it lies (no reshape or gather of the model into one vector)."""
  total = jnp.zeros((), jnp.float32)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    dt = jnp.promote_types(x.dtype, jnp.float32)
    total = total + jnp.sum(x.astype(dt) * y.astype(dt)).astype(jnp.float32)
  return total


def _decay_rate(mean, k_lags):
  """The least-squares decay rate of a (K,) window mean in lag (module docstring)."""
  use = jnp.isfinite(mean) & (mean > 0)
  lm = jnp.where(use, jnp.log(jnp.where(use, mean, 1.0)), 0.0)
  c = jnp.sum(use)
  kbar = jnp.sum(use * k_lags) / jnp.maximum(c, 1)
  lbar = jnp.sum(lm) / jnp.maximum(c, 1)
  sxy = jnp.sum(use * (k_lags - kbar) * (lm - lbar))
  sxx = jnp.sum(use * (k_lags - kbar) ** 2)
  return jnp.where((c >= 2) & (sxx > 0), -sxy / jnp.where(sxx > 0, sxx, 1.0), jnp.nan)


def _cosine_step(state: TrajectoryState, updates, k_lags):
  """Feeds one update to the cosine profile; returns the new buffers and (row, mean, decay, ok).

  cos(u_t, u_{t−k}) = ⟨u_t, u_{t−k}⟩ / (‖u_t‖ ‖u_{t−k}‖): K inner products against the stored
  updates, leaf by leaf where they lie. A non-finite or zero update is not stored.
  """
  directions = state.directions
  u = jax.tree.map(lambda d, x: jnp.asarray(x).astype(d.dtype), directions[0], updates)
  norm = jnp.sqrt(_vdot32(u, u))
  ok = jnp.isfinite(norm) & (norm > 0)
  dots = jnp.stack([_vdot32(u, d) for d in directions])
  row_ok = state.dir_mask & ok
  row = jnp.where(row_ok, dots / jnp.where(row_ok, norm * state.dir_norms, 1.0), jnp.nan)
  shifted = (u,) + tuple(directions[:-1])
  directions = tuple(jax.tree.map(lambda new, old: jnp.where(ok, new, old), s, d)
                     for s, d in zip(shifted, directions))
  dir_norms = jnp.where(ok, jnp.concatenate([norm[None], state.dir_norms[:-1]]), state.dir_norms)
  dir_mask = jnp.where(ok, jnp.concatenate([jnp.ones((1,), bool), state.dir_mask[:-1]]),
                       state.dir_mask)
  cosines = jnp.where(ok, jnp.concatenate([state.cosines[1:], jnp.where(row_ok, row, 0.0)[None]]),
                      state.cosines)
  cos_mask = jnp.where(ok, jnp.concatenate([state.cos_mask[1:], row_ok[None]]), state.cos_mask)
  cnt = jnp.sum(cos_mask, axis=0)
  mean = jnp.where(cnt > 0, jnp.sum(jnp.where(cos_mask, cosines, 0.0), 0) / jnp.maximum(cnt, 1),
                   jnp.nan)
  buffers = dict(directions=directions, dir_norms=dir_norms, dir_mask=dir_mask, cosines=cosines,
                 cos_mask=cos_mask)
  return buffers, (row, mean, _decay_rate(mean, k_lags), ok)


def trajectory_tracker(
    *,
    half_width: int = 50,
    order: int = 4,
    lag: int | None = None,
    noise: float | None = None,
    max_lag: int = 4,
    window: int = 100,
) -> TrajectoryTracker:
  r"""Streaming fingerprint with O(window) memory and a jit-able update.

  Keeps the last m = 2h+1 losses and evaluates the local polynomial fit of the module
  docstring (fixed half-width h, Legendre basis, 0 weight for a non-finite loss, which keeps
  its slot so the step axis is preserved) at the sample ``lag`` steps before the newest;
  ``lag = h`` (default) is the centred Savitzky–Golay estimate, equal to
  :func:`local_derivatives` with ``half_width=h`` at that step; ``lag = 0`` is causal and
  noisier. σ is ``noise`` or the robust MAD estimate over the buffer's third differences.

  Updates feed the cosine profile: the last K = ``max_lag`` accepted updates, kept as K
  pytrees laid out like ``init``'s argument (K copies of the parameters' size, sharded as
  the parameters are, never flattened into one vector), their K norms, and the last
  W = ``window`` rows of cosines. A non-finite or zero update is skipped and flagged
  (``info.update_finite``); it is not stored.

  ``init(params)`` takes the parameters (any pytree; the buffers take each leaf's shape,
  dtype and sharding, as ``jnp.zeros_like``), or an int D for a flat vector of D float32;
  ``update(state, loss, updates=None)`` takes a pytree of that structure (or None).
  """
  if not isinstance(half_width, int) or half_width <= order // 2:
    raise ValueError(f"`half_width` must be an int > order/2, got {half_width!r}")
  _check_order(order)
  lag = half_width if lag is None else lag
  if not isinstance(lag, int) or not 0 <= lag <= half_width:
    raise ValueError(f"`lag` must be an int in [0, half_width], got {lag!r}")
  if not isinstance(max_lag, int) or max_lag < 1:
    raise ValueError(f"`max_lag` must be an int >= 1, got {max_lag!r}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"`window` must be an int >= 1, got {window!r}")
  h, m = half_width, 2 * half_width + 1
  u0 = (h - lag) / h
  phi = jnp.asarray(_basis(np.arange(-h, h + 1) / h, order), jnp.float32)       # (m, p+1)
  amat = jnp.asarray(_basis_derivatives(u0, order, 3) / (
      float(h) ** np.arange(4))[:, None], jnp.float32)                          # (4, p+1)
  k_lags = jnp.arange(1, max_lag + 1, dtype=jnp.float32)

  def init(params) -> TrajectoryState:
    f = jnp.float32
    nan = jnp.asarray(jnp.nan, f)
    if isinstance(params, (int, np.integer)) and not isinstance(params, bool):
      params = jax.ShapeDtypeStruct((int(params),), f)
    info = TrajectoryInfo(
        value=nan, d1=nan, d2=nan, d3=nan, se=jnp.full((4,), jnp.nan, f), noise=nan, z3=nan,
        cos=jnp.full((max_lag,), jnp.nan, f), cos_mean=jnp.full((max_lag,), jnp.nan, f),
        cos_decay=nan, loss_finite=jnp.bool_(True), update_finite=jnp.bool_(True),
        num_skipped=jnp.int32(0))
    zeros = lambda p: (jnp.zeros(p.shape, p.dtype) if isinstance(p, jax.ShapeDtypeStruct)
                       else jnp.zeros_like(p))
    return TrajectoryState(
        count=jnp.int32(0), values=jnp.zeros((m,), f), mask=jnp.zeros((m,), bool),
        directions=tuple(jax.tree.map(zeros, params) for _ in range(max_lag)),
        dir_norms=jnp.zeros((max_lag,), f), dir_mask=jnp.zeros((max_lag,), bool),
        cosines=jnp.zeros((window, max_lag), f), cos_mask=jnp.zeros((window, max_lag), bool),
        info=info)

  def _derivs(values, mask):
    w = mask.astype(jnp.float32)
    ref = jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1.0)
    gram = phi.T @ (w[:, None] * phi)
    enough = jnp.sum(w) > order + 0.5
    gram = jnp.where(enough, gram, jnp.eye(order + 1, dtype=jnp.float32))
    ginv = jnp.linalg.inv(gram)
    coef = ginv @ (phi.T @ (w * (values - ref)))
    coef = coef.at[0].add(ref)
    est = amat @ coef
    var = jnp.einsum("da,ab,db->d", amat, ginv, amat)
    if noise is None:
      d3 = values[3:] - 3 * values[2:-1] + 3 * values[1:-2] - values[:-3]
      ok3 = mask[3:] & mask[2:-1] & mask[1:-2] & mask[:-3]
      d3 = jnp.where(ok3, d3, jnp.nan)
      med = jnp.nanmedian(d3)
      sigma = _MAD * jnp.nanmedian(jnp.abs(d3 - med)) / math.sqrt(_D3_VAR)
    else:
      sigma = jnp.float32(noise)
    se = sigma * jnp.sqrt(var)
    est = jnp.where(enough, est, jnp.nan)
    se = jnp.where(enough, se, jnp.nan)
    return est, se, sigma

  def update(state: TrajectoryState, loss, updates=None) -> TrajectoryState:
    loss = jnp.asarray(loss, jnp.float32)
    loss_ok = jnp.isfinite(loss)
    values = jnp.concatenate([state.values[1:], jnp.where(loss_ok, loss, 0.0)[None]])
    mask = jnp.concatenate([state.mask[1:], loss_ok[None]])
    est, se, sigma = _derivs(values, mask)
    info = state.info._replace(value=est[0], d1=est[1], d2=est[2], d3=est[3], se=se,
                               noise=sigma, z3=est[3] / se[3], loss_finite=loss_ok)
    buffers = dict(directions=state.directions, dir_norms=state.dir_norms,
                   dir_mask=state.dir_mask, cosines=state.cosines, cos_mask=state.cos_mask)
    upd_ok = jnp.bool_(True)
    if updates is not None:
      buffers, (row, mean, decay, upd_ok) = _cosine_step(state, updates, k_lags)
      info = info._replace(cos=row, cos_mean=mean, cos_decay=decay)
    skipped = (~loss_ok) | (~upd_ok)
    info = info._replace(update_finite=upd_ok,
                         num_skipped=state.info.num_skipped + skipped.astype(jnp.int32))
    return TrajectoryState(count=optax.safe_increment(state.count), values=values, mask=mask,
                           info=info, **buffers)

  return TrajectoryTracker(init, update)


class TrajectoryMonitorState(NamedTuple):
  """State of :func:`trajectory_monitor`; diagnostics in ``info``."""

  tracker: TrajectoryState
  info: TrajectoryInfo


def trajectory_monitor(
    *,
    half_width: int = 50,
    order: int = 4,
    lag: int | None = None,
    noise: float | None = None,
    max_lag: int = 4,
    window: int = 100,
    track_updates: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Trajectory fingerprint as an optax transformation; leaves the updates unchanged.

  Reads the loss from optax's extra argument ``value`` and the incoming updates. The cosine
  part keeps the last K = ``max_lag`` updates as K pytrees laid out like the parameters
  (the memory of K copies of the parameters, sharded like them as optax's Adam moments are;
  ``jax.jit(tx.init, out_shardings=...)`` as for any optax state); set
  ``track_updates=False`` to skip it. Place it first in the chain to see the raw gradients,
  after the learning-rate scaling to see the steps::

    tx = optax.chain(convergence.trajectory_monitor(half_width=100), optax.adam(1e-3))
    updates, state = tx.update(grads, state, params, value=loss)
    state[0].info.d1, state[0].info.cos_mean

  Diagnostics (:class:`TrajectoryInfo`) refer to the step ``lag`` steps ago for the
  derivatives, to this step for the cosines. A missing ``value`` raises; a non-finite one is
  skipped and flagged. Other extra args are ignored. Arguments as in
  :func:`trajectory_tracker`.
  """
  tracker = trajectory_tracker(half_width=half_width, order=order, lag=lag, noise=noise,
                               max_lag=max_lag, window=window)

  def init_fn(params):
    s = tracker.init(params if track_updates else ())
    return TrajectoryMonitorState(tracker=s, info=s.info)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    if value is None:
      raise TypeError("trajectory_monitor.update needs the keyword argument `value` (the loss "
                      "of this step), e.g. tx.update(grads, state, params, value=loss).")
    s = tracker.update(state.tracker, value, updates if track_updates else None)
    return updates, TrajectoryMonitorState(tracker=s, info=s.info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------ offline form


def load_metric(path, key: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one metric of a ``metrics.jsonl`` onto a regular step grid.

  Returns ``(steps, values)``: the grid runs from the first to the last step holding ``key``
  with the smallest spacing between them; steps without the key, or with a null / non-finite
  value, hold NaN (weight 0 downstream). Raises if the steps do not fit one regular grid.
  """
  rows: dict[int, float] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      rec = json.loads(line)
      if key in rec and "step" in rec:
        v = rec[key]
        rows[int(rec["step"])] = float("nan") if v is None else float(v)
  if len(rows) < 2:
    raise ValueError(f"{path}: fewer than two rows hold {key!r}")
  s = np.asarray(sorted(rows))
  dt = int(np.min(np.diff(s)))
  if np.any((s - s[0]) % dt):
    raise ValueError(f"{path}: the steps holding {key!r} are not on one regular grid")
  grid = np.arange(s[0], s[-1] + 1, dt)
  vals = np.full(grid.size, np.nan)
  vals[(s - s[0]) // dt] = [rows[k] for k in s]
  return grid.astype(np.float64), vals


def fingerprint_from_jsonl(path, key: str = "train/loss", **kwargs) -> tuple[Fingerprint, Jumps]:
  """:func:`local_derivatives` and :func:`detect_jumps` of one metric of a ``metrics.jsonl``.

  ``kwargs`` go to :func:`local_derivatives`; ``jump_half_width`` (default 50, or a quarter of
  the series when shorter) to :func:`detect_jumps`.
  """
  jump_h = kwargs.pop("jump_half_width", None)
  steps, y = load_metric(path, key)
  fp = local_derivatives(y, steps, **kwargs)
  if jump_h is None:
    jump_h = int(min(50, max(5, y.size // 4)))
  jumps = detect_jumps(y, steps, half_width=jump_h, noise=fp.noise)
  return fp, jumps
