"""experiments.optim: the schedules built from optax pieces equal the closed-form formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config_lib
from experiments import optim

PEAK = 0.3
TOTAL = 100


def _config(**schedule):
  c = config_lib.default_config()
  with c.unlocked():
    c.num_steps = TOTAL
    c.optimizer.learning_rate = PEAK
    for k, v in schedule.items():
      c.schedule[k] = v
  return config_lib.validate_config(c)


def _reference(step, *, name, warmup_steps, end_fraction=0.0, decay_fraction=0.2,
               decay_shape="linear", stage1_end_fraction=0.1):
  """The schedules as closed-form float64 formulas (the hand-written form before optax)."""
  t = np.asarray(step, np.float64)
  w, end = warmup_steps, PEAK * end_fraction
  warm = PEAK * np.minimum(1.0, (t + 1.0) / w) if w > 0 else np.full_like(t, PEAK)
  cosine = lambda frac: end + (PEAK - end) * 0.5 * (1.0 + np.cos(np.pi * frac))
  if name == "constant":
    return warm
  if name == "warmup_cosine":
    decayed = cosine(np.clip((t - w) / max(TOTAL - w, 1), 0.0, 1.0))
  elif name == "two_stage":
    # Stage 1: cosine from PEAK at w to mid at the stage-2 start; stage 2: mid to end.
    start = max(TOTAL - max(1, int(round(decay_fraction * TOTAL))), w)
    mid = PEAK * stage1_end_fraction
    first = mid + (PEAK - mid) * 0.5 * (1.0 + np.cos(np.pi * np.clip(
        (t - w) / max(start - w, 1), 0.0, 1.0)))
    frac = np.clip((t - start) / max(TOTAL - start, 1), 0.0, 1.0)
    second = (mid + (end - mid) * frac if decay_shape == "linear"
              else end + (mid - end) * 0.5 * (1.0 + np.cos(np.pi * frac)))
    decayed = np.where(t < start, first, second)
  else:
    start = max(TOTAL - max(1, int(round(decay_fraction * TOTAL))), w)
    frac = np.clip((t - start) / max(TOTAL - start, 1), 0.0, 1.0)
    decayed = PEAK + (end - PEAK) * frac if decay_shape == "linear" else cosine(frac)
  return np.where(t < w, warm, decayed)


CASES = [
    dict(name="constant", warmup_steps=0),
    dict(name="constant", warmup_steps=7),
    dict(name="warmup_cosine", warmup_steps=0, end_fraction=0.1),
    dict(name="warmup_cosine", warmup_steps=10, end_fraction=0.0),
    dict(name="warmup_stable_decay", warmup_steps=10, decay_fraction=0.2, end_fraction=0.0),
    dict(name="warmup_stable_decay", warmup_steps=0, decay_fraction=0.3, end_fraction=0.1,
         decay_shape="cosine"),
    dict(name="warmup_stable_decay", warmup_steps=90, decay_fraction=0.5, end_fraction=0.05),
    dict(name="two_stage", warmup_steps=10, decay_fraction=0.25, end_fraction=0.0,
         stage1_end_fraction=0.1),
    dict(name="two_stage", warmup_steps=0, decay_fraction=0.3, end_fraction=0.05,
         stage1_end_fraction=0.2, decay_shape="cosine"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_schedule_matches_the_closed_form(case):
  schedule = optim.make_schedule(_config(**case))
  steps = np.arange(TOTAL + 5)
  got = np.array([schedule(jnp.int32(t)) for t in steps])
  assert got.dtype == np.float32
  # float32 evaluation of at most ~6 roundings plus cos (≤ 1 ulp) against float64: 8 ulps of
  # the largest value the schedule takes (PEAK), relative and absolute (values near 0 at the
  # end of a decay to 0 are off by ulps of PEAK, not of themselves).
  tol = 8 * np.finfo(np.float32).eps * PEAK
  np.testing.assert_allclose(got, _reference(steps, **case), rtol=tol / PEAK, atol=tol)
