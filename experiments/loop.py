"""The training loop of every runner: a jitted step and named pieces around it.

:func:`run` is the loop, in one screen. Everything a runner adds to it is a :class:`Hook` with
its own explicit state (a probe's PRNG key and warm start, the monitor's host counters, the
checkpoint policy's manager), testable alone:

==============  ==========================================================================
``before``      device metrics measured at θ_t before update t (probes, evaluation)
``after``       device metrics that need the update's result (a probe of the new optimizer
                state)
``observe``     host side, on the step's fetched row: may add keys to it and return a
                :class:`Verdict` (roll back, stop, force the row into the log)
``end``         after the next state is chosen: checkpoint policy, promotions, progress
``sync(t)``     True when step t must wait for step t − 1's verdict and ``end``
==============  ==========================================================================

Speed. One host transfer per step: the step's metrics and every hook's measurements are
fetched with one ``jax.device_get``. Step t + 1 is dispatched *before* step t's row is
fetched (values are read one step late), so the device computes it while the host judges,
logs and saves step t; the loop waits instead where a hook's ``sync`` says step t + 1 depends
on step t's outcome (a monitor that may roll back, a save whose data position and warm starts
must be those after step t). The trainer (``experiments.trainer``) and the distillation runner
(``experiments.distillation``) differ in their step function and hooks, not in the loop.

Row ``{"step": t, ...}`` describes θ_t *before* update t. A row is written when ``t %
log_every == 0``, when a hook measured something at t, when a verdict asks for it or stops the
run, and at the last step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import convergence
from experiments import checkpointing
from experiments import records

PyTree = Any


class Verdict(NamedTuple):
  """What a hook's ``observe`` asks of the loop at one step.

  Attributes:
    rollback: skip this update; the loop continues from ``skip_update(state, step)``.
    stop: end the loop after this step's row (the state is not advanced).
    log: write this step's row whatever ``log_every`` says.
  """

  rollback: bool = False
  stop: bool = False
  log: bool = False

  def __or__(self, other: "Verdict | None") -> "Verdict":
    if other is None:
      return self
    return Verdict(self.rollback or other.rollback, self.stop or other.stop,
                   self.log or other.log)


class Hook:
  """A piece of the loop; every method is optional (these defaults do nothing)."""

  def before(self, step: int, state: PyTree, batch: PyTree) -> dict[str, Any]:
    del step, state, batch
    return {}

  def after(self, step: int, state: PyTree, new_state: PyTree, batch: PyTree
            ) -> dict[str, Any]:
    del step, state, new_state, batch
    return {}

  def observe(self, step: int, state: PyTree, row: dict[str, Any]) -> Verdict | None:
    del step, state, row
    return None

  def end(self, step: int, state: PyTree, row: dict[str, Any]) -> None:
    del step, state, row

  def sync(self, step: int) -> bool:
    """True when step ``step`` must not be dispatched before step ``step − 1`` is judged and
    its ``end`` ran: this hook may roll step ``step − 1`` back, or its ``end`` / ``before``
    reads or changes host state the other would see (a save's data position, a warm start).
    """
    del step
    return False


class LoopEnd(NamedTuple):
  """How :func:`run` ended: the last state, the last row (Python scalars), and the step
  whose verdict stopped the loop (``None`` when every step ran)."""

  state: PyTree
  last_row: dict[str, Any]
  stopped_at: int | None


def canonical(tree: PyTree) -> PyTree:
  """Strong-typed, committed arrays: a state restored or rebuilt on the host must have the
  avals of the one the jitted step returns, or the step would compile a second time."""
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), tree)


def due(every: int, step: int, last: int) -> bool:
  """A periodic measurement at ``step``: every ``every`` steps (0: never) and at ``last``."""
  return every > 0 and (step % every == 0 or step == last)


def _measure(hooks: Sequence[Hook], method: str, *args) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for h in hooks:
    out.update(getattr(h, method)(*args))
  return out


class _Dispatched(NamedTuple):
  """One step handed to the device: its input state, its outputs (device arrays)."""
  step: int
  state: PyTree
  new_state: PyTree
  metrics: dict[str, Any]  # the step's own
  measured: dict[str, Any]  # the hooks' measurements at this step


def _dispatch(step, state, step_fn, next_batch, hooks) -> _Dispatched:
  batch = next_batch()
  measured = _measure(hooks, "before", step, state, batch)
  new_state, metrics = step_fn(state, batch)
  measured.update(_measure(hooks, "after", step, state, new_state, batch))
  return _Dispatched(step, state, new_state, metrics, measured)


def run(state: PyTree, steps: Iterable[int], *,
        step_fn: Callable[[PyTree, PyTree], tuple[PyTree, dict[str, Any]]],
        next_batch: Callable[[], PyTree], hooks: Sequence[Hook] = (),
        writer: records.MetricWriter | None = None, log_every: int = 1,
        skip_update: Callable[[PyTree, int], PyTree] | None = None,
        loss_key: str = "train/loss") -> LoopEnd:
  """Runs ``step_fn`` over ``steps`` with ``hooks`` (module docstring); returns :class:`LoopEnd`.

  A non-finite ``row[loss_key]`` stops the loop unless a hook rolled the update back.
  ``skip_update(state, step)``: the state that follows a rolled-back update (required when a
  hook may roll back; such a hook must say so in ``sync``).
  """
  steps = list(steps)
  row: dict[str, Any] = {}
  ahead = None
  for i, step in enumerate(steps):
    cur = ahead if ahead is not None else _dispatch(step, state, step_fn, next_batch, hooks)
    ahead = None
    if i + 1 < len(steps) and not any(h.sync(steps[i + 1]) for h in hooks):
      # Run ahead: step t+1 computes while the host fetches, judges and writes step t.
      ahead = _dispatch(steps[i + 1], cur.new_state, step_fn, next_batch, hooks)
    # The step's one transfer; it waits for step t, not for step t+1.
    row = records.to_json(jax.device_get({**cur.metrics, **cur.measured}))
    verdict = Verdict()
    for h in hooks:
      verdict = verdict | h.observe(step, state, row)
    loss = row.get(loss_key)
    if loss is not None and not math.isfinite(loss):  # logged; stops unless rolled back
      verdict = verdict | Verdict(stop=not verdict.rollback, log=True)
    if writer is not None and (step % log_every == 0 or cur.measured or verdict.log
                               or verdict.stop or step == steps[-1]):
      writer.write(step, row)
    if verdict.stop:
      return LoopEnd(state, row, step)  # a step run ahead from a diverged state is dropped
    if verdict.rollback:
      if ahead is not None:
        raise RuntimeError(f"a hook rolled back step {step} but none asked to sync at step "
                           f"{step + 1}; the next step already ran from the skipped update.")
      state = skip_update(state, step)
    else:
      state = cur.new_state
    for h in hooks:
      h.end(step, state, row)
  return LoopEnd(state, row, None)


# ------------------------------------------------------------------------ standard pieces


def run_to_end(state: PyTree, steps: range, *, final_eval: Callable[[PyTree], dict],
               policy: "CheckpointPolicy", mgr, closers: Sequence[Any], **run_kwargs
               ) -> tuple[LoopEnd, dict[str, Any]]:
  """:func:`run`, then, unless a step stopped it, the final evaluation (written at
  ``steps.stop``) and the final save. Whatever happens the writer and progress bar in
  ``closers`` are closed, and the checkpoint manager ``mgr`` (may be None) is closed: after an
  error without masking it, else waiting for the last asynchronous save (raising if it
  failed). Returns ``(LoopEnd, final evaluation metrics or {})``.
  """
  final: dict[str, Any] = {}
  try:
    end = run(state, steps, **run_kwargs)
    if end.stopped_at is None:
      final = final_eval(end.state.params)
      run_kwargs["writer"].write(steps.stop, final)
      policy.finish(end.state, final)
  except BaseException:
    if mgr is not None:  # wait for a save in flight, but do not mask the error
      checkpointing.close_after_error(mgr)
      mgr = None
    raise
  finally:
    for c in closers:
      c.close()
  if mgr is not None:
    mgr.close()
  return end, final


class CheckpointPolicy(Hook):
  """Saves every ``every`` steps, at the forced ``boundaries`` and at the end; the monitor's
  emergency saves, rollback check and tier promotions go through it.

  Args:
    mgr: the ``convergence.TieredCheckpointManager`` (None: checkpoints off, no resume).
    every: the regular interval (``checkpoint.every``).
    num_steps: the run's length (step ``num_steps`` is the final save, :meth:`finish`).
    payload: ``state -> {name: arrays}`` saved and restored (the train state and the pieces'
      explicit states: probe keys, warm starts, the packed monitor).
    metadata: ``step -> JSON dict``: the config and the data position after the batch of
      ``step`` was drawn (the loop may have drawn the next one already).
    boundaries: ``{step: reason}`` of forced saves (stage boundaries, a resume under changed
      hyper-parameters).
    enabled: regular and final saves (``checkpoint.enabled``; a resume without it still
      reads the checkpoints).
    monitor: the run's ``experiments.monitoring.RunMonitor``, whose tiers the saves take.
    last_row, last_eval: the ledger metrics so far (a resumed run's kept rows).
  """

  def __init__(self, mgr, *, every: int, num_steps: int, payload: Callable[[PyTree], dict],
               metadata: Callable[[int], dict], boundaries: dict[int, str] | None = None,
               enabled: bool = True, monitor=None, last_row: dict | None = None,
               last_eval: dict | None = None):
    self.mgr, self.every, self.num_steps = mgr, every, num_steps
    self.payload, self.metadata = payload, metadata
    self.boundaries = dict(boundaries or {})
    self.enabled = enabled and mgr is not None
    self.monitor = monitor
    if monitor is not None:
      monitor.checkpoints = self
    self.last_row = dict(last_row or {})
    self.last_eval = dict(last_eval or {})

  def _tier(self) -> int:
    m = self.monitor
    return 0 if m is None else m.monitor.save_tier(m.host)

  def save(self, done: int, loop_step: int, state: PyTree, *, force: bool = False,
           reason: str | None = None) -> None:
    """Checkpoints ``state``, the state after ``done`` updates, at step ``done``."""
    tier = self._tier()
    ledger = {k: float(self.last_row[k]) for k in ("train/loss",) if k in self.last_row}
    ledger.update({k: float(v) for k, v in self.last_eval.items()})
    self.mgr.save(done, self.payload(state), tier=tier_name(tier),
                  metadata=self.metadata(done - 1),
                  metrics=ledger, force=force, reason=reason)
    if self.monitor is not None:
      m = self.monitor
      m.host = m.monitor.saved(m.host, tier)
      m.audit({"event": "checkpoint", "step": loop_step, "checkpoint": done,
               "kind": "forced" if force else "regular", "tier": tier_name(tier),
               "reason": reason, "p_converged": self.last_row.get("monitor/p_converged")})

  def save_initial(self, state: PyTree) -> None:
    """Checkpoints ``state``, the state before the first update, as step 0 (a regular save:
    0 is on every interval). Called by a fresh run, before its first batch is drawn, so the
    data position saved is the iterator's initial one and a resume from it is a fresh start."""
    if self.enabled:
      self.save(0, 0, state)

  def emergency_save(self, step: int, state: PyTree, reason: str) -> None:
    """A pinned checkpoint of ``state``, the state before the flagged update ``step``."""
    self.mgr.emergency_save(step, self.payload(state), reason=reason,
                            metadata=self.metadata(step))
    logging.warning("emergency checkpoint at step %d: %s", step, reason)

  def check_rollback(self, step: int, state: PyTree) -> None:
    """The emergency checkpoint at ``step`` restores (checksums verified) to ``state``.

    The loop continues from the copy it holds (arrays restored by Orbax are committed to a
    device and would make every jitted function compile again), so the two must agree bit for
    bit, NaN probe diagnostics included.
    """
    if step not in self.mgr.all_steps():
      return
    like = self.payload(state)
    restored = self.mgr.restore(step, checkpointing.abstract(like)).state
    keys = [k for k in ("train", "host") if k in like]
    good = jax.device_get({k: like[k] for k in keys})
    back = jax.device_get({k: restored[k] for k in keys})
    same = [np.asarray(a).tobytes() == np.asarray(b).tobytes()
            for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(back))]
    if not all(same):
      raise RuntimeError(f"the emergency checkpoint at step {step} differs from the "
                         "in-memory state it was written from; not rolling back.")

  def _promote(self, loop_step: int) -> None:
    """Promotes the newest checkpoint when the posterior's level rose above its tier."""
    m = self.monitor
    m.host, target = m.monitor.promotion(m.host)
    if target is None or self.mgr is None:
      return
    latest = self.mgr.latest_step()
    p_c = self.last_row.get("monitor/p_converged", float("nan"))
    reason = (f"posterior P(converged)={p_c:.4f} at step {loop_step} "
              + ("(decision: converged)" if target == 3 else
                 f"(>= {m.monitor.thresholds[target - 1]})"))
    if (latest is not None
        and TIERS.index(self.mgr.record(latest).tier) < target):
      self.mgr.promote(latest, tier_name(target), reason=reason)
    m.host = m.monitor.saved(m.host, target)
    m.audit({"event": "promotion", "step": loop_step, "checkpoint": latest,
             "tier": tier_name(target), "reason": reason, "p_converged": p_c})

  def end(self, step: int, state: PyTree, row: dict[str, Any]) -> None:
    self.last_row = row
    if "eval/loss" in row:
      self.last_eval = {"eval/loss": row["eval/loss"]}
    if self.monitor is not None:
      self._promote(step)
    done = step + 1
    if self.enabled and done < self.num_steps:
      regular = done % self.every == 0
      if regular or done in self.boundaries:
        self.save(done, step, state, force=not regular, reason=self.boundaries.get(done))

  def sync(self, step: int) -> bool:
    # The save at the end of step − 1 records the data position and the pieces' host state
    # after that step: step is not dispatched (which draws its batch) before it.
    return self.enabled and (step % self.every == 0 or step in self.boundaries)

  def finish(self, state: PyTree, final_eval: dict[str, Any]) -> None:
    """The save at the end of the run (unless that step is already saved)."""
    n = self.num_steps
    if not self.enabled or self.mgr.latest_step() == n:
      return
    self.last_eval = {"eval/loss": final_eval["eval/loss"]}
    forced = n % self.every != 0 or n in self.boundaries
    why = "; ".join(r for r in ("end of run" if n % self.every else None,
                                self.boundaries.get(n)) if r)
    self.save(n, n - 1, state, force=forced, reason=why or None)


class Clock(Hook):
  """Steps per second after the first step (which compiles every jitted function)."""

  def __init__(self):
    self.first: float | None = None
    self.last: float | None = None
    self.steps = 0

  def end(self, step: int, state: PyTree, row: dict[str, Any]) -> None:
    now = time.perf_counter()
    if self.first is None:
      self.first = now
    else:
      self.last, self.steps = now, self.steps + 1

  @property
  def steps_per_second(self) -> float:
    return self.steps / (self.last - self.first) if self.steps else float("nan")


class ProgressBar(Hook):
  """A tqdm bar over the run with the loss, λ_c and η·λ_c; its clock starts after the first
  step (which compiles), so the ETA leaves compilation out."""

  def __init__(self, *, total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                    mininterval=0.5, desc=desc)
    self.first, self.last = initial, total - 1

  def end(self, step: int, state: PyTree, row: dict[str, Any]) -> None:
    if step == self.first:
      self.bar.start_t = self.bar.last_print_t = time.time()
    self.bar.update(1)
    if step % 10 == 0 or step == self.last:
      self.bar.set_postfix(_postfix(row), refresh=False)

  def close(self) -> None:
    self.bar.close()


def _postfix(row: dict) -> dict:
  out = {"loss": f"{row.get('train/loss', float('nan')):.4g}"}
  if "curv/critical_sharpness" in row:
    out["λc"] = f"{row['curv/critical_sharpness']:.4g}"
  if "curv/lr_sharpness" in row:
    out["ηλc"] = f"{row['curv/lr_sharpness']:.3g}"
  return out


TIERS = tuple(convergence.CHECKPOINT_TIERS)


def tier_name(level: int) -> str:
  """The checkpoint tier name of a tier level (0 preliminary … 3 release)."""
  return TIERS[level]
