"""convergence.Monitor's host side: actions, caps, the tier policy, the checkpointed state.

The jitted update (detector, evidence, network) is exercised end to end by the README's
hand-written loop (tests/test_readme_examples.py) and by the runner's monitor tests
(tests/experiments/test_experiment_monitor.py); here every decision is checked against the
rule written out by hand, with no compilation.
"""

import math

import numpy as np
import pytest

import convergence
from convergence import _monitor

NAN = float("nan")


def _monitor_of(**kw):
  return convergence.Monitor(
      [convergence.MonitoredMetric("train/loss", "functional", short=2, long=10, history=4)],
      **kw)


def _row(loss=1.0, reason=0, p=0.1, decision=0):
  return {"train/loss": loss, "monitor/anomaly_reason": reason, "monitor/p_converged": p,
          "monitor/decision": decision}


def test_tier_level_follows_the_thresholds():
  t = (0.4, 0.6)
  cases = [(0.1, 0, 0), (0.4, 0, 1), (0.59, 0, 1), (0.6, 0, 2), (0.95, 0, 2), (0.2, 1, 3)]
  for p, decision, level in cases:
    assert convergence.tier_level(p, decision, t) == level, (p, decision)


def test_actions_emergency_rollback_stop_and_their_caps():
  mon = _monitor_of(rollback_on=("nonfinite",), max_emergency_saves=1, max_rollbacks=1)
  nonfinite, spike = convergence.REASON_NONFINITE, convergence.REASON_SPIKE
  host = mon.init_host()
  a = mon.decide(host, _row(NAN, nonfinite))
  assert (a.emergency_save, a.rollback, a.stop) == (True, True, False)
  assert a.code == convergence.ACTION_EMERGENCY_SAVE | convergence.ACTION_ROLLBACK
  host = mon.commit(host, a)
  assert (host.emergency_saves, host.rollbacks) == (1, 1)
  # Both caps used: the next non-finite loss neither saves nor rolls back, it stops.
  a = mon.decide(host, _row(NAN, nonfinite))
  assert (a.emergency_save, a.rollback, a.stop, a.code) == (False, False, True,
                                                            convergence.ACTION_STOP)
  # A spike is in emergency_on (default) but not in rollback_on; no manager: no save.
  a = mon.decide(mon.init_host(), _row(3.0, spike), can_save=False)
  assert (a.emergency_save, a.rollback, a.stop, a.code) == (False, False, False, 0)
  a = mon.decide(mon.init_host(), _row(3.0, spike))
  assert (a.emergency_save, a.rollback, a.stop) == (True, False, False)
  # Without rollback_on a non-finite loss stops after the emergency save.
  a = _monitor_of().decide(mon.init_host(), _row(math.inf, nonfinite))
  assert (a.emergency_save, a.rollback, a.stop) == (True, False, True)


def test_release_is_given_once_per_upward_crossing():
  mon = _monitor_of(threshold=0.9, tier_thresholds=(0.4, 0.6))
  host = mon.init_host()
  steps = []  # (posterior, decision) → (tier of a save now, promotion target)
  for p, decision in [(0.1, 0), (0.5, 0), (0.95, 1), (0.95, 1), (0.7, 0), (0.95, 1)]:
    host = mon.commit(host, mon.decide(host, _row(p=p, decision=decision)))
    host, target = mon.promotion(host)
    if target is not None:
      host = mon.saved(host, target)
    tier = mon.save_tier(host)
    steps.append((tier, target))
    if p == 0.1:  # the first save, preliminary
      host = mon.saved(host, tier)
  # 0.5 promotes the preliminary save to observation; converged promotes it to release;
  # while converged later saves are candidates; after falling to 0.7 (candidate, no
  # promotion: the newest is a release) a new crossing releases again.
  assert steps == [(0, None), (1, 1), (2, 3), (2, None), (2, None), (3, None)]


def test_pack_round_trip_with_the_host_counters():
  mon = _monitor_of()
  state = {"a": np.arange(3, dtype=np.float32), "b": np.int32(7)}
  host = convergence.HostState(newest_tier=2, released=1, emergency_saves=3, rollbacks=1,
                               level=2)
  packed = mon.pack(state, host)
  assert sorted(packed) == ["float32", "int32"]
  np.testing.assert_array_equal(packed["int32"], [7, 2, 1, 3, 1])  # state leaves, then host
  back, back_host = mon.unpack(packed, state)
  np.testing.assert_array_equal(back["a"], state["a"])
  assert int(back["b"]) == 7
  assert back_host == host._replace(level=0)  # the level is decided anew each step
  with pytest.raises(ValueError, match="int32 entries"):
    _monitor.unpack({"float32": packed["float32"], "int32": np.append(packed["int32"], 0)},
                    (state, (np.int32(0),) * 4))


def test_bad_arguments_fail_at_the_boundary():
  with pytest.raises(ValueError, match="rollback_on"):
    _monitor_of(emergency_on=("spike",), rollback_on=("nonfinite",))
  with pytest.raises(ValueError, match="tier_thresholds"):
    _monitor_of(tier_thresholds=(0.7, 0.5))
  with pytest.raises(ValueError, match="not in"):
    convergence.reason_mask(["nan"])
  with pytest.raises(ValueError, match="at least one"):
    convergence.Monitor([])
