"""Windowed evidence: multi-scale windows, rolling-quantile baseline, drift, Kalman/EWMA, stationarity.

Every metric is watched through a short window (fast response) and a long one
(slow metrics), against a baseline made of the historical quantiles of the metric; the
standardised offset from that baseline, smoothed by an EWMA and fused across windows with a
Kalman filter, plus a stationarity test, turn each metric into a piece of *evidence* with a
strength, for the Bayesian convergence network to consume as a soft likelihood.

Per metric (all state of fixed shape, O(long + history) memory, jit-able update):

* windows: the last ``long`` accepted samples; the short window is the newest ``short`` of
  them. Every ``short`` accepted samples, the short-window mean is appended to a ring buffer of
  ``history`` block means.
* baseline: quantiles q25, q50, q75 of the block means in the history (rolling quantiles,
  linear interpolation as ``numpy.quantile``), spread s = (q75 − q25)/1.349.
* local-level Kalman filter (Harvey 1989, §3.2) on every accepted sample,

      x_t = x_{t−1} + w_t, w ~ N(0, q);     y_t = x_t + v_t, v ~ N(0, r);
      P⁻ = P + q,  K = P⁻/(P⁻ + r),  x ← x + K (y − x),  P ← (1 − K) P⁻,

  whose noise parameters come from the two windows: r from the short window (robust
  variance of first differences, Var Δy = 2r + q ≈ 2r) and q from the long window (variance of
  successive block-mean differences, ≈ q (2w² + 1)/(3w) + 2r/w for blocks of w samples). The
  filter thus fuses the fast noise estimate with the slow drift estimate; its gain K settles
  at the steady state K∞ = (−λ + √(λ² + 4λ))/2, λ = q/r, where it *is* an EWMA with α = K∞.
* drift: z = (x̂ − q50) / √(s² + P), the Kalman level's standardised offset from the baseline.
* stationarity: batch-means trend test on the long window (in the spirit of Yaida 2018 and
  SASA, Lang et al. 2019, which compare a running statistic with its target under
  batch-means variance): the long window is cut into B batches, the batch means b_i regressed
  on i, and t = slope/se compared with Student's t with B − 2 degrees of freedom.

Evidence: the true drift δ in "goodness" units (z for metrics to maximise, −z for those to
minimise) is taken as N(z, 1); with the band ±``band``,

    P(improving) = Φ(z − band),  P(worsening) = Φ(−z − band),  P(stable) = the rest,

and a trend rejected by the stationarity test moves the stable mass to the trend's
direction in proportion 1 − p/α. ``direction`` is the most probable state, ``strength`` its
probability; :meth:`Evidence.likelihood` gives the 3-state soft likelihood, discounted by
``reliability`` (the filled, finite fraction of the long window).

Non-finite inputs are skipped (no state change except the counters ``num_skipped``) and
flagged in ``info.skipped``; a skipped step never produces NaN evidence.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import betainc
from jax.scipy.stats import norm as _norm

IMPROVING, STABLE, WORSENING = 1, 0, -1
_IQR_TO_SD = 1.3489795003921634


# ------------------------------------------------------------ filters (pure functions)


def steady_state_gain(q, r):
  r"""Steady-state Kalman gain of the local-level model, the equivalent EWMA coefficient.

  :math:`K_\infty = (-\lambda + \sqrt{\lambda^2 + 4\lambda})/2` with :math:`\lambda = q/r`
  (Harvey 1989, eq. 3.2.21). The steady-state posterior variance is :math:`P_\infty = K_\infty r`.
  """
  lam = jnp.asarray(q, jnp.float32) / jnp.asarray(r, jnp.float32)
  return (-lam + jnp.sqrt(lam * lam + 4 * lam)) / 2


def local_level_filter(y, q, r, x0, p0):
  r"""Kalman filter of the local-level model over a series (``lax.scan``; jit-able).

  Recursion in the module docstring. A non-finite observation is skipped: only the
  prediction step runs (P grows by q, x is kept). Returns ``(x, p, gain)``, each (T,), the
  filtered mean, variance and gain (0 on a skipped step).
  """
  q = jnp.asarray(q, jnp.float32)
  r = jnp.asarray(r, jnp.float32)

  def step(carry, yt):
    x, p = carry
    pm = p + q
    ok = jnp.isfinite(yt)
    k = jnp.where(ok, pm / (pm + r), 0.0)
    x = x + k * (jnp.where(ok, yt, x) - x)
    p = (1 - k) * pm
    return (x, p), (x, p, k)

  _, (xs, ps, ks) = jax.lax.scan(step, (jnp.float32(x0), jnp.float32(p0)),
                                 jnp.asarray(y, jnp.float32))
  return xs, ps, ks


def ewma(y, alpha, x0):
  r"""Exponentially weighted moving average :math:`m_t = m_{t-1} + \alpha (y_t - m_{t-1})`.

  Non-finite samples are skipped (m is kept). With α = :func:`steady_state_gain` (q, r) it
  equals :func:`local_level_filter` started at its steady state p0 = P∞ = K∞ r: then
  P⁻ = K∞ r + q and K = P⁻/(P⁻ + r) = K∞ at every step, since K∞² + λK∞ − λ = 0.
  """
  alpha = jnp.asarray(alpha, jnp.float32)

  def step(m, yt):
    ok = jnp.isfinite(yt)
    m = m + jnp.where(ok, alpha * (yt - m), 0.0)
    return m, m

  _, ms = jax.lax.scan(step, jnp.float32(x0), jnp.asarray(y, jnp.float32))
  return ms


def batch_means_trend_test(x, num_batches: int = 10, mask=None):
  r"""Two-sided batch-means test of "no trend" on a window (jit-able).

  Batch means :math:`b_i` of B equal batches (masked entries excluded; an empty batch drops
  out) are regressed on i; :math:`t = \hat\beta / \mathrm{se}(\hat\beta)` has Student's t law
  with (number of non-empty batches − 2) degrees of freedom when the batch means are
  independent, i.e. when a batch is much longer than the correlation time. The p-value is
  :math:`I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`. Returns ``(t, p_value, df)``; p = 1 (no evidence of a
  trend) when fewer than 3 batches are usable.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[-1]
  if n % num_batches:
    raise ValueError(f"window length {n} must be a multiple of `num_batches`={num_batches}")
  mask = jnp.isfinite(x) if mask is None else (mask & jnp.isfinite(x))
  xb = jnp.where(mask, x, 0.0).reshape(num_batches, -1)
  cb = mask.reshape(num_batches, -1).sum(-1)
  use = cb > 0
  b = jnp.where(use, xb.sum(-1) / jnp.maximum(cb, 1), 0.0)
  i = jnp.arange(num_batches, dtype=jnp.float32)
  k = use.sum()
  ib = jnp.sum(use * i) / jnp.maximum(k, 1)
  bb = jnp.sum(use * b) / jnp.maximum(k, 1)
  sxx = jnp.sum(use * (i - ib) ** 2)
  slope = jnp.sum(use * (i - ib) * (b - bb)) / jnp.maximum(sxx, 1e-30)
  resid = use * (b - bb - slope * (i - ib))
  df = k - 2
  s2 = jnp.sum(resid ** 2) / jnp.maximum(df, 1)
  se = jnp.sqrt(s2 / jnp.maximum(sxx, 1e-30))
  t = jnp.where(se > 0, slope / jnp.where(se > 0, se, 1.0),
                jnp.where(slope == 0, 0.0, jnp.inf * jnp.sign(slope)))
  dff = jnp.maximum(df, 1).astype(jnp.float32)
  p = betainc(dff / 2, 0.5, dff / (dff + t * t))
  p = jnp.where(df >= 1, p, 1.0)
  t = jnp.where(df >= 1, t, 0.0)
  return t, p, df


