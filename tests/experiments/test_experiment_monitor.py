"""The runner's convergence monitor (issue 3 §5–7): anomalies, emergency checkpoints, rollback, tiers.

One straight run of the edge-of-stability smoke config (16 steps, short evidence windows so the
posterior moves within the run) is the reference; two runs with ``debug.nan_at_step=7`` (the
loss and gradients of step 7 become NaN inside the jitted step) check that the anomaly is
flagged at step 7, that the emergency checkpoint holds the state before the poisoned update
(the straight run's checkpoint at step 7, within float32 rounding), that without rollback the
run stops with TrainingDiverged after writing it, and that with rollback it skips the update
and finishes with a finite loss. A persistent compilation cache (as in test_experiment_resume)
lets the second NaN run reuse the first one's executables.

Bit-exact comparisons only between two runs of the same compiled program (issue 9 §1). The
NaN knob adds a ``where`` to the train step, so the NaN runs compile a different program from
the straight run's and XLA may order its reductions differently (``train/grad_norm`` came out
2.5714735984802246 vs 2.5714738368988037, one ulp apart): those comparisons use the float32
tolerances of :func:`_tolerances`. The two NaN runs share one program (their configs differ
only in host-side keys) and are compared with each other bit for bit.

The edge-of-stability classification (issue 9 §5) is checked on the runner's own monitor
(``convergence.Monitor`` built by ``monitoring.from_config``, no training) fed a synthetic
excursion; the full 2,000-step run is
``configs/edge_of_stability.py`` itself.
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


EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: float32 spacing at 1 (2 units of roundoff)


def _tolerances(config):
  """Float32 tolerances for two *different* compiled programs of the same step.

  * ``step``: relative, for the step's floats (losses, norms, learning rate, eval). A float32
    sum of n terms evaluated in any order lies within γ_{n−1} ≈ (n−1)·u of the exact sum,
    relative to Σ|x_i| (u = 2^-24; Higham, *Accuracy and Stability of Numerical Algorithms*,
    §4.2), so two orders differ by at most 2(n−1)·u = (n−1)·EPS32; for the sums of positive
    terms here (squared norms, the MSE) Σ|x_i| = |Σ x_i|. n is the longest accumulation in the
    step, the squared gradient / update norm over all P parameters (the loss sums batch ×
    classes = 2,560 terms, a matmul at most 256): (P − 1)·EPS32 ≈ 1.1e-3 for P = 8,970.
  * ``probe``: relative, for λ_c and the probe's other outputs: the bracketing search stops at
    1 − lower/upper ≤ 2^-tol_power, and a comparison of two losses that rounding flips may
    move the result anywhere inside that bracket.
  """
  dims = [64, *config.model.widths, 10]  # digits: 8×8 pixels in, 10 classes out
  num_params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
  return {"step": (num_params - 1) * EPS32, "probe": 2.0 ** -config.probe.tol_power}


def _assert_rows_close(got, want, config):
  """Metric rows of a NaN run against the straight run's (different compiled programs)."""
  tol = _tolerances(config)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    g, w = json.loads(g), json.loads(w)
    assert g.keys() == w.keys()
    for key, expected in w.items():
      if key.startswith("monitor/"):
        continue  # the monitor's reading of these floats; its verdicts are checked as such
      probe = key.startswith("curv/")
      if isinstance(expected, float) or isinstance(g[key], float):
        np.testing.assert_allclose(g[key], expected, rtol=tol["probe" if probe else "step"],
                                   err_msg=f"step {w['step']}: {key}")
      elif not probe:  # the step number; curv/num_evals, curv/status: where the search stopped
        assert g[key] == expected, (w["step"], key)


