"""The runner's convergence monitor: ``config.monitor`` → ``convergence.Monitor``, its hook.

The maths and the decisions live in the library (``convergence.Monitor``: anomaly detector,
evidence windows, Bayesian network, tier policy, emergency save / rollback / stop); this
module adapts them to the runner:

* :func:`from_config` builds the ``convergence.Monitor`` from ``config.monitor`` (the
  ``monitor.metrics`` strings parsed by ``config_lib.parse_monitor_metric``; the anomaly
  detector's ``anomaly_*``, ``spike_threshold``, ``shift_threshold``, ``min_history``,
  ``lr_sharpness_limit``, ``unstable_sustain`` and ``eos_*`` keys; ``rollback_on`` only with
  ``rollback_on_anomaly``);
* :class:`RunMonitor` is the ``experiments.loop.Hook`` that runs it after every step, writes
  ``monitor/*`` into the row and ``audit.jsonl``, and carries out its actions with the
  run's :class:`experiments.loop.CheckpointPolicy` (emergency save, rollback check, tiers);
* :func:`stage_boundaries`: the schedule's stage boundaries, where a save is forced.

Logged per step (``metrics.jsonl``): ``monitor/p_<node>`` for the four nodes,
``monitor/decision`` (1 = converged), ``monitor/conflict``, ``monitor/unsettled``,
``monitor/anomaly`` and ``monitor/anomaly_reason`` (bit mask of ``convergence.REASON_*``),
``monitor/eos_oscillation`` and ``monitor/eos_reason`` (the reasons classified as
edge-of-stability oscillation instead), ``monitor/strength/<metric>`` and
``monitor/direction/<metric>`` (the raw evidence; +1 improving, 0 stable, −1 worsening),
``monitor/tier`` (the tier level the posterior asks for: 0 preliminary … 3 release) and
``monitor/action`` (bit mask of ``convergence.ACTION_*``: emergency save, rollback, stop).

Audit (``audit.jsonl``, ``experiments.records``): a decision line every
``monitor.audit_every`` steps and whenever the decision, the conflict or the unsettled flag
changes; every anomaly (its reasons, loss, action), checkpoint and promotion; an
``eos_oscillation`` event where an episode of oscillation steps starts and where it ends.

The monitor's device state and host counters are saved in every checkpoint (packed into one
array per dtype, ``convergence.Monitor.pack``), so a resumed run writes the same rows.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import jax

import convergence
from experiments import config_lib
from experiments import loop
from experiments import records

TIER_NAMES = convergence.CHECKPOINT_TIERS  # level 0..3
ACTION_EMERGENCY_SAVE = convergence.ACTION_EMERGENCY_SAVE
ACTION_ROLLBACK = convergence.ACTION_ROLLBACK
ACTION_STOP = convergence.ACTION_STOP


def from_config(config) -> convergence.Monitor:
  """The ``convergence.Monitor`` of ``config.monitor`` (module docstring)."""
  m = config.monitor
  detector = convergence.anomaly_detector(
      window=int(m.anomaly_window), short_window=int(m.anomaly_short_window),
      spike_threshold=float(m.spike_threshold), shift_threshold=float(m.shift_threshold),
      min_history=int(m.min_history), lr_sharpness_limit=float(m.lr_sharpness_limit),
      sustain=int(m.unstable_sustain), eos_window=int(m.eos_window),
      eos_band=tuple(float(x) for x in m.eos_band), eos_rise=float(m.eos_rise),
      eos_max_loss_ratio=float(m.eos_max_loss_ratio))
  metrics = [convergence.MonitoredMetric(
      s["name"], s["node"], mode=s["mode"], short=s["short"], long=s["long"],
      history=s["history"], half_life=s["half_life"])
             for s in config_lib.monitor_metric_specs(config)]
  return convergence.Monitor(
      metrics, detector=detector, threshold=float(m.threshold),
      tier_thresholds=tuple(float(t) for t in m.tier_thresholds),
      emergency_on=tuple(m.emergency_on),
      rollback_on=tuple(m.rollback_on) if m.rollback_on_anomaly else (),
      max_emergency_saves=int(m.max_emergency_saves), max_rollbacks=int(m.max_rollbacks))


def stage_boundaries(config) -> dict[int, str]:
  """``{step: reason}`` of the schedule's stage boundaries inside the run (forced saves).

  The end of warmup (step ``warmup_steps``: the state after the last warmup update) and, for
  WSD, the start of the decay (the state before the first decayed update; the same formula as
  ``experiments.optim.make_schedule``), for two_stage the start of stage 2 (the state stage 1
  ends with). Steps 0 and ``num_steps`` are left out (nothing to mark
  at the start; the end of the run is always saved).
  """
  s, total = config.schedule, int(config.num_steps)
  warm = int(s.warmup_steps)
  out: dict[int, str] = {}
  if warm > 0:
    out[warm] = f"stage boundary: end of warmup (step {warm})"
  if s.name in ("warmup_stable_decay", "two_stage"):
    decay_start = max(total - max(1, int(round(float(s.decay_fraction) * total))), warm)
    reason = (f"stage boundary: start of decay (step {decay_start})"
              if s.name == "warmup_stable_decay" else
              f"stage boundary: start of stage 2 (step {decay_start})")
    out[decay_start] = f"{out[decay_start]}; {reason}" if decay_start in out else reason
  return {k: v for k, v in out.items() if 0 < k < total}


class RunMonitor(loop.Hook):
  """The monitor in the loop: ``observe`` updates it on the step's row and carries out
  :meth:`convergence.Monitor.decide`; its state (``state``: device, ``host``: Python ints)
  is explicit and checkpointed through :meth:`packed` / :meth:`restore`.

  Args:
    monitor: the ``convergence.Monitor``.
    workdir: the run directory (``audit.jsonl``).
    audit_every: a decision line every this many steps (and at every change).
    last_step: the run's last step (always audited).
    write_audit: False on the processes other than 0 of a multi-host run.
  """

  def __init__(self, monitor: convergence.Monitor, *, workdir: str, audit_every: int,
               last_step: int, write_audit: bool = True):
    self.monitor = monitor
    self.workdir, self.audit_every, self.last_step = workdir, audit_every, last_step
    self.write_audit = write_audit
    self.state, self.host = monitor.init(), monitor.init_host()
    self.checkpoints: loop.CheckpointPolicy | None = None  # set by CheckpointPolicy(monitor=)
    self.emergency_at: int | None = None  # step of the last emergency checkpoint

  def audit(self, record: dict[str, Any]) -> None:
    if self.write_audit:
      records.append_audit(self.workdir, record)

  def packed(self) -> dict[str, jax.Array]:
    return self.monitor.pack(self.state, self.host)

  def restore(self, packed) -> None:
    self.state, self.host = self.monitor.unpack(packed, self.state)

  def observe(self, step: int, state, row: dict[str, Any]) -> loop.Verdict:
    mon = self.monitor
    # Host (NumPy) inputs: the same jit signature whatever device arrays the step made.
    new_state, out = mon.update(self.state, mon.inputs_of(row))
    # One transfer for everything the host reads of this update.
    metrics, changed, eos = jax.device_get(
        (out.metrics, out.changed, mon.eos_fields(self.state, new_state)))
    row.update(records.to_json(metrics))
    can_save = self.checkpoints is not None and self.checkpoints.mgr is not None
    act = mon.decide(self.host, row, can_save=can_save)
    row["monitor/tier"], row["monitor/action"] = act.level, act.code
    if (step % self.audit_every == 0 or bool(changed) or act.reason
        or step == self.last_step):
      self.audit(mon.audit_record(step, new_state, out))
    if act.emergency_save:
      # The state before the flagged update, with the monitor state of that moment, so a
      # resume from this checkpoint replays step `step` exactly.
      why = (f"anomaly at step {step}: {', '.join(convergence.reason_names(act.reason))} "
             f"(train/loss={row['train/loss']})")
      self.checkpoints.emergency_save(step, state, why)
      self.emergency_at = step
    for rec in mon.eos_events_of(step, eos, row):
      self.audit(rec)
      if rec["phase"] == "start":
        logging.info("edge-of-stability oscillation from step %d (%s, η·λ_c=%s): logged as "
                     "monitor/eos_oscillation, not an anomaly", step,
                     ", ".join(rec["reasons"]), rec["curv/lr_sharpness"])
    self.state, self.host = new_state, mon.commit(self.host, act)
    if act.emergency_save or act.rollback or act.stop:
      self.audit({"event": "anomaly", "step": step,
                  "reasons": convergence.reason_names(act.reason),
                  "train/loss": row["train/loss"], "emergency_checkpoint": act.emergency_save,
                  "action": "rollback" if act.rollback else ("stop" if act.stop else "continue")})
    if act.rollback:
      if can_save:
        self.checkpoints.check_rollback(step, state)
      logging.warning("rolled back at step %d: skipped the update of batch %d", step, step)
    return loop.Verdict(rollback=act.rollback, stop=act.stop,
                        log=bool(act.reason or row.get("monitor/eos_oscillation")))

  def sync(self, step: int) -> bool:
    # A rollback of step − 1 changes the state step starts from.
    return self.monitor.rollback_mask != 0

  def summary(self) -> dict[str, Any]:
    return {"monitor/anomalies": int(self.state.detector.total_flagged),
            "monitor/eos_oscillations": int(self.state.detector.total_eos),
            "monitor/emergency_saves": self.host.emergency_saves,
            "monitor/rollbacks": self.host.rollbacks}