# ------------------------------------------------------------------------ evidence


class Evidence(NamedTuple):
  """One metric's evidence after a step, ready to enter a Bayesian network.

  Attributes:
    direction: +1 improving, 0 stable, −1 worsening (the most probable state).
    strength: the probability of ``direction`` under the drift model, in [1/3, 1] ⊂ [0, 1].
    probs: (3,) P(improving), P(stable), P(worsening).
    drift: the standardised drift z of the Kalman level from the baseline median (signed
      in the metric's own units: > 0 means above the baseline).
    trend_t, p_stationary: the batch-means trend statistic and its p-value (long window).
    level, level_sd: the Kalman level x̂ and √P.
    reliability: fraction of the long window filled with accepted samples, in [0, 1].
    in_band_steps: consecutive accepted steps with direction = stable.
    count: accepted samples so far (the evidence's time stamp, for ageing).
  """

  direction: jax.Array
  strength: jax.Array
  probs: jax.Array
  drift: jax.Array
  trend_t: jax.Array
  p_stationary: jax.Array
  level: jax.Array
  level_sd: jax.Array
  reliability: jax.Array
  in_band_steps: jax.Array
  count: jax.Array

  def likelihood(self) -> jax.Array:
    """Soft likelihood over (improving, stable, worsening): reliability·probs + (1−rel)/3."""
    rel = jnp.clip(self.reliability, 0.0, 1.0)
    return rel * self.probs + (1 - rel) / 3.0


