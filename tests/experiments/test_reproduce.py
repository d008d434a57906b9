"""The reproduction criteria on synthetic curves whose answer is known by construction."""

import math

import numpy as np
import pytest

from experiments import criteria
from experiments import reproduce

STEPS = np.arange(1000, dtype=float)


def test_window_medians_match_numpy_per_window():
  rng = np.random.default_rng(0)
  v = rng.normal(size=STEPS.size)
  centres, med = criteria.window_medians(STEPS, v, num_windows=4)
  # Edges at 0, 249.75, 499.5, 749.25, 999: windows of 250 steps each.
  np.testing.assert_array_equal(med, [np.median(v[i * 250:(i + 1) * 250]) for i in range(4)])
  np.testing.assert_allclose(centres, [124.875, 374.625, 624.375, 874.125])


def test_tail_ratio_of_a_plateau_with_nan_holes():
  v = np.where(STEPS < 500, 10.0, 20.0)
  v[::7] = np.nan  # failed measurements are dropped, not counted
  assert criteria.tail_ratio(STEPS, v, 20.0, tail=0.3) == 1.0
  assert criteria.tail_ratio(STEPS, v, np.full(STEPS.size, 40.0)) == 0.5
  assert math.isnan(criteria.tail_ratio(STEPS, np.full(STEPS.size, np.nan), 1.0))


def test_rise_profile_tells_abrupt_from_gradual():
  abrupt = np.where(STEPS < 620, 0.02, 20.0)
  p = criteria.rise_profile(STEPS, abrupt)
  assert p.start == 0.02 and p.end == 20.0
  # The jump sits inside window 12 (steps 599.4-649.35): its median is already 20.
  assert p.largest_jump_share == 1.0 and 600 <= p.jump_step <= 650
  gradual = 5.0 + 10.0 * STEPS / 999
  q = criteria.rise_profile(STEPS, gradual)
  # A linear ramp over 20 windows: each step between medians is 1/19 of the whole rise.
  assert q.largest_jump_share == pytest.approx(1 / 19, rel=1e-9)
  assert q.rise == pytest.approx(np.median(gradual[-50:]) / np.median(gradual[:50]), rel=1e-12)


def test_first_crossing_and_bad_input():
  assert criteria.first_crossing(STEPS, STEPS ** 0.5, 10.0) == 100.0
  assert math.isnan(criteria.first_crossing(STEPS, np.zeros(STEPS.size), 1.0))
  with pytest.raises(ValueError, match="one length"):
    criteria.tail_ratio(STEPS, STEPS[:-1], 1.0)
  with pytest.raises(ValueError, match="tail"):
    criteria.tail_ratio(STEPS, STEPS, 1.0, tail=0.0)


def _rows(lam_max, lam_dir, lam_c, lr=0.1):
  return [{"step": int(s), "train/lr": lr, "curv/lambda_max": float(a),
           "curv/directional_sharpness": float(b), "curv/critical_sharpness": float(c),
           "curv/num_evals": 3} for s, a, b, c in zip(STEPS, lam_max, lam_dir, lam_c)]


def test_batch_size_judge_accepts_the_published_shape_and_rejects_others():
  jump = np.where(STEPS < 620, 0.02, 20.0)
  ramp = 4.0 + 8.0 * STEPS / 999
  rows = {"full": _rows(np.full(STEPS.size, 20.5), jump, jump), "medium": _rows(ramp, ramp, ramp),
          "small": _rows(ramp, ramp, ramp)}
  text, ok = reproduce.REPRODUCTIONS["batch_size"].judge(rows)
  assert ok, text
  rows["small"] = rows["full"]  # abrupt at small batch: not the paper's picture
  assert reproduce.REPRODUCTIONS["batch_size"].judge(rows)[1] == "partly"
  rows["full"] = rows["medium"]  # no abrupt rise at full batch
  assert reproduce.REPRODUCTIONS["batch_size"].judge(rows)[1] is False


def test_lr_sweep_judge():
  rows = {f"lr{lr:g}": _rows(np.full(STEPS.size, 2.0 / lr), STEPS, STEPS, lr=lr)
          for lr in reproduce.LEARNING_RATES}
  assert reproduce.REPRODUCTIONS["lr_sweep"].judge(rows)[1]
  rows["lr0.08"] = _rows(np.full(STEPS.size, 12.5), STEPS, STEPS, lr=0.08)  # half of 2/η
  text, ok = reproduce.REPRODUCTIONS["lr_sweep"].judge(rows)
  assert not ok and "η=0.08: λ_max/(2/η) = 0.50" in text