def _assert_state_close(got, want, config, update_norms):
  """A training state after len(update_norms) updates, from a different compiled program.

  Parameters: each update is a float32 computation (sums of at most P terms) of size ‖u_t‖,
  so two programs' updates differ by at most tol["step"]·‖u_t‖, plus one rounding of θ + u
  per update: tol["step"]·Σ_t ‖u_t‖ + k ulps of the leaf. The λ_c probe's floats: its bracket.
  Integers (step, counts) are exact arithmetic, bools are set by the host schedule: equal.
  """
  tol = _tolerances(config)
  k = len(update_norms)
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for (path, x), y in zip(got_leaves, want_leaves):
    name, x, y = jax.tree_util.keystr(path), np.asarray(x), np.asarray(y)
    if "params" in name:
      atol = tol["step"] * float(np.sum(update_norms)) + k * float(np.spacing(np.max(np.abs(y))))
      np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=name)
    elif x.dtype.kind == "f":
      np.testing.assert_allclose(x, y, rtol=tol["probe"], err_msg=name)
    elif "num_evals" not in name and "status" not in name:  # where the search stopped
      np.testing.assert_array_equal(x, y, err_msg=name)


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


@pytest.fixture(scope="module")
def nan_stop(tmp_path_factory):
  """``debug.nan_at_step=7`` without rollback: TrainingDiverged after the emergency save."""
  workdir = str(tmp_path_factory.mktemp("nan_stop"))
  config = _config(**{"debug.nan_at_step": NAN_STEP, "checkpoint.every": 5})
  with pytest.raises(trainer.TrainingDiverged, match=f"at step {NAN_STEP}"):
    trainer.train_and_evaluate(config, workdir)
  return config, workdir


def test_monitor_metrics_promotions_audit_log_and_report(straight):
  config, workdir, summary = straight
  assert summary["jit_compilations"] == 1  # the monitor update compiles once too
  rows = [json.loads(r) for r in _rows(workdir)]
  for key in ("monitor/p_structural", "monitor/p_functional", "monitor/p_generalisation",
              "monitor/p_converged", "monitor/decision", "monitor/conflict",
              "monitor/unsettled", "monitor/anomaly", "monitor/eos_oscillation",
              "monitor/eos_reason", "monitor/tier", "monitor/action",
              "monitor/strength/train/loss", "monitor/direction/eval/loss"):
    assert key in rows[NAN_STEP], key
  assert not any(r.get("monitor/anomaly") or r.get("monitor/eos_oscillation") for r in rows)
  assert summary["monitor/anomalies"] == 0 and summary["monitor/eos_oscillations"] == 0

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


def test_nan_without_rollback_stops_after_the_emergency_checkpoint(straight, nan_stop):
  config, ref_dir, _ = straight
  nan_config, workdir = nan_stop

  want, got = _rows(ref_dir), _rows(workdir)
  # The knob leaves the earlier steps as they were (within float32 rounding: another
  # program), and the monitor saw nothing before step 7.
  _assert_rows_close(got[:NAN_STEP], want[:NAN_STEP], config)
  assert not any(json.loads(r)["monitor/anomaly"] or json.loads(r)["monitor/eos_oscillation"]
                 for r in got[:NAN_STEP])
  row = json.loads(got[NAN_STEP])
  assert np.isnan(row["train/loss"]) and row["monitor/anomaly"] == 1
  assert row["monitor/anomaly_reason"] & convergence.REASON_NONFINITE
  assert row["monitor/action"] == monitoring.ACTION_EMERGENCY_SAVE | monitoring.ACTION_STOP
  assert len(got) == NAN_STEP + 1

  # The emergency checkpoint: pinned, with the reason, holding the pre-NaN state, which is
  # the straight run's state at step 7 (step, params, optimizer state) within the float32
  # rounding of 7 updates computed by another program.
  emergency, record = _restore(nan_config, workdir, NAN_STEP)
  assert record.kind == "emergency" and record.pinned and "nonfinite" in record.reason
  reference, _ = _restore(config, ref_dir, NAN_STEP)
  assert int(emergency.state["train"]["step"]) == NAN_STEP
  norms = [json.loads(r)["train/update_norm"] for r in want[:NAN_STEP]]
  _assert_state_close(emergency.state["train"], reference.state["train"], config, norms)
  events = [r for r in _audit(workdir) if r["event"] == "anomaly"]
  assert events == [{"event": "anomaly", "step": NAN_STEP, "reasons": ["nonfinite"],
                     "train/loss": None, "emergency_checkpoint": True, "action": "stop"}]