class MetricSpec(NamedTuple):
  """How one metric is watched.

  Attributes:
    name: key of the metric.
    mode: "min" (lower is better, e.g. a loss) or "max" (e.g. an accuracy).
    short, long, history: window lengths in accepted samples (``long`` a multiple of
      ``short`` and of ``num_batches``); ``None`` takes the tracker's default. Fast metrics
      get short windows, slow ones long windows.
  """

  name: str
  mode: str = "min"
  short: int | None = None
  long: int | None = None
  history: int | None = None


class MetricWindowState(NamedTuple):
  values: jax.Array        # (long,) newest last
  mask: jax.Array          # (long,)
  blocks: jax.Array        # (history,) block means, newest last
  block_mask: jax.Array
  block_sum: jax.Array
  block_n: jax.Array
  x: jax.Array             # Kalman level
  p: jax.Array             # Kalman variance
  ewma: jax.Array
  count: jax.Array
  num_skipped: jax.Array
  in_band: jax.Array


class EvidenceInfo(NamedTuple):
  """Per-metric diagnostics: the evidence plus the window statistics behind it."""

  evidence: Evidence
  short_mean: jax.Array
  long_mean: jax.Array
  baseline: jax.Array      # (3,) q25, q50, q75
  noise_var: jax.Array     # r
  drift_var: jax.Array     # q
  gain: jax.Array
  ewma: jax.Array
  skipped: jax.Array
  num_skipped: jax.Array


class EvidenceState(NamedTuple):
  """State of :func:`evidence_tracker` / :func:`evidence_monitor`: dicts keyed by metric."""

  metrics: dict[str, MetricWindowState]
  info: dict[str, EvidenceInfo]


class EvidenceTracker(NamedTuple):
  """``init() -> EvidenceState`` and ``update(state, {name: value}) -> EvidenceState``."""

  init: Any
  update: Any
  specs: tuple


def _masked_mean(v, m):
  c = jnp.sum(m)
  return jnp.where(c > 0, jnp.sum(jnp.where(m, v, 0.0)) / jnp.maximum(c, 1), jnp.nan)


def rolling_quantiles(values, mask, qs=(0.25, 0.5, 0.75)):
  """Quantiles of the masked entries (linear interpolation, as ``numpy.quantile``); NaN if none."""
  v = jnp.where(mask, values, jnp.nan)
  return jnp.nanquantile(v, jnp.asarray(qs, jnp.float32))


