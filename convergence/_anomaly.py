"""Anomaly detection on the training streams, an optax guard, and training-dynamics probes.

Streaming part: from the loss, gradient-norm and update-norm streams and η·λ_c,
a jit-able ``(init, update)`` detector flags

* non-finite values (``REASON_NONFINITE``),
* spikes: the current value's robust z-score z = (x − median) / (1.4826 · MAD) against the
  previous ``window`` values above ``spike_threshold`` (``REASON_SPIKE``),
* level shifts: the robust z-score of the median of the last ``short_window`` values against
  the long window above ``shift_threshold`` (``REASON_LEVEL_SHIFT``),
* η·λ_c above ``lr_sharpness_limit`` (2: the step raises the batch loss; critical sharpness,
  Kalra et al. 2026, arXiv 2601.16979) for
  ``sustain`` consecutive measured steps (``REASON_UNSTABLE_LR``).

Only increases count as spikes or shifts (a falling loss is not an anomaly). The reason is a
bit mask, so one step can carry several reasons (:func:`reason_names` decodes it).

Edge of stability. Under full-batch GD (and Adam, Cohen et al. 2021, 2022) the
sharpness rises to the stability threshold and the run then *oscillates* there: η·λ_c climbs
from ≪ 2 to ≈ 2 within a few dozen steps, the gradient norm grows along the sharp direction
(×57 in ``configs/edge_of_stability.py``), the loss rises (×3) and falls back, and η·λ_c keeps
hovering around 2. Those spikes are the dynamics under study, not faults. The detector
therefore keeps an *edge context*: within the last ``eos_window`` steps, a measured η·λ_c was
at the edge — inside the band ``eos_band × lr_sharpness_limit`` (default [0.5, 2.5]: near or
oscillating around 2) or risen to ``eos_rise`` (10) times its own window median (approaching
it) — and the last measured η·λ_c is not beyond the band. A spike, level shift or sustained
η·λ_c > limit in that context is classified as edge-of-stability oscillation: its bits go to
``info.eos_reason`` instead of ``info.reason``, ``info.eos`` is set and ``info.flag`` is not.
Still anomalies, whatever the context: a non-finite value (``REASON_NONFINITE`` stays in
``reason``; the step's other reasons are still classified, so the report names the fault, not
the oscillation around it); a loss above ``eos_max_loss_ratio`` × the window median (the loss
excess of an oscillation is bounded by its amplitude — ×3 here — while an injected ×1e4 fault
is not; the gradient norm gets no such cap, since its excursion grows as the baseline
gradient vanishes); anything while η·λ_c lies steadily below the band (a spike at η·λ_c ≪ 2)
or beyond it (η·λ_c ≫ 2: divergence, not oscillation). Why the rise test: the gradient-norm
spike that opens an excursion comes while η·λ_c is still climbing. Along GD's update the
critical sharpness is the gradient-weighted mean curvature, so when a component along a
direction of curvature ≈ 2/η has grown the gradient norm by a factor r, η·λ_c ≈ 2(1 − 1/r²):
0.54 and 0.68 at the two onsets of the reference run (r ≈ 1.1–1.2, crossing 2 twelve to
twenty steps later), but ≈ 0.1 for r = 1.03, which a detector flags on a flat gradient-norm
baseline. What does tell such an onset from a fault is that η·λ_c left its own baseline
(×50–×200 at those onsets) rather than its level.

For the convergence network the detector also counts the steps since the last loss level
shift and since the last measured η·λ_c above the limit (``info.steps_since_level_shift``,
``info.steps_since_lr_above_limit``; :data:`NEVER` before the first), whatever the
classification: an oscillating run is not a converged one
(``convergence.convergence_network``'s ``settle_window``).

:func:`anomaly_guard` wraps an optimizer, in the spirit of ``optax.apply_if_finite``: a step
whose anomaly reason matches ``skip_on`` returns zero updates and keeps the inner state (so a
NaN never reaches Adam's moments), at most ``max_consecutive_skips`` times in a row.

Plain functions on recorded series (not optax transformations): activation entropy, distance
between activation distributions, mapping consistency, a performance forecast with a bootstrap
band, and forgetting detection (:func:`detect_forgetting`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

REASON_NONE = 0
REASON_NONFINITE = 1
REASON_SPIKE = 2
REASON_LEVEL_SHIFT = 4
REASON_UNSTABLE_LR = 8
REASON_NAMES = {REASON_NONFINITE: "nonfinite", REASON_SPIKE: "spike",
                REASON_LEVEL_SHIFT: "level_shift", REASON_UNSTABLE_LR: "unstable_lr"}
STREAMS = ("loss", "grad_norm", "update_norm")

_MAD_TO_SD = 1.4826  # MAD of a Gaussian is 0.6745 σ
NEVER = 2 ** 30  # a "steps since" counter before its first event (saturates there)


def reason_names(code: int) -> list[str]:
  """Decodes a reason bit mask into names, e.g. ``3 -> ['nonfinite', 'spike']`` (outside jit)."""
  code = int(code)
  return [name for bit, name in REASON_NAMES.items() if code & bit]


def robust_zscore(x: jax.Array, window: jax.Array, *, rel_floor: float = 1e-3,
                  abs_floor: float = 1e-12) -> jax.Array:
  """z = (x − median(window)) / max(1.4826·MAD(window), rel_floor·|median|, abs_floor).

  The floor keeps a constant window from turning rounding noise into huge scores. NaN entries
  of ``window`` are ignored (``nanmedian``); an all-NaN window or a NaN ``x`` gives NaN.
  Reduction over axis 0 of ``window``.
  """
  med = jnp.nanmedian(window, axis=0)
  mad = jnp.nanmedian(jnp.abs(window - med), axis=0)
  scale = jnp.maximum(jnp.maximum(_MAD_TO_SD * mad, rel_floor * jnp.abs(med)), abs_floor)
  return (x - med) / scale


# ----------------------------------------------------------------------------- detector


class AnomalyInfo(NamedTuple):
  """Diagnostics of the last step.

  Attributes:
    flag: whether any anomaly was detected.
    reason: bit mask of ``REASON_*``.
    spike_z: (3,) robust z of this step's loss, grad norm, update norm (NaN in warm-up or
      for a missing stream).
    shift_z: (3,) robust z of the short-window median against the long window.
    unstable_run: consecutive measured steps with η·λ_c above the limit.
    eos: this step's spike / shift / unstable-η·λ_c reasons were classified as
      edge-of-stability oscillation (then ``eos_reason`` ≠ 0 and they are not in ``reason``).
    eos_reason: bit mask of the ``REASON_*`` so classified (0 when ``eos`` is False).
    edge: the edge context holds at this step (η·λ_c at the edge within ``eos_window``).
    eos_run: consecutive steps classified as edge-of-stability oscillation.
    steps_since_level_shift: steps since the last loss level shift (this step = 0), of any
      classification; :data:`NEVER` before the first.
    steps_since_lr_above_limit: steps since the last measured η·λ_c above the limit.
  """

  flag: jax.Array
  reason: jax.Array
  spike_z: jax.Array
  shift_z: jax.Array
  unstable_run: jax.Array
  eos: jax.Array
  eos_reason: jax.Array
  edge: jax.Array
  eos_run: jax.Array
  steps_since_level_shift: jax.Array
  steps_since_lr_above_limit: jax.Array


class AnomalyState(NamedTuple):
  """Detector state: a (window, 3) ring of past values, its write position, counters, info.

  ``lr_history`` is a (window,) ring of measured η·λ_c (NaN: not measured), written at
  ``position`` like ``history``; ``last_lr_sharpness`` the last measured η·λ_c (NaN before the
  first); ``steps_since_edge`` the steps since a measured η·λ_c was at the edge (in the band
  or rising); ``total_eos`` the steps classified as edge-of-stability oscillation
  (``total_flagged`` counts anomalies only).
  """

  count: jax.Array
  history: jax.Array
  lr_history: jax.Array
  position: jax.Array
  unstable_run: jax.Array
  total_flagged: jax.Array
  last_lr_sharpness: jax.Array
  steps_since_edge: jax.Array
  steps_since_level_shift: jax.Array
  steps_since_lr_above_limit: jax.Array
  eos_run: jax.Array
  total_eos: jax.Array
  info: AnomalyInfo


class AnomalyDetector(NamedTuple):
  """Pure ``init() -> state`` and ``update(state, *, loss, grad_norm, update_norm, lr_sharpness)``."""

  init: Callable[[], AnomalyState]
  update: Callable[..., AnomalyState]


def _empty_info() -> AnomalyInfo:
  nan3 = jnp.full((3,), jnp.nan, jnp.float32)
  return AnomalyInfo(flag=jnp.bool_(False), reason=jnp.int32(0), spike_z=nan3, shift_z=nan3,
                     unstable_run=jnp.int32(0), eos=jnp.bool_(False), eos_reason=jnp.int32(0),
                     edge=jnp.bool_(False), eos_run=jnp.int32(0),
                     steps_since_level_shift=jnp.int32(NEVER),
                     steps_since_lr_above_limit=jnp.int32(NEVER))


def _check_detector_args(*, window, short_window, min_history, sustain, spike_threshold,
                         shift_threshold, eos_window, eos_band, eos_rise, eos_max_loss_ratio):
  """The checks of :func:`anomaly_detector`'s arguments, each naming the argument."""
  for name, v in (("window", window), ("short_window", short_window),
                  ("min_history", min_history), ("sustain", sustain)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
  if short_window > window:
    raise ValueError(f"`short_window` ({short_window}) must be <= `window` ({window})")
  if min_history > window:
    raise ValueError(f"`min_history` ({min_history}) must be <= `window` ({window})")
  if not (spike_threshold > 0 and shift_threshold > 0):
    raise ValueError("`spike_threshold` and `shift_threshold` must be > 0, got "
                     f"{spike_threshold!r}, {shift_threshold!r}")
  if not isinstance(eos_window, int) or eos_window < 0:
    raise ValueError(f"`eos_window` must be an int >= 0 (0 = off), got {eos_window!r}")
  if not (len(eos_band) == 2 and 0 <= eos_band[0] <= 1 <= eos_band[1]):
    raise ValueError("`eos_band` must be (low, high) fractions of `lr_sharpness_limit` with "
                     f"0 <= low <= 1 <= high, got {eos_band!r}")
  if not (eos_max_loss_ratio > 1 and eos_rise > 1):
    raise ValueError("`eos_max_loss_ratio` and `eos_rise` must be > 1, got "
                     f"{eos_max_loss_ratio!r}, {eos_rise!r}")


def _streams(*values):
  """(x, present): the (3,) float32 stream values (NaN for a missing one) and which were given."""
  vals, present = [], []
  for v in values:
    present.append(v is not None)
    vals.append(jnp.float32(jnp.nan) if v is None else jnp.asarray(v, jnp.float32))
  return jnp.stack(vals), jnp.asarray(present)


def _since(hit, old):
  """A "steps since" counter: 0 on a hit, else one more (saturating at :data:`NEVER`)."""
  return jnp.where(hit, 0, jnp.minimum(old + 1, NEVER)).astype(jnp.int32)


def _window_scores(state: AnomalyState, x, present, *, window, short_window, min_history):
  """(spike z, the history with this step written, shift z) of the three streams.

  Spike: this step's robust z against the previous ``window`` values; shift: the robust z of
  the median of the last ``short_window`` values (this one included) against the same
  window. NaN while a stream has fewer than ``min_history`` finite values, or is missing.
  """
  hist = state.history
  finite = jnp.isfinite(x)
  enough = jnp.sum(jnp.isfinite(hist), axis=0) >= min_history
  spike_z = jnp.where(enough & present, robust_zscore(x, hist), jnp.nan)
  new_hist = hist.at[state.position].set(jnp.where(finite & present, x, jnp.nan))
  recent_idx = (state.position - jnp.arange(short_window)) % window
  short_med = jnp.nanmedian(new_hist[recent_idx], axis=0)
  shift_z = jnp.where(enough & present, robust_zscore(short_med, hist), jnp.nan)
  return spike_z, new_hist, shift_z


def _edge_context(state: AnomalyState, s, measured, *, min_history, eos_rise, edge_lo, edge_hi,
                  eos_window):
  """(steps since the edge, last measured η·λ_c, whether the edge context holds).

  At the edge: η·λ_c measured in the band [edge_lo, edge_hi] or risen ``eos_rise``-fold above
  its window median; the context holds within ``eos_window`` steps of that (this one
  included) while the last measured η·λ_c is not beyond the band.
  """
  lr_hist = state.lr_history
  rising = ((jnp.sum(jnp.isfinite(lr_hist)) >= min_history)
            & (s >= eos_rise * jnp.nanmedian(lr_hist)))  # NaN median compares False
  steps_since_edge = _since(measured & ((s >= edge_lo) | rising) & (s <= edge_hi),
                            state.steps_since_edge)
  last = jnp.where(measured, s, state.last_lr_sharpness)
  edge = (steps_since_edge < eos_window) & ~(last > edge_hi)
  return steps_since_edge, last, edge


def _classify(reason, edge, loss_history, loss_present, loss, *, eos_max_loss_ratio):
  """(oscillation, its reason bits, the remaining anomaly bits) of one step.

  In the edge context, spike / shift / sustained-η·λ_c bits are edge-of-stability
  oscillation, unless the loss is far above its window median (a fault even at the edge; a
  NaN median, before any history, sets no cap). Non-finite bits always stay anomalies.
  """
  classified = REASON_SPIKE | REASON_LEVEL_SHIFT | REASON_UNSTABLE_LR  # may be oscillation
  med_loss = jnp.nanmedian(loss_history)
  too_high = loss_present & (loss > med_loss + (eos_max_loss_ratio - 1) * jnp.abs(med_loss))
  oscillation = edge & ~too_high & ((reason & classified) != 0)
  eos_reason = jnp.where(oscillation, reason & classified, 0).astype(jnp.int32)
  reason = jnp.where(oscillation, reason & ~classified, reason).astype(jnp.int32)
  return oscillation, eos_reason, reason


def _initial_state(window: int) -> AnomalyState:
  never = jnp.int32(NEVER)
  return AnomalyState(count=jnp.int32(0),
                      history=jnp.full((window, 3), jnp.nan, jnp.float32),
                      lr_history=jnp.full((window,), jnp.nan, jnp.float32),
                      position=jnp.int32(0), unstable_run=jnp.int32(0),
                      total_flagged=jnp.int32(0),
                      last_lr_sharpness=jnp.float32(jnp.nan), steps_since_edge=never,
                      steps_since_level_shift=never, steps_since_lr_above_limit=never,
                      eos_run=jnp.int32(0), total_eos=jnp.int32(0), info=_empty_info())


def anomaly_detector(
    *,
    window: int = 64,
    short_window: int = 8,
    spike_threshold: float = 6.0,
    shift_threshold: float = 4.0,
    min_history: int = 16,
    lr_sharpness_limit: float = 2.0,
    sustain: int = 20,
    eos_window: int = 32,
    eos_band: tuple[float, float] = (0.25, 1.25),
    eos_rise: float = 10.0,
    eos_max_loss_ratio: float = 100.0,
) -> AnomalyDetector:
  """Streaming anomaly detector over (loss, grad norm, update norm, η·λ_c); O(window) memory.

  ``update(state, *, loss, grad_norm=None, update_norm=None, lr_sharpness=None)`` — scalars.
  A stream passed as None is *missing*: not checked and not recorded. Non-finite loss, grad
  norm or update norm sets ``REASON_NONFINITE`` and is stored as NaN (ignored by the window
  statistics, so one NaN does not contaminate the baseline). A NaN ``lr_sharpness`` means
  "not measured this step" (the curvature probes report NaN on skipped steps): the sustained
  run counter holds. Spike and shift tests start once a stream has ``min_history`` finite
  values; before that their z-scores are NaN.

  Args:
    window: length of the long window (the baseline).
    short_window: length of the short window for level shifts (≤ window).
    spike_threshold: robust z above which one value is a spike (default 6: a Gaussian stream
      exceeds it with probability 1e-9 per step; heavy tails raise the rate).
    shift_threshold: robust z of the short-window median above which the level has shifted.
    min_history: finite values needed before spike / shift tests.
    lr_sharpness_limit: the η·λ_c limit (2 for the loss-rise criterion).
    sustain: consecutive measured steps above the limit before ``REASON_UNSTABLE_LR``.
    eos_window: steps after a measured η·λ_c at the edge (in the band or rising) during
      which spikes, shifts and sustained η·λ_c > limit are edge-of-stability oscillation
      (module docstring); 0 turns the classification off (every one is an anomaly). Without
      an ``lr_sharpness`` stream the context never holds.
    eos_band: (low, high) fractions of ``lr_sharpness_limit``: the edge band of η·λ_c.
    eos_rise: a measured η·λ_c at least this multiple of the median of the window's
      measured values (once it holds ``min_history`` of them) is at the edge too.
    eos_max_loss_ratio: a loss above this multiple of the window median is an anomaly even
      in the edge context.

  Returns:
    An :class:`AnomalyDetector` of pure, jit-able closures.
  """
  _check_detector_args(window=window, short_window=short_window, min_history=min_history,
                       sustain=sustain, spike_threshold=spike_threshold,
                       shift_threshold=shift_threshold, eos_window=eos_window,
                       eos_band=eos_band, eos_rise=eos_rise,
                       eos_max_loss_ratio=eos_max_loss_ratio)
  edge_lo = float(eos_band[0]) * lr_sharpness_limit
  edge_hi = float(eos_band[1]) * lr_sharpness_limit

  def init_fn() -> AnomalyState:
    return _initial_state(window)

  def update_fn(state: AnomalyState, *, loss=None, grad_norm=None, update_norm=None,
                lr_sharpness=None) -> AnomalyState:
    x, present = _streams(loss, grad_norm, update_norm)
    finite = jnp.isfinite(x)
    nonfinite = jnp.any(present & ~finite)

    hist = state.history
    spike_z, new_hist, shift_z = _window_scores(state, x, present, window=window,
                                                short_window=short_window,
                                                min_history=min_history)
    spike = jnp.any(finite & (spike_z > spike_threshold))
    shift = jnp.any(jnp.isfinite(shift_z) & (shift_z > shift_threshold))

    s = jnp.float32(jnp.nan) if lr_sharpness is None else jnp.asarray(lr_sharpness,
                                                                        jnp.float32)
    measured = jnp.isfinite(s)  # NaN: not measured this step, the counters hold
    run = jnp.where(measured, jnp.where(s > lr_sharpness_limit, state.unstable_run + 1, 0),
                    state.unstable_run)
    unstable = run >= sustain

    reason = (jnp.where(nonfinite, REASON_NONFINITE, 0) | jnp.where(spike, REASON_SPIKE, 0)
              | jnp.where(shift, REASON_LEVEL_SHIFT, 0)
              | jnp.where(unstable, REASON_UNSTABLE_LR, 0)).astype(jnp.int32)

    lr_hist = state.lr_history
    steps_since_edge, last, edge = _edge_context(state, s, measured, min_history=min_history,
                                                 eos_rise=eos_rise, edge_lo=edge_lo,
                                                 edge_hi=edge_hi, eos_window=eos_window)
    oscillation, eos_reason, reason = _classify(reason, edge, hist[:, 0], present[0], x[0],
                                                eos_max_loss_ratio=eos_max_loss_ratio)
    flag = reason != 0
    eos_run = jnp.where(oscillation, state.eos_run + 1, 0).astype(jnp.int32)
    since_shift = _since(jnp.isfinite(shift_z[0]) & (shift_z[0] > shift_threshold),
                        state.steps_since_level_shift)
    since_above = _since(measured & (s > lr_sharpness_limit), state.steps_since_lr_above_limit)

    info = AnomalyInfo(flag=flag, reason=reason, spike_z=spike_z, shift_z=shift_z,
                       unstable_run=run.astype(jnp.int32), eos=oscillation,
                       eos_reason=eos_reason, edge=edge, eos_run=eos_run,
                       steps_since_level_shift=since_shift,
                       steps_since_lr_above_limit=since_above)
    return AnomalyState(count=optax.safe_increment(state.count), history=new_hist,
                        lr_history=lr_hist.at[state.position].set(jnp.where(measured, s,
                                                                            jnp.nan)),
                        position=(state.position + 1) % window,
                        unstable_run=run.astype(jnp.int32),
                        total_flagged=state.total_flagged + flag.astype(jnp.int32),
                        last_lr_sharpness=last, steps_since_edge=steps_since_edge,
                        steps_since_level_shift=since_shift,
                        steps_since_lr_above_limit=since_above, eos_run=eos_run,
                        total_eos=state.total_eos + oscillation.astype(jnp.int32), info=info)

  return AnomalyDetector(init=init_fn, update=update_fn)


# ----------------------------------------------------------------------------- optax guard


class AnomalyGuardInfo(NamedTuple):
  """Diagnostics of the guard's last step.

  Attributes:
    flag, reason: the detector's verdict (see :class:`AnomalyInfo`).
    skipped: whether this step's update was replaced by zeros.
    grad_norm: global norm of the incoming updates; update_norm: of the inner's output.
    spike_z: (3,) the detector's robust z-scores.
  """

  flag: jax.Array
  reason: jax.Array
  skipped: jax.Array
  grad_norm: jax.Array
  update_norm: jax.Array
  spike_z: jax.Array


class AnomalyGuardState(NamedTuple):
  """State of :func:`anomaly_guard` (field names follow ``optax.ApplyIfFiniteState``)."""

  consecutive_skips: jax.Array
  total_skipped: jax.Array
  detector: AnomalyState
  inner_state: PyTree
  info: AnomalyGuardInfo


def anomaly_guard(
    inner: optax.GradientTransformation | None = None,
    *,
    skip_on: int = REASON_NONFINITE,
    max_consecutive_skips: int = 5,
    detector: AnomalyDetector | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer and skips anomalous steps, like ``optax.apply_if_finite``.

  Each step the incoming updates (the gradients, when the guard wraps the whole optimizer)
  go through ``inner``; the detector sees the loss (optax's ``value`` extra arg), the
  gradient's global norm, the inner update's global norm and, when given, the extra arg
  ``lr_sharpness`` (η·λ_c). If the detector's reason intersects ``skip_on`` the guard
  returns zero updates and keeps the inner state unchanged — parameters and optimizer moments
  stay at their last good values — unless this is more than ``max_consecutive_skips``
  anomalous steps in a row, when it gives up and applies the update (the semantics of
  ``apply_if_finite``'s ``max_consecutive_errors``; ``total_skipped`` never resets). The
  verdict is in ``state.info`` (use ``info.flag`` to trigger an emergency checkpoint). With
  ``lr_sharpness`` given, spikes classified as edge-of-stability oscillation (module docstring)
  are not anomalies, so they are never skipped.

  Wrap the optimizer rather than appending the guard to a chain: a guard placed after Adam
  would zero the update but leave the NaN in Adam's moments::

    tx = anomaly_guard(optax.adam(1e-3), skip_on=REASON_NONFINITE | REASON_SPIKE)
    updates, state = tx.update(grads, state, params, value=loss)

  Differences from ``apply_if_finite``: the inner update is always computed and then selected
  (``jnp.where``), because the verdict needs its norm; non-finite values are judged on the
  loss and the norms, which are non-finite exactly when some leaf is.

  Args:
    inner: the transformation to protect (default ``optax.identity()``).
    skip_on: bit mask of ``REASON_*`` that cause a skip (default non-finite only; add
      ``REASON_SPIKE`` to also skip spikes).
    max_consecutive_skips: skips in a row before giving up.
    detector: an :func:`anomaly_detector` (default settings when None).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; unknown extra args pass through to
    ``inner``.
  """
  if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 0:
    raise ValueError(f"`max_consecutive_skips` must be an int >= 0, got "
                     f"{max_consecutive_skips!r}")
  valid = sum(REASON_NAMES)
  if not isinstance(skip_on, int) or skip_on & ~valid:
    raise ValueError(f"`skip_on` must be a bit mask of REASON_* ({REASON_NAMES}), got "
                     f"{skip_on!r}")
  inner = optax.with_extra_args_support(optax.identity() if inner is None else inner)
  detector = anomaly_detector() if detector is None else detector

  def init_fn(params):
    nan = jnp.float32(jnp.nan)
    return AnomalyGuardState(
        consecutive_skips=jnp.int32(0), total_skipped=jnp.int32(0), detector=detector.init(),
        inner_state=inner.init(params),
        info=AnomalyGuardInfo(flag=jnp.bool_(False), reason=jnp.int32(0),
                              skipped=jnp.bool_(False), grad_norm=nan, update_norm=nan,
                              spike_z=jnp.full((3,), jnp.nan, jnp.float32)))

  def update_fn(updates, state, params=None, *, value=None, lr_sharpness=None, **extra_args):
    if value is not None:
      extra_args["value"] = value
    candidate, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    grad_norm = optax.tree.norm(updates).astype(jnp.float32)
    update_norm = optax.tree.norm(candidate).astype(jnp.float32)
    det = detector.update(state.detector, loss=value, grad_norm=grad_norm,
                          update_norm=update_norm, lr_sharpness=lr_sharpness)
    bad = (det.info.reason & skip_on) != 0
    consecutive = jnp.where(bad, optax.safe_increment(state.consecutive_skips), 0)
    skip = bad & (consecutive <= max_consecutive_skips)
    out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), candidate)
    kept = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_inner,
                        state.inner_state)
    info = AnomalyGuardInfo(flag=det.info.flag, reason=det.info.reason, skipped=skip,
                            grad_norm=grad_norm, update_norm=update_norm,
                            spike_z=det.info.spike_z)
    return out, AnomalyGuardState(
        consecutive_skips=consecutive.astype(jnp.int32),
        total_skipped=state.total_skipped + skip.astype(jnp.int32), detector=det,
        inner_state=kept, info=info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- probes


def _samples(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 1:
    return x[:, None]
  return x.reshape(-1, x.shape[-1])


def activation_entropy(activations: jax.Array, *, method: str = "gaussian", bins: int = 64,
                       min_std: float = 1e-6) -> jax.Array:
  r"""Differential entropy (nats) of one layer's activations; units on the last axis.

  All leading axes are samples (batch, positions). Methods:

  * ``"gaussian"`` (default): mean over units of the entropy of a Gaussian with each unit's
    variance, :math:`\tfrac12\log(2\pi e\,\sigma_u^2)` — cheap, exact for Gaussian units,
    an upper bound on each unit's entropy otherwise.
  * ``"gaussian_joint"``: :math:`\tfrac12\log\det(2\pi e\,\Sigma)` of the full covariance
    (ridge ``min_std²``): total entropy, which falls when units become correlated / collapse.
  * ``"histogram"``: mean over units of the plug-in estimate on ``bins`` equal-width bins over
    the unit's range, :math:`-\sum_k p_k\log p_k + \log w` (bias O(bins/N)).

  Standard deviations are floored at ``min_std`` so a dead unit contributes a finite
  :math:`\log(\text{min\_std})` rather than −∞. Map over layers with ``jax.tree.map``.
  NaN anywhere in the layer gives NaN.
  """
  if method not in ("gaussian", "gaussian_joint", "histogram"):
    raise ValueError(f"`method` must be 'gaussian', 'gaussian_joint' or 'histogram', "
                     f"got {method!r}")
  x = _samples(activations)
  has_nan = jnp.any(jnp.isnan(x))
  c = 0.5 * jnp.log(2 * jnp.pi * jnp.e)
  if method == "gaussian":
    std = jnp.maximum(jnp.std(x, axis=0), min_std)
    h = jnp.mean(c + jnp.log(std))
  elif method == "gaussian_joint":
    d = x.shape[1]
    xc = x - jnp.mean(x, axis=0)
    cov = xc.T @ xc / x.shape[0] + (min_std ** 2) * jnp.eye(d)
    h = d * c + 0.5 * jnp.linalg.slogdet(cov)[1]
  else:
    if not isinstance(bins, int) or bins < 2:
      raise ValueError(f"`bins` must be an int >= 2, got {bins!r}")
    lo, hi = jnp.min(x, axis=0), jnp.max(x, axis=0)
    width = jnp.maximum((hi - lo) / bins, min_std)
    idx = jnp.clip(jnp.floor((x - lo) / width), 0, bins - 1).astype(jnp.int32)
    counts = jax.vmap(lambda i: jnp.bincount(i, length=bins), in_axes=1)(idx)
    p = counts / x.shape[0]
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    h = jnp.mean(-jnp.sum(plogp, axis=1) + jnp.log(width))
  return jnp.where(has_nan, jnp.nan, h)


def activation_distance(x: jax.Array, y: jax.Array, *, method: str = "sliced_wasserstein",
                        num_projections: int = 128, bandwidth: float | None = None,
                        key: jax.Array | None = None) -> jax.Array:
  r"""Distance between two activation distributions (e.g. one layer at two checkpoints).

  Rows are samples, the last axis the units (leading axes are flattened).

  * ``"sliced_wasserstein"``: :math:`SW_2 = (\mathbb E_\theta W_2^2(\theta^\top x,
    \theta^\top y))^{1/2}` over ``num_projections`` random unit directions θ (``key``, default
    ``jax.random.key(0)``); each 1-D :math:`W_2` compares quantiles at a common grid of
    max(N, M) levels. For a pure shift by v it equals :math:`|v|/\sqrt{D}` in expectation over θ.
  * ``"mmd"``: unbiased :math:`\mathrm{MMD}^2` with the Gaussian kernel
    :math:`\exp(-|a-b|^2/2h^2)`, h = ``bandwidth`` or the median pairwise distance of the pooled
    samples (Gretton et al. 2012). Near 0 (and possibly slightly negative) for equal
    distributions. O((N+M)²) memory.

  NaN in either input gives NaN.
  """
  if method not in ("sliced_wasserstein", "mmd"):
    raise ValueError(f"`method` must be 'sliced_wasserstein' or 'mmd', got {method!r}")
  x, y = _samples(x), _samples(y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"`x` and `y` must have the same number of units, got {x.shape[1]} "
                     f"and {y.shape[1]}")
  has_nan = jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y))
  if method == "sliced_wasserstein":
    key = jax.random.key(0) if key is None else key
    theta = jax.random.normal(key, (x.shape[1], num_projections), jnp.float32)
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px, py = x @ theta, y @ theta
    if x.shape[0] == y.shape[0]:
      qx, qy = jnp.sort(px, axis=0), jnp.sort(py, axis=0)
    else:
      n = max(x.shape[0], y.shape[0])
      levels = (jnp.arange(n) + 0.5) / n
      qx, qy = jnp.quantile(px, levels, axis=0), jnp.quantile(py, levels, axis=0)
    out = jnp.sqrt(jnp.mean((qx - qy) ** 2))
  else:
    z = jnp.concatenate([x, y])
    sq = jnp.sum(z * z, 1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    if bandwidth is None:
      n_all = z.shape[0]
      off = d2[jnp.triu_indices(n_all, 1)]
      h2 = jnp.maximum(jnp.median(off), 1e-12)  # (median distance)²
    else:
      h2 = jnp.float32(bandwidth) ** 2
    k = jnp.exp(-d2 / (2 * h2))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    out = ((jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
           + (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1)) - 2 * jnp.mean(kxy))
  return jnp.where(has_nan, jnp.nan, out)


def _past_windows(x: jax.Array, window: int) -> jax.Array:
  # Row t holds x[t-window .. t-1] (NaN before the start): the history before step t.
  t = x.shape[0]
  idx = jnp.arange(t)[:, None] - window + jnp.arange(window)[None, :]
  return jnp.where(idx >= 0, x[jnp.clip(idx, 0, t - 1)], jnp.nan)


class MappingConsistency(NamedTuple):
  """Result of :func:`mapping_consistency` (arrays of the series' length T)."""

  ratio: jax.Array
  z: jax.Array
  outside: jax.Array
  alarm: jax.Array


def mapping_consistency(loss: jax.Array, feature_drift: jax.Array, *, window: int = 20,
                        threshold: float = 3.0, patience: int = 3,
                        eps: float = 1e-8) -> MappingConsistency:
  r"""Loss decrease per unit of feature movement, against its own history.

  :math:`r_t = (L_{t-1} - L_t) / (d_t + \epsilon)` with :math:`d_t` the distance between the
  intermediate-layer features at t−1 and t (e.g. :func:`activation_distance`). Its robust z
  against the previous ``window`` ratios (median / 1.4826·MAD) marks steps ``outside``
  ``threshold``; ``alarm`` fires after ``patience`` consecutive outside steps ("persistently
  deviates from its historical interval"). High r: the loss falls while features stand still
  (fitting on fixed features); low r: features move without paying off in loss.

  NaN loss or drift gives a NaN ratio at that step (and the next, for the loss), which is
  never ``outside`` and is ignored by later windows. ``ratio[0]`` is NaN.
  """
  loss = jnp.asarray(loss, jnp.float32)
  drift = jnp.asarray(feature_drift, jnp.float32)
  if loss.ndim != 1 or loss.shape != drift.shape:
    raise ValueError(f"`loss` and `feature_drift` must be 1-D of equal length, got "
                     f"{loss.shape} and {drift.shape}")
  dec = jnp.concatenate([jnp.full((1,), jnp.nan), loss[:-1] - loss[1:]])
  ratio = dec / (drift + eps)
  past = _past_windows(ratio, window)
  enough = jnp.sum(jnp.isfinite(past), axis=1) >= max(3, window // 2)
  z = jnp.where(enough, jax.vmap(robust_zscore)(ratio, past), jnp.nan)
  outside = jnp.isfinite(z) & (jnp.abs(z) > threshold)

  def body(run, o):
    run = jnp.where(o, run + 1, 0)
    return run, run >= patience

  _, alarm = jax.lax.scan(body, jnp.int32(0), outside)
  return MappingConsistency(ratio=ratio, z=z, outside=outside, alarm=alarm)


class Forecast(NamedTuple):
  """Result of :func:`forecast_performance`.

  Attributes:
    prediction, lower, upper: (H,) fitted curve and bootstrap band at the horizon steps.
    asymptote, asymptote_lower, asymptote_upper: the fitted limit a and its band.
    exponent: the fitted c; params: (a, b, c) of the point fit.
  """

  prediction: jax.Array
  lower: jax.Array
  upper: jax.Array
  asymptote: jax.Array
  asymptote_lower: jax.Array
  asymptote_upper: jax.Array
  exponent: jax.Array


def _fit_power_law(t, y, w, exponents):
  # For each c, (a, b) solve weighted least squares on [1, t^-c]; keep the c with least SSE.
  def one(c):
    x = t ** (-c)
    sw, sx, sy = jnp.sum(w), jnp.sum(w * x), jnp.sum(w * y)
    mx, my = sx / sw, sy / sw
    sxx = jnp.sum(w * (x - mx) ** 2)
    b = jnp.sum(w * (x - mx) * (y - my)) / jnp.maximum(sxx, 1e-30)
    a = my - b * mx
    sse = jnp.sum(w * (y - a - b * x) ** 2)
    return a, b, sse

  a, b, sse = jax.vmap(one)(exponents)
  i = jnp.argmin(jnp.where(jnp.isfinite(sse), sse, jnp.inf))
  return a[i], b[i], exponents[i]


def forecast_performance(steps: jax.Array, values: jax.Array, horizon: jax.Array, *,
                         level: float = 0.9, num_bootstrap: int = 200,
                         key: jax.Array | None = None,
                         exponents: jax.Array | None = None) -> Forecast:
  r"""Extrapolates a metric with a saturating power law and a residual-bootstrap band.

  Model :math:`y(t) = a + b\,t^{-c}`, c > 0 (b < 0: a rising metric saturating at a; b > 0: a
  falling loss). For each c on a log grid (default 64 values in [0.02, 3]) the best (a, b) is
  linear least squares; the c with the smallest residual sum wins (exact and jit-able, no
  optimiser). The band: refit on ``num_bootstrap`` series ŷ + resampled residuals and take
  the central ``level`` quantiles of the predictions — a band for the *curve*, not for a new
  noisy observation; it assumes the power-law form and independent residuals.

  Args:
    steps: (T,) positive step numbers of the observations.
    values: (T,) metric values; non-finite ones are excluded from the fit and the resampling.
    horizon: (H,) steps at which to predict.
    level: central coverage of the band.
    num_bootstrap: bootstrap refits.
    key: PRNG key for the bootstrap (default ``jax.random.key(0)``).
    exponents: the grid of c.

  Returns:
    :class:`Forecast`. With fewer than 3 finite values every field is NaN.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"`level` must lie in (0, 1), got {level!r}")
  t = jnp.asarray(steps, jnp.float32)
  y = jnp.asarray(values, jnp.float32)
  h = jnp.atleast_1d(jnp.asarray(horizon, jnp.float32))
  if t.ndim != 1 or t.shape != y.shape:
    raise ValueError(f"`steps` and `values` must be 1-D of equal length, got {t.shape} and "
                     f"{y.shape}")
  key = jax.random.key(0) if key is None else key
  grid = (jnp.exp(jnp.linspace(math.log(0.02), math.log(3.0), 64))
          if exponents is None else jnp.asarray(exponents, jnp.float32))
  valid = jnp.isfinite(y) & jnp.isfinite(t) & (t > 0)
  w = valid.astype(jnp.float32)
  t_safe = jnp.where(valid, t, 1.0)
  y_safe = jnp.where(valid, y, 0.0)
  a, b, c = _fit_power_law(t_safe, y_safe, w, grid)
  fitted = a + b * t_safe ** (-c)
  resid = jnp.where(valid, y_safe - fitted, 0.0)
  p = w / jnp.maximum(jnp.sum(w), 1.0)

  def boot(k):
    idx = jax.random.choice(k, y.shape[0], (y.shape[0],), p=p)
    ab, bb, cb = _fit_power_law(t_safe, fitted + resid[idx], w, grid)
    return ab + bb * h ** (-cb), ab

  preds, asym = jax.vmap(boot)(jax.random.split(key, num_bootstrap))
  q = jnp.asarray([(1 - level) / 2, (1 + level) / 2])
  band = jnp.quantile(preds, q, axis=0)
  aband = jnp.quantile(asym, q)
  ok = jnp.sum(w) >= 3
  nanify = lambda v: jnp.where(ok, v, jnp.nan)
  return Forecast(prediction=nanify(a + b * h ** (-c)), lower=nanify(band[0]),
                  upper=nanify(band[1]), asymptote=nanify(a),
                  asymptote_lower=nanify(aband[0]), asymptote_upper=nanify(aband[1]),
                  exponent=nanify(c))


class Forgetting(NamedTuple):
  """Result of :func:`detect_forgetting` (arrays of the series' length T).

  ``first_alarm`` is the index of the first alarm, −1 when none.
  """

  envelope: jax.Array
  below: jax.Array
  alarm: jax.Array
  first_alarm: jax.Array
  slope: jax.Array


def detect_forgetting(values: jax.Array, *, fit_steps: int, num_sd: float = 3.0,
                      patience: int = 3, higher_is_better: bool = True) -> Forgetting:
  r"""Flags an old task's proxy falling below an envelope fitted on its history.

  On the first ``fit_steps`` values (the history, e.g. before the new task started) fit a
  line by least squares; its slope is capped at 0 (a historical *forgetting* rate may be
  extrapolated, a historical improvement is not); the envelope is that line minus ``num_sd``
  robust residual SDs (1.4826·MAD, floored at 1e-6·scale). From ``fit_steps`` on, a value below
  the envelope is ``below``, and ``patience`` consecutive ``below`` steps raise ``alarm``.
  With ``higher_is_better=False`` (a loss) the series is negated, so the envelope lies above.

  NaN values are excluded from the fit; a NaN later is never ``below`` and resets the count.
  """
  v = jnp.asarray(values, jnp.float32)
  if v.ndim != 1:
    raise ValueError(f"`values` must be 1-D, got shape {v.shape}")
  if not isinstance(fit_steps, int) or not 3 <= fit_steps <= v.shape[0]:
    raise ValueError(f"`fit_steps` must be an int in [3, len(values)], got {fit_steps!r}")
  sign = 1.0 if higher_is_better else -1.0
  u = sign * v
  t = jnp.arange(v.shape[0], dtype=jnp.float32)
  hu, ht = u[:fit_steps], t[:fit_steps]
  w = jnp.isfinite(hu).astype(jnp.float32)
  hu0 = jnp.where(w > 0, hu, 0.0)
  mt = jnp.sum(w * ht) / jnp.sum(w)
  mu = jnp.sum(w * hu0) / jnp.sum(w)
  slope = jnp.sum(w * (ht - mt) * (hu0 - mu)) / jnp.maximum(jnp.sum(w * (ht - mt) ** 2), 1e-12)
  slope = jnp.minimum(slope, 0.0)
  intercept = mu - slope * mt
  res = jnp.where(w > 0, hu0 - (intercept + slope * ht), jnp.nan)
  med = jnp.nanmedian(res)
  sd = jnp.maximum(_MAD_TO_SD * jnp.nanmedian(jnp.abs(res - med)),
                   1e-6 * jnp.maximum(jnp.abs(mu), 1.0))
  env_u = intercept + slope * t - num_sd * sd
  below = (t >= fit_steps) & jnp.isfinite(u) & (u < env_u)

  def body(run, b):
    run = jnp.where(b, run + 1, 0)
    return run, run >= patience

  _, alarm = jax.lax.scan(body, jnp.int32(0), below)
  first = jnp.where(jnp.any(alarm), jnp.argmax(alarm), -1).astype(jnp.int32)
  return Forgetting(envelope=sign * env_u, below=below, alarm=alarm, first_alarm=first,
                    slope=sign * slope)
