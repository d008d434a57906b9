"""experiments.loop alone: the order of the pieces, the row rule, run-ahead, rollback and stop.

The step is a host function (state = an int counter, loss = a table), so every test checks
the loop's bookkeeping against the sequence written out by hand, with nothing to compile.
"""

import json
import math
import os

import pytest

from experiments import loop
from experiments import records


class Recorder(loop.Hook):
  """Logs every call; rolls back / syncs at the steps it is given."""

  def __init__(self, log, *, rollback_at=(), sync_at=(), measure_at=()):
    self.log, self.rollback_at, self.sync_at = log, set(rollback_at), set(sync_at)
    self.measure_at = set(measure_at)

  def before(self, step, state, batch):
    self.log.append(("before", step, state))
    return {"probe": 1.0} if step in self.measure_at else {}

  def observe(self, step, state, row):
    self.log.append(("observe", step, state))
    row["seen"] = 1
    return loop.Verdict(rollback=step in self.rollback_at)

  def end(self, step, state, row):
    self.log.append(("end", step, state))

  def sync(self, step):
    return step in self.sync_at


def _run(tmp_path, hook, losses, *, steps=4, log_every=2):
  log = hook.log
  batches = iter(range(100))

  def step_fn(state, batch):
    log.append(("step", state, batch))
    return state + 1, {"train/loss": losses[batch]}

  writer = records.MetricWriter(str(tmp_path), tensorboard=False)
  end = loop.run(0, range(steps), step_fn=step_fn, next_batch=lambda: next(batches),
                 hooks=[hook], writer=writer, log_every=log_every,
                 skip_update=lambda state, step: state + 100)
  writer.close()
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return end, rows


def test_runs_ahead_and_writes_rows_by_the_rule(tmp_path):
  log = []
  end, rows = _run(tmp_path, Recorder(log, measure_at={1}), [1.0, 2.0, 3.0, 4.0])
  # Step t+1 is dispatched (before + step) before step t is observed: values read one late.
  assert log[:7] == [("before", 0, 0), ("step", 0, 0), ("before", 1, 1), ("step", 1, 1),
                     ("observe", 0, 0), ("end", 0, 1), ("before", 2, 2)]
  assert end == loop.LoopEnd(4, {"train/loss": 4.0, "seen": 1}, None)
  # Rows: t % 2 == 0, the measured step 1, the last step; observe's keys included.
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  assert rows[1] == {"step": 1, "probe": 1.0, "seen": 1, "train/loss": 2.0}
  log.clear()
  _, rows = _run(tmp_path, Recorder(log), [1.0] * 5, steps=5, log_every=3)
  assert [r["step"] for r in rows] == [0, 3, 4]


def test_sync_waits_and_rollback_skips_the_update(tmp_path):
  log = []
  end, rows = _run(tmp_path, Recorder(log, rollback_at={1}, sync_at={2}),
                   [1.0, math.nan, 3.0, 4.0])
  # Step 2 waits for step 1's verdict; the rollback continues from skip_update(1, 1) = 101.
  i = log.index(("observe", 1, 1))
  assert log[i:i + 3] == [("observe", 1, 1), ("end", 1, 101), ("before", 2, 101)]
  assert ("step", 101, 2) in log and end.state == 103 and end.stopped_at is None
  assert [r["step"] for r in rows] == [0, 1, 2, 3]  # the non-finite step 1 is logged


def test_non_finite_loss_stops_and_unsynced_rollback_is_refused(tmp_path):
  log = []
  end, rows = _run(tmp_path, Recorder(log), [1.0, 2.0, math.inf, 4.0])
  assert end.stopped_at == 2 and end.state == 2  # the state before the diverged update
  assert ("end", 2, 3) not in log and [r["step"] for r in rows] == [0, 2]
  with pytest.raises(RuntimeError, match="sync"):
    _run(tmp_path, Recorder([], rollback_at={1}), [1.0] * 4)