def _evidence_probs(z_good, band, trend_good_t, p_stat, alpha):
  up = _norm.cdf(z_good - band)
  down = _norm.cdf(-z_good - band)
  flat = jnp.clip(1.0 - up - down, 0.0, 1.0)
  moved = flat * jnp.clip(1.0 - p_stat / alpha, 0.0, 1.0)
  up = up + jnp.where(trend_good_t > 0, moved, 0.0)
  down = down + jnp.where(trend_good_t < 0, moved, 0.0)
  flat = flat - jnp.where(trend_good_t != 0, moved, 0.0)
  probs = jnp.stack([up, flat, down])
  return probs / jnp.sum(probs)


def _resolve_specs(metrics, *, short, long, history, num_batches, band, alpha):
  """The :class:`MetricSpec` of every metric with the defaults filled in; checks the arguments
  of :func:`evidence_tracker`, each error naming the argument."""
  specs = []
  for m in metrics:
    s = MetricSpec(m) if isinstance(m, str) else m
    if not isinstance(s, MetricSpec):
      raise TypeError(f"`metrics` entries must be str or MetricSpec, got {m!r}")
    if s.mode not in ("min", "max"):
      raise ValueError(f"metric {s.name!r}: `mode` must be 'min' or 'max', got {s.mode!r}")
    s = s._replace(short=s.short or short, long=s.long or long, history=s.history or history)
    if s.short < 2 or s.long % s.short or s.long % num_batches or s.long < 2 * s.short:
      raise ValueError(f"metric {s.name!r}: need short >= 2 and long a multiple of short "
                       f"(>= 2 short) and of num_batches={num_batches}; got short={s.short}, "
                       f"long={s.long}")
    if s.history < 4:
      raise ValueError(f"metric {s.name!r}: `history` must be >= 4, got {s.history}")
    specs.append(s)
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"metric names must be distinct, got {names}")
  if not 0 < alpha < 1:
    raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
  if not band >= 0:
    raise ValueError(f"`band` must be >= 0, got {band!r}")
  return tuple(specs)


def _init_metric(s: MetricSpec) -> tuple[MetricWindowState, EvidenceInfo]:
  """Empty windows and a uniform (reliability 0) evidence for one metric."""
  f = jnp.float32
  st = MetricWindowState(
      values=jnp.zeros((s.long,), f), mask=jnp.zeros((s.long,), bool),
      blocks=jnp.zeros((s.history,), f), block_mask=jnp.zeros((s.history,), bool),
      block_sum=f(0), block_n=jnp.int32(0), x=f(0), p=f(jnp.inf), ewma=f(0),
      count=jnp.int32(0), num_skipped=jnp.int32(0), in_band=jnp.int32(0))
  nan = f(jnp.nan)
  ev = Evidence(direction=jnp.int32(0), strength=f(1 / 3), probs=jnp.full((3,), 1 / 3, f),
                drift=f(0), trend_t=f(0), p_stationary=f(1), level=nan, level_sd=nan,
                reliability=f(0), in_band_steps=jnp.int32(0), count=jnp.int32(0))
  info = EvidenceInfo(evidence=ev, short_mean=nan, long_mean=nan,
                      baseline=jnp.full((3,), jnp.nan, f), noise_var=nan, drift_var=nan,
                      gain=f(0), ewma=nan, skipped=jnp.bool_(False),
                      num_skipped=jnp.int32(0))
  return st, info


