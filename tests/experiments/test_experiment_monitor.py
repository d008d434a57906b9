"""The runner's convergence monitor (issue 3 §5–7): anomalies, emergency checkpoints, rollback, tiers.

One straight run of the edge-of-stability smoke config (16 steps, short evidence windows so the
posterior moves within the run) is the reference; two runs with ``debug.nan_at_step=7`` (the
loss and gradients of step 7 become NaN inside the jitted step) check that the anomaly is
flagged at step 7, that the emergency checkpoint holds the state before the poisoned update
(bit for bit the straight run's checkpoint at step 7), that without rollback the run stops
with TrainingDiverged after writing it, and that with rollback it skips the update and
finishes with a finite loss. A persistent compilation cache (as in test_experiment_resume)
lets the second NaN run reuse the first one's executables.
"""

import json
import os

import jax
import numpy as np
import pytest

import convergence
from experiments import checkpointing
from experiments import config_lib
from experiments import monitoring
from experiments import trainer

pytestmark = pytest.mark.usefixtures("compile_cache")
NAN_STEP = 7
# Short windows: the evidence baseline exists after 8 steps, so the posterior moves in 16.
# threshold / tier_thresholds are low enough for this run's P(converged) ≈ 0.53 at step 7 to
# ask for a release, which promotes checkpoint 7 (saved as preliminary one step earlier).
# probe.directional is off: the NaN knob's `where` may change how XLA fuses its HVP (last bits).
BASE = {"num_steps": 16, "progress_bar": False, "plots": False, "probe.lanczos_every": 0,
        "probe.directional": False,
        "eval_every": 4, "schedule.warmup_steps": 3, "monitor.short_window": 2,
        "monitor.long_window": 20, "monitor.history": 8, "monitor.half_life": 5.0,
        "monitor.threshold": 0.5, "monitor.tier_thresholds": (0.3, 0.45)}


def _config(**overrides):
  return config_lib.load_config("configs/edge_of_stability.py:smoke", {**BASE, **overrides})


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return f.read().splitlines()


