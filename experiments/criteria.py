r"""Quantitative criteria that turn a published figure's claim into a number and a verdict.

A sharpness curve "plateaus at 2/η", "stays flat then rises abruptly" or "rises gradually": each
claim of Cohen et al. 2021 (arXiv 2103.00065) and Kalra et al. 2026 (arXiv 2601.16979, Fig. 2)
is read here from windowed medians of the measured series, so that one noisy step cannot decide
a verdict. Pure NumPy on ``(steps, values)`` arrays; non-finite values are dropped (a probe that
reports NaN or a failed status has no value at that step). Every function returns the measured
figures; the thresholds that turn them into a yes/no are arguments, stated where they are used
(``experiments/reproduce.py``), fixed before the runs they judge.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _finite(steps, values) -> tuple[np.ndarray, np.ndarray]:
  steps = np.asarray(steps, dtype=np.float64)
  values = np.asarray(values, dtype=np.float64)
  if steps.shape != values.shape or steps.ndim != 1:
    raise ValueError(f"steps and values must be 1-D of one length, got {steps.shape} and "
                     f"{values.shape}.")
  keep = np.isfinite(values) & np.isfinite(steps)
  return steps[keep], values[keep]


def window_medians(steps, values, num_windows: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """Medians of ``values`` over ``num_windows`` equal spans of the step range.

  Returns ``(centres, medians)``; a window without a finite value gets NaN.
  """
  if num_windows < 2:
    raise ValueError(f"num_windows must be >= 2, got {num_windows}.")
  s, v = _finite(steps, values)
  if s.size == 0:
    raise ValueError("no finite values to summarise.")
  edges = np.linspace(s.min(), s.max(), num_windows + 1)
  idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, num_windows - 1)
  med = np.array([np.median(v[idx == w]) if np.any(idx == w) else np.nan
                  for w in range(num_windows)])
  return 0.5 * (edges[:-1] + edges[1:]), med


def tail_ratio(steps, values, threshold, tail: float = 0.3) -> float:
  """Median of ``values / threshold`` over the last ``tail`` fraction of the steps.

  ``threshold`` is a scalar or an array aligned with ``values`` (e.g. 2/η(t) under a schedule).
  "λ_max plateaus at 2/η" reads as this ratio close to 1.
  """
  if not 0.0 < tail <= 1.0:
    raise ValueError(f"tail must be in (0, 1], got {tail}.")
  values = np.asarray(values, dtype=np.float64) / np.asarray(threshold, dtype=np.float64)
  s, r = _finite(steps, values)
  if s.size == 0:
    return float("nan")
  cut = s.max() - tail * (s.max() - s.min())
  return float(np.median(r[s >= cut]))


class RiseProfile(NamedTuple):
  """How a series moves from its start to its end level (windowed medians).

  Attributes:
    start: median of the first window.
    end: median of the last window.
    rise: ``end / start``.
    largest_jump_share: the largest increase between two consecutive windows as a share of
      the whole increase ``end - start`` (1 = all of it at once; NaN if it did not rise).
    jump_step: the step (window centre) where that largest increase lands.
  """
  start: float
  end: float
  rise: float
  largest_jump_share: float
  jump_step: float


def rise_profile(steps, values, num_windows: int = 20) -> RiseProfile:
  """Summarises whether a series rose, and whether abruptly or gradually.

  An abrupt rise (full-batch λ_c in Kalra et al. 2026, Fig. 2: flat, then up to 2/η at once)
  has most of its increase between two neighbouring windows; a gradual one (small batch)
  spreads it over many.
  """
  centres, med = window_medians(steps, values, num_windows)
  ok = np.isfinite(med)
  if ok.sum() < 2:
    raise ValueError("need finite values in at least two windows.")
  c, m = centres[ok], med[ok]
  start, end = float(m[0]), float(m[-1])
  diffs = np.diff(m)
  j = int(np.argmax(diffs))
  total = end - start
  share = float(diffs[j] / total) if total > 0 else float("nan")
  rise = end / start if start > 0 else float("inf")
  return RiseProfile(start, end, float(rise), share, float(c[j + 1]))


def first_crossing(steps, values, level) -> float:
  """The first step at which ``values >= level`` (NaN if never)."""
  s, v = _finite(steps, values)
  hit = np.nonzero(v >= level)[0]
  return float(s[hit[0]]) if hit.size else float("nan")
