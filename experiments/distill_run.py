"""The loop's pieces for a distillation run (each an ``experiments.loop.Hook``) and its resume.

* :class:`StudentEval` — the student on the fixed eval batch (``eval/loss``,
  ``eval/perplexity``, ``eval/accuracy``, ``eval/kd`` to the teacher), every ``eval_every``
  steps; one evaluation per step however many pieces ask for it.
* :class:`Controller` — the adaptive controller (``experiments.distill_controller``) with its
  explicit host state: the controller state, the interval's metric sums and the decisions the
  jitted step reads; every decision is a line of ``controller_audit.jsonl``.
* :func:`resume` — the newest verified checkpoint of the student phase: state, data position,
  kept metric rows (the logs truncated to the rows before it).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

import distill
from experiments import checkpointing
from experiments import distill_controller
from experiments import loop
from experiments import records


class StudentEval(loop.Hook):
  """``eval_fn(student_params, eval_batch, teacher_eval_logits)`` every ``every`` steps (0:
  only when asked, e.g. by the controller, and at the end), with the teacher's eval loss."""

  def __init__(self, eval_fn, batch, teacher_logits, teacher_loss: float, every: int):
    self.eval_fn, self.batch, self.teacher_logits = eval_fn, batch, teacher_logits
    self.teacher_row = {"distill/teacher_eval_loss": teacher_loss}
    self.every = every
    self._cached: tuple[int, dict] | None = None

  def at(self, step: int, params) -> dict[str, Any]:
    """The (device) eval metrics of ``params`` at ``step``, computed once per step."""
    if self._cached is None or self._cached[0] != step:
      self._cached = (step, self.eval_fn(params["student"], self.batch, self.teacher_logits))
    return self._cached[1]

  def before(self, step, state, batch):
    if self.every and step % self.every == 0:
      return {**self.at(step, state.params), **self.teacher_row}
    return {}

  def final(self, params) -> dict[str, Any]:
    """The evaluation after the last update, as Python scalars."""
    return {**records.to_json(jax.device_get(self.eval_fn(
        params["student"], self.batch, self.teacher_logits))), **self.teacher_row}


class Controller(loop.Hook):
  """The adaptive controller as a loop piece: before step t (every ``controller.every``
  steps, t > 0) it evaluates the student, updates the controller on the eval metrics and the
  interval's means, appends its decisions to the audit log and hands the new decisions to
  the step; after each step it adds the step's metrics to the interval.

  Explicit state, checkpointed with the student: ``state`` (``distill.ControllerState``, host
  NumPy), ``interval`` (``{"count", "sums"}``, JSON in the checkpoint's metadata).
  """

  def __init__(self, config, terms, groups, evaluation: StudentEval, workdir: str):
    self.controller, self.rule_names = distill_controller.make_controller(config, terms, groups)
    self.update = jax.jit(self.controller.update)
    self.terms, self.every = terms, config.distill.controller.every
    self.stage_decay = config.distill.controller.stage_decay
    self.evaluation, self.workdir = evaluation, workdir
    self.interval: dict[str, Any] = {"count": 0, "sums": {}}
    self.restore(jax.device_get(self.controller.init()), self.interval)

  def restore(self, state, interval: dict[str, Any]) -> None:
    """Sets the explicit state (a fresh one, or a checkpoint's)."""
    self.state, self.interval = jax.device_get(state), interval
    self.decisions = distill_controller.controller_decisions(self.state, self.terms,
                                                             self.stage_decay)

  def before(self, step, state, batch):
    if step == 0 or step % self.every:
      return {}
    ev = jax.device_get(self.evaluation.at(step, state.params))
    inputs = distill_controller.controller_inputs(self.controller, ev, self.interval)
    new = jax.device_get(self.update(self.state, inputs))
    for record in distill.audit_records(self.state, new, inputs, step=step,
                                        rule_names=self.rule_names):
      records.append_audit(self.workdir, record, name=distill_controller.AUDIT_LOG)
    self.restore(new, {"count": 0, "sums": {}})
    return {**ev, **{k: v for k, v in inputs.items() if k.startswith("controller/")},
            "controller/stage": np.int32(self.state.stage)}

  def sync(self, step):
    # The update before ``step`` reads the interval through step − 1 (its ``observe``), so
    # the loop must not run ahead into a controller step.
    return step > 0 and step % self.every == 0

  def observe(self, step, state, row):
    self.interval["count"] += 1
    sums = self.interval["sums"]
    for k in distill_controller.interval_keys(row):
      sums[k] = sums.get(k, 0.0) + float(row[k])
    return None


class Resumed(NamedTuple):
  """What :func:`resume` restored."""
  step: int
  arrays: dict[str, Any]  # the checkpoint's payload
  metadata: dict[str, Any]
  rows: list[dict]  # the metric rows kept (before ``step``)


def resume(config, workdir: str, mgr, target, data_info) -> Resumed:
  """Restores the newest verified student checkpoint, checks config and data, truncates
  ``metrics.jsonl`` and ``controller_audit.jsonl`` to the rows before its step."""
  try:
    restored, changed = checkpointing.restore_checked(config, workdir, mgr, target, data_info)
    meta = restored.metadata
    kept = records.truncate_rows(os.path.join(workdir, records.METRICS_FILE), restored.step)
  except BaseException:
    mgr.close()
    raise
  records.truncate_audit(workdir, restored.step, name=distill_controller.AUDIT_LOG)
  checkpointing.log_resume(workdir, {
      "restored_step": restored.step, "kept_metric_rows": len(kept),
      "skipped_corrupt": [s for s, _ in restored.skipped], "config_changes": changed})
  logging.info("resumed %s from the student checkpoint at step %d (%d metric rows kept)",
               workdir, restored.step, len(kept))
  return Resumed(restored.step, restored.state, meta, [json.loads(line) for line in kept])