def _noise_variances(values, mask, w):
  """(r, q) of the local-level model from the two windows (module docstring).

  r: robust variance of first differences in the short window (the newest ``w`` samples;
  Var Δy ≈ 2r). q: from the long window's block means of ``w`` samples,
  Var(Δb) ≈ q (2w²+1)/(3w) + 2r/w. Both floored at a tiny positive value.
  """
  short_v, short_m = values[-w:], mask[-w:]
  dif = jnp.where(short_m[1:] & short_m[:-1], short_v[1:] - short_v[:-1], jnp.nan)
  mad = jnp.nanmedian(jnp.abs(dif - jnp.nanmedian(dif)))
  r = (1.482602218505602 * mad) ** 2 / 2
  r = jnp.where(jnp.isfinite(r), r, 0.0)
  lb = values.reshape(-1, w).mean(-1)
  lbm = mask.reshape(-1, w).all(-1)
  db = jnp.where(lbm[1:] & lbm[:-1], lb[1:] - lb[:-1], jnp.nan)
  vdb = jnp.nanmean(db ** 2)
  q = jnp.maximum(vdb - 2 * r / w, 0.0) * 3 * w / (2 * w * w + 1)
  q = jnp.where(jnp.isfinite(q), q, 0.0)
  tiny = 1e-12 + 1e-6 * r
  return jnp.maximum(r, tiny), jnp.maximum(q, tiny)


def _update_metric(s: MetricSpec, st: MetricWindowState, info: EvidenceInfo, y, *,
                   num_batches, band, alpha, ewma_alpha):
  """One sample of one metric: windows, Kalman level, baseline, drift, trend test, evidence.
  A non-finite sample leaves the state unchanged (counted in ``num_skipped``)."""
  y = jnp.asarray(y, jnp.float32)
  ok = jnp.isfinite(y)
  yv = jnp.where(ok, y, 0.0)
  a_ewma = 2.0 / (s.short + 1) if ewma_alpha is None else ewma_alpha
  values = jnp.concatenate([st.values[1:], yv[None]])
  mask = jnp.concatenate([st.mask[1:], jnp.ones((1,), bool)])
  bsum, bn = st.block_sum + yv, st.block_n + 1
  full = bn == s.short
  blocks = jnp.where(full, jnp.concatenate([st.blocks[1:], (bsum / s.short)[None]]),
                     st.blocks)
  bmask = jnp.where(full, jnp.concatenate([st.block_mask[1:], jnp.ones((1,), bool)]),
                    st.block_mask)
  bsum = jnp.where(full, 0.0, bsum)
  bn = jnp.where(full, 0, bn)
  count = st.count + 1
  short_mean = _masked_mean(values[-s.short:], mask[-s.short:])
  long_mean = _masked_mean(values, mask)
  r, q = _noise_variances(values, mask, s.short)
  first = st.count == 0
  pm = jnp.where(first, jnp.inf, st.p + q)
  k = jnp.where(first, 1.0, pm / (pm + r))
  x = jnp.where(first, yv, st.x + k * (yv - st.x))
  p = jnp.where(first, r, (1 - k) * pm)
  e = jnp.where(first, yv, st.ewma + a_ewma * (yv - st.ewma))
  base = rolling_quantiles(blocks, bmask)
  spread = (base[2] - base[0]) / _IQR_TO_SD
  have_base = jnp.sum(bmask) >= 4
  z = jnp.where(have_base, (x - base[1]) / jnp.sqrt(spread ** 2 + p + 1e-30), 0.0)
  t, pval, _ = batch_means_trend_test(values, num_batches, mask)
  sign = 1.0 if s.mode == "max" else -1.0
  probs = _evidence_probs(sign * z, band, sign * t, pval, alpha)
  idx = jnp.argmax(probs)
  direction = jnp.asarray([IMPROVING, STABLE, WORSENING], jnp.int32)[idx]
  in_band = jnp.where(direction == STABLE, st.in_band + 1, 0)
  ev = Evidence(direction=direction, strength=probs[idx], probs=probs, drift=z, trend_t=t,
                p_stationary=pval, level=x, level_sd=jnp.sqrt(p),
                reliability=jnp.mean(mask.astype(jnp.float32)), in_band_steps=in_band,
                count=count)
  new = MetricWindowState(values=values, mask=mask, blocks=blocks, block_mask=bmask,
                          block_sum=bsum, block_n=bn, x=x, p=p, ewma=e, count=count,
                          num_skipped=st.num_skipped, in_band=in_band)
  new_info = EvidenceInfo(evidence=ev, short_mean=short_mean, long_mean=long_mean,
                          baseline=base, noise_var=r, drift_var=q, gain=k, ewma=e,
                          skipped=jnp.bool_(False), num_skipped=st.num_skipped)
  skipped_st = st._replace(num_skipped=st.num_skipped + 1)
  skipped_info = info._replace(skipped=jnp.bool_(True), num_skipped=st.num_skipped + 1)
  pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(ok, u, v), a, b)
  return pick(new, skipped_st), pick(new_info, skipped_info)