def _audit(workdir):
  with open(os.path.join(workdir, "audit.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]  # every line must parse (strict JSON: no NaN)


def _restore(config, workdir, step):
  mgr = checkpointing.make_manager(config, workdir)
  try:
    return mgr.restore(step), mgr.record(step)
  finally:
    mgr.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The reference run: checkpoints at 3 (end of warmup), 7, 14 and 16; plots on."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = _config(**{"checkpoint.every": NAN_STEP, "plots": True})
  summary = trainer.train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_monitor_metrics_promotions_audit_log_and_report(straight):
  config, workdir, summary = straight
  assert summary["jit_compilations"] == 1  # the monitor update compiles once too
  rows = [json.loads(r) for r in _rows(workdir)]
  for key in ("monitor/p_structural", "monitor/p_functional", "monitor/p_generalisation",
              "monitor/p_converged", "monitor/decision", "monitor/conflict",
              "monitor/anomaly", "monitor/tier", "monitor/action",
              "monitor/strength/train/loss", "monitor/direction/eval/loss"):
    assert key in rows[NAN_STEP], key
  assert not any(r.get("monitor/anomaly") for r in rows)

  # Stage boundary (end of warmup) forced save; checkpoint 7 promoted by the posterior.
  ledger = json.load(open(os.path.join(workdir, "checkpoints", "tiers.json")))["records"]
  assert ledger["3"]["kind"] == "forced" and "end of warmup" in ledger["3"]["reason"]
  assert [h["tier"] for h in ledger["7"]["history"]] == ["preliminary", "release"]
  assert "P(converged)" in ledger["7"]["history"][-1]["reason"]
  audit = _audit(workdir)
  promotions = [r for r in audit if r["event"] == "promotion"]
  assert [(r["step"], r["checkpoint"], r["tier"]) for r in promotions] == [
      (NAN_STEP, NAN_STEP, "release")]
  decisions = [r for r in audit if r["event"] == "decision"]
  assert decisions[0]["step"] == 0 and decisions[-1]["step"] == 15
  assert set(decisions[0]["posterior"]) >= set(convergence.NODES)
  assert os.path.getsize(os.path.join(workdir, "plots", "convergence.png")) > 10_000


def test_nan_without_rollback_stops_after_the_emergency_checkpoint(straight, tmp_path):
  config, ref_dir, _ = straight
  workdir = str(tmp_path / "nan_stop")
  nan_config = _config(**{"debug.nan_at_step": NAN_STEP, "checkpoint.every": 5})
  with pytest.raises(trainer.TrainingDiverged, match=f"at step {NAN_STEP}"):
    trainer.train_and_evaluate(nan_config, workdir)

  want, got = _rows(ref_dir), _rows(workdir)
  assert got[:NAN_STEP] == want[:NAN_STEP]  # the knob leaves earlier steps bit-identical
  row = json.loads(got[NAN_STEP])
  assert np.isnan(row["train/loss"]) and row["monitor/anomaly"] == 1
  assert row["monitor/anomaly_reason"] & convergence.REASON_NONFINITE
  assert row["monitor/action"] == monitoring.ACTION_EMERGENCY_SAVE | monitoring.ACTION_STOP
  assert len(got) == NAN_STEP + 1

  # The emergency checkpoint: pinned, with the reason, holding the pre-NaN state, which is
  # the straight run's state at step 7 bit for bit (step, params, optimizer state).
  emergency, record = _restore(nan_config, workdir, NAN_STEP)
  assert record.kind == "emergency" and record.pinned and "nonfinite" in record.reason
  reference, _ = _restore(config, ref_dir, NAN_STEP)
  assert int(emergency.state["train"]["step"]) == NAN_STEP
  a, b = jax.tree.leaves(emergency.state["train"]), jax.tree.leaves(reference.state["train"])
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  events = [r for r in _audit(workdir) if r["event"] == "anomaly"]
  assert events == [{"event": "anomaly", "step": NAN_STEP, "reasons": ["nonfinite"],
                     "train/loss": None, "emergency_checkpoint": True, "action": "stop"}]


def test_nan_with_rollback_skips_the_update_and_finishes(straight, tmp_path):
  _, ref_dir, _ = straight
  workdir = str(tmp_path / "nan_rollback")
  config = _config(**{"debug.nan_at_step": NAN_STEP, "checkpoint.every": 5,
                      "monitor.rollback_on_anomaly": True, "plots": True})
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary["steps"] == 16 and np.isfinite(summary["train/loss"])
  assert np.isfinite(summary["eval/loss"]) and summary["jit_compilations"] == 1

  rows = [json.loads(r) for r in _rows(workdir)]
  assert _rows(workdir)[:NAN_STEP] == _rows(ref_dir)[:NAN_STEP]
  assert rows[NAN_STEP]["monitor/anomaly"] == 1
  assert rows[NAN_STEP]["monitor/action"] == (monitoring.ACTION_EMERGENCY_SAVE
                                              | monitoring.ACTION_ROLLBACK)
  assert all(np.isfinite(r["train/loss"]) for r in rows[NAN_STEP + 1:16])
  # The update of step 7 was skipped: step 8 starts from θ_7, so its loss differs from the
  # straight run's (which had applied update 7).
  assert rows[NAN_STEP + 1]["train/loss"] != json.loads(_rows(ref_dir)[NAN_STEP + 1])[
      "train/loss"]

  mgr = checkpointing.make_manager(config, workdir)
  try:
    record = mgr.record(NAN_STEP)
    assert record.kind == "emergency" and record.pinned
    assert mgr.latest_step() == 16
  finally:
    mgr.close()
  audit = _audit(workdir)
  assert [r["action"] for r in audit if r["event"] == "anomaly"] == ["rollback"]
  assert os.path.exists(os.path.join(workdir, "plots", "convergence.png"))


def test_monitor_config_is_validated():
  for key, value, match in [
      ("monitor.metrics", ("train/loss node=structure",), "not one of"),
      ("monitor.metrics", ("train/loss",), "needs node="),
      ("monitor.metrics", ("train/loss node=functional short=3 long=20",), "multiple of short"),
      ("monitor.metrics", ("train/loss node=functional colour=red",), "key=value"),
      ("monitor.threshold", 1.0, "must be in"),
      ("monitor.tier_thresholds", (0.7, 0.5), "observation <= candidate"),
      ("monitor.emergency_on", ("nan",), "anomaly reasons"),
      ("monitor.rollback_on", ("spike",), "also be in monitor.emergency_on"),
  ]:
    overrides = {key: value}
    if key == "monitor.rollback_on":
      overrides["monitor.emergency_on"] = ("nonfinite",)
    with pytest.raises(ValueError, match=match):
      config_lib.load_config("configs/edge_of_stability.py:smoke", overrides)
  spec = config_lib.parse_monitor_metric(
      "eval/accuracy node=generalisation mode=max short=2 long=10",
      {"history": 8, "half_life": 50.0})
  assert spec == {"name": "eval/accuracy", "node": "generalisation", "mode": "max", "short": 2,
                  "long": 10, "history": 8, "half_life": 50.0}
  cfg = config_lib.load_config("configs/olmo_style.py:wsd", {})
  assert monitoring.stage_boundaries(cfg) == {
      60: "stage boundary: end of warmup (step 60)",
      450: "stage boundary: start of decay (step 450)"}