def test_nan_with_rollback_skips_the_update_and_finishes(straight, nan_stop, tmp_path):
  ref_config, ref_dir, _ = straight
  stop_config, stop_dir = nan_stop
  workdir = str(tmp_path / "nan_rollback")
  config = _config(**{"debug.nan_at_step": NAN_STEP, "checkpoint.every": 5,
                      "monitor.rollback_on_anomaly": True, "plots": True})
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary["steps"] == 16 and np.isfinite(summary["train/loss"])
  assert np.isfinite(summary["eval/loss"]) and summary["jit_compilations"] == 1

  rows = [json.loads(r) for r in _rows(workdir)]
  # Same compiled program as the stopping NaN run (only host-side keys differ): up to and
  # including the poisoned step the rows are bit-identical, apart from what the host did.
  stop_rows = _rows(stop_dir)
  assert _rows(workdir)[:NAN_STEP] == stop_rows[:NAN_STEP]
  here, there = dict(rows[NAN_STEP]), json.loads(stop_rows[NAN_STEP])
  assert here.pop("monitor/action") == (monitoring.ACTION_EMERGENCY_SAVE
                                        | monitoring.ACTION_ROLLBACK)
  assert there.pop("monitor/action") == (monitoring.ACTION_EMERGENCY_SAVE
                                         | monitoring.ACTION_STOP)
  assert json.dumps(here) == json.dumps(there)  # NaN included
  assert rows[NAN_STEP]["monitor/anomaly"] == 1
  assert all(np.isfinite(r["train/loss"]) for r in rows[NAN_STEP + 1:16])
  # The update of step 7 was skipped: step 8 starts from θ_7, so its loss differs from the
  # straight run's (which had applied update 7) by far more than float32 rounding.
  straight_loss = json.loads(_rows(ref_dir)[NAN_STEP + 1])["train/loss"]
  assert not np.isclose(rows[NAN_STEP + 1]["train/loss"], straight_loss,
                        rtol=_tolerances(ref_config)["step"], atol=0)

  mgr = checkpointing.make_manager(config, workdir)
  try:
    record = mgr.record(NAN_STEP)
    assert record.kind == "emergency" and record.pinned
    assert mgr.latest_step() == 16
    mine = mgr.restore(NAN_STEP).state["train"]
  finally:
    mgr.close()
  theirs, _ = _restore(stop_config, stop_dir, NAN_STEP)
  for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs.state["train"])):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()  # same program: bit for bit
  audit = _audit(workdir)
  assert [r["action"] for r in audit if r["event"] == "anomaly"] == ["rollback"]
  assert os.path.exists(os.path.join(workdir, "plots", "convergence.png"))


def _eos_excursion(n=150, peak=90, width=7.0):
  """One edge-of-stability excursion of full-batch GD (tests/convergence/test_anomaly.py's
  ``_eos_streams``): the component along the sharp direction (curvature 2/η) grows and
  decays; η·λ_c = 2p + (1 − p)·0.005, p its share of the gradient, ±3 % around 2 at the top."""
  rng = np.random.default_rng(0)
  t = np.arange(n)
  lam = 20.0
  a = 0.05 * np.exp(-(((t - peak) / width) ** 2))
  loss = 0.05 * np.exp(-t / 400) * (1 + 1e-3 * rng.normal(size=n)) + 0.5 * lam * a**2
  grad = np.sqrt((0.02 * (1 + 3e-3 * rng.normal(size=n))) ** 2 + (lam * a) ** 2)
  p = (lam * a) ** 2 / grad**2
  lr_sharp = 2 * p + (1 - p) * 0.005
  lr_sharp = np.where(p > 0.95, lr_sharp * (1 + 0.03 * (-1.0) ** t), lr_sharp)
  return loss, grad, 0.1 * grad, lr_sharp