def evidence_tracker(
    metrics: Sequence[str | MetricSpec],
    *,
    short: int = 50,
    long: int = 500,
    history: int = 256,
    num_batches: int = 10,
    band: float = 2.0,
    alpha: float = 0.05,
    ewma_alpha: float | None = None,
) -> EvidenceTracker:
  r"""Windowed evidence for a fixed set of metrics: pure ``init`` / jit-able ``update``.

  See the module docstring for every quantity. ``update(state, values)`` takes a dict
  ``{name: scalar}``; a name absent from the dict, or a non-finite value, is skipped for
  that metric (flagged in ``info[name].skipped``). ``ewma_alpha`` defaults to 2/(short + 1).

  Args:
    metrics: names (mode "min") or :class:`MetricSpec`.
    short, long, history: default window lengths (accepted samples): fast window, slow window
      (a multiple of ``short`` and ``num_batches``), and the number of short-window block
      means kept for the rolling-quantile baseline.
    num_batches: batches of the stationarity test on the long window.
    band: half-width of the "stable" band for the standardised drift.
    alpha: level of the stationarity test.
  """
  specs = _resolve_specs(metrics, short=short, long=long, history=history,
                         num_batches=num_batches, band=band, alpha=alpha)

  def init() -> EvidenceState:
    pairs = {s.name: _init_metric(s) for s in specs}
    return EvidenceState(metrics={k: v[0] for k, v in pairs.items()},
                         info={k: v[1] for k, v in pairs.items()})

  def update(state: EvidenceState, values: Mapping[str, Any]) -> EvidenceState:
    ms, infos = {}, {}
    for s in specs:
      st, info = state.metrics[s.name], state.info[s.name]
      if s.name in values and values[s.name] is not None:
        st, info = _update_metric(s, st, info, values[s.name], num_batches=num_batches,
                                  band=band, alpha=alpha, ewma_alpha=ewma_alpha)
      else:
        st = st._replace(num_skipped=st.num_skipped + 1)
        info = info._replace(skipped=jnp.bool_(True), num_skipped=st.num_skipped)
      ms[s.name], infos[s.name] = st, info
    return EvidenceState(metrics=ms, info=infos)

  return EvidenceTracker(init, update, specs)


def evidence_monitor(
    metrics: Sequence[str | MetricSpec] = ("loss",),
    *,
    value_name: str = "loss",
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
  r"""Windowed evidence as an optax transformation; leaves the updates unchanged.

  Reads optax's extra argument ``value`` as the metric ``value_name`` and any other metrics
  from the extra argument ``metrics`` (a dict ``{name: scalar}``); a metric missing at a step
  is skipped for that step (eval metrics arrive every N steps)::

    tx = optax.chain(optax.adam(1e-3), convergence.evidence_monitor(
        ["loss", convergence.MetricSpec("grad_norm", short=20, long=200)]))
    updates, state = tx.update(grads, state, params, value=loss,
                               metrics={"grad_norm": optax.tree.norm(grads)})
    state[1].info["loss"].evidence.likelihood()

  ``kwargs`` go to :func:`evidence_tracker`. Other extra args are ignored.
  """
  tracker = evidence_tracker(metrics, **kwargs)

  def init_fn(params):
    del params
    return tracker.init()

  def update_fn(updates, state, params=None, *, value=None, metrics=None, **extra_args):
    del params, extra_args
    vals = dict(metrics or {})
    if value is not None and value_name not in vals:
      vals[value_name] = value
    return updates, tracker.update(state, vals)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