def test_monitor_reads_the_edge_of_stability_and_still_flags_faults():
  # The runner's monitor (one compiled update) on a synthetic excursion: the spikes while
  # η·λ_c climbs to and oscillates around 2 are logged as edge-of-stability oscillation —
  # no anomaly, so no emergency checkpoint (the trainer saves on reason & emergency_mask) —
  # and the run is unsettled, never "converged", while η·λ_c > 2 or a level shift lies in
  # the evidence window. The same spikes at η·λ_c = 0.1, a NaN or a x1e4 spike at the edge
  # are anomalies that ask for an emergency checkpoint.
  monitor = monitoring.from_config(_config())
  assert monitor.evidence_window == 20  # BASE: long 20 (baseline span 2 x 8 = 16)
  loss, grad, upd, lr_sharp = _eos_excursion()

  def run(loss=loss, lr_sharp=lr_sharp, audit_at=-1):
    state, rows, events, record = monitor.init(), [], [], None
    for k in range(len(loss)):
      metrics = {"train/loss": loss[k], "train/grad_norm": grad[k],
                 "train/update_norm": upd[k], "curv/lr_sharpness": lr_sharp[k]}
      new, out = monitor.update(state, monitor.inputs_of(metrics))
      rows.append({key: np.asarray(v).item() for key, v in jax.device_get(out.metrics).items()})
      events += monitor.eos_events(k, state, new, metrics)
      if k == audit_at:
        record = monitor.audit_record(k, new, out)
      state = new
    return state, rows, events, record

  above = np.nonzero(lr_sharp > 2)[0]
  state, rows, events, record = run(audit_at=int(above[-1]) + 5)
  eos = [k for k, r in enumerate(rows) if r["monitor/eos_oscillation"]]
  assert len(eos) >= 20 and int(state.detector.total_eos) == len(eos)
  assert not any(r["monitor/anomaly"] or r["monitor/anomaly_reason"] & monitor.emergency_mask
                 for r in rows)
  assert rows[eos[0]]["monitor/eos_reason"] & convergence.REASON_SPIKE
  # The audit: one episode, opened at its first step and closed after its last.
  assert [(e["phase"], e["step"]) for e in events] == [("start", eos[0]),
                                                       ("end", eos[-1] + 1)]
  assert "spike" in events[0]["reasons"] and events[0]["emergency_checkpoint"] is False
  assert events[1]["first_step"] == eos[0] and events[1]["steps"] == len(eos)
  # Unsettled from the first η·λ_c > 2 until the evidence window has passed the last one
  # (and the last loss level shift): never "converged" there.
  unsettled = [k for k, r in enumerate(rows) if r["monitor/unsettled"]]
  assert unsettled[0] <= above[0] and unsettled[-1] >= above[-1] + monitor.evidence_window - 1
  assert all(rows[k]["monitor/decision"] == 0 and rows[k]["monitor/p_converged"] < 0.05
             for k in unsettled)
  assert record["unsettled"] and record["decision"] == "not_converged"
  assert "η·λ_c above the limit 5 steps ago" in record["reason"]

  _, low, low_events, _ = run(lr_sharp=np.full(len(loss), 0.1))
  assert not low_events and not any(r["monitor/eos_oscillation"] for r in low)
  assert low[eos[0]]["monitor/anomaly"] == 1
  assert low[eos[0]]["monitor/anomaly_reason"] & monitor.emergency_mask
  k = 95  # at the edge: η·λ_c ≈ 2
  for fault, reason in ((np.nan, convergence.REASON_NONFINITE),
                        (1e4 * loss[k], convergence.REASON_SPIKE)):
    faulty = loss.copy()
    faulty[k] = fault
    _, bad, _, _ = run(loss=faulty)
    assert bad[k]["monitor/anomaly"] == 1 and bad[k]["monitor/anomaly_reason"] & reason
    assert bad[k]["monitor/anomaly_reason"] & monitor.emergency_mask
  assert not bad[k]["monitor/eos_oscillation"]  # x1e4: above eos_max_loss_ratio, a fault


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
