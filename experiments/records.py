"""The run directory's records: metric rows, the audit log and JSON values.

One implementation of each, shared by every runner (``experiments.trainer``,
``experiments.distillation``, ``experiments.plots``):

``to_json(x, *, nonfinite="keep")``
    JSON-ready Python data from scalars, NumPy / JAX arrays, dicts, lists and tuples: a bool
    array element becomes ``bool``, an integer ``int``, a float ``float`` (a float32 value is
    widened exactly, so the row holds the float32 number). ``nonfinite="keep"`` keeps NaN /
    ±inf (Python's ``json`` writes ``NaN`` / ``Infinity`` and reads them back: the metrics
    rows); ``nonfinite="null"`` writes ``None`` (strict JSON: the audit log).
``MetricWriter(workdir, *, tensorboard=True, resume_step=None, enabled=True)``
    ``workdir/metrics.jsonl`` (one row ``{"step": t, <metric>: value, ...}`` per
    :meth:`MetricWriter.write`, keys sorted, flushed every row) and TensorBoard scalars.
    ``resume_step``: append to the file (already truncated with :func:`truncate_rows`) and
    hide older TensorBoard events from that step on. ``enabled=False`` writes nothing (the
    processes other than 0 of a multi-host run).
``append_audit(workdir, record, name=AUDIT_LOG)`` / ``read_audit(workdir, name=AUDIT_LOG)`` /
``truncate_audit(workdir, step, name=AUDIT_LOG)``
    The audit log ``workdir/audit.jsonl`` through the library's ``convergence.AuditLog``
    (``.append`` / ``.read``): one strict-JSON object per line (NaN → null); reading skips a
    torn last line; truncation keeps the lines with ``step`` below ``step`` (on resume).
``truncate_rows(path, step)``
    Keeps the JSON lines of ``path`` whose ``step`` is below ``step`` (verbatim, atomically
    replaced); returns the kept lines.
``write_config(config, workdir)``
    The resolved config as ``workdir/config.json`` (sorted keys, indented).
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

import convergence

Summary = None  # tensorboardX's Summary proto, imported with the first TensorBoard writer
AUDIT_LOG = "audit.jsonl"
METRICS_FILE = "metrics.jsonl"


def to_json(x: Any, *, nonfinite: str = "keep") -> Any:
  """JSON-ready data from ``x`` (module docstring); ``nonfinite`` is "keep" or "null"."""
  if nonfinite not in ("keep", "null"):
    raise ValueError(f"nonfinite={nonfinite!r} is not one of ['keep', 'null'].")
  return _to_json(x, nonfinite == "null")


def _to_json(x: Any, null: bool) -> Any:
  # The types of a metric row first: the loop converts every row, so these are the hot path.
  t = type(x)
  if t is float or t is np.float32 or t is np.float64:
    x = float(x)
    return None if null and not math.isfinite(x) else x
  if t is int or t is bool or t is str or x is None:
    return x
  if t is np.int32 or t is np.int64:
    return int(x)
  if t is np.bool_:
    return bool(x)
  if isinstance(x, Mapping):
    return {k: _to_json(v, null) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v, null) for v in x]
  if x is None or isinstance(x, str):
    return x
  if isinstance(x, bool):
    return x
  if isinstance(x, int):
    return int(x)
  if isinstance(x, float):
    return None if null and not math.isfinite(x) else float(x)
  a = np.asarray(x)  # NumPy scalars and arrays, JAX arrays (one host transfer)
  if a.ndim:
    return [_to_json(v, null) for v in a]
  if a.dtype == np.bool_:
    return bool(a)
  if np.issubdtype(a.dtype, np.integer):
    return int(a)
  if np.issubdtype(a.dtype, np.floating):
    return _to_json(float(a), null)
  return str(x)


class MetricWriter:
  """Appends metric rows to ``metrics.jsonl`` (flushed every row) and to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True, *, resume_step: int | None = None,
               enabled: bool = True):
    """``resume_step``: append to ``metrics.jsonl`` (already truncated to the rows before it)
    and hide older TensorBoard events from that step on (``purge_step``). ``enabled=False``
    (the processes other than 0 of a multi-host run) writes nothing."""
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._tb = None
    if not enabled:
      return
    self._file = open(self.path, "w" if resume_step is None else "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      global Summary  # pylint: disable=global-statement
      from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
      Summary = summary_pb2.Summary
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One row ``{"step": step, **metrics}``; values are scalars (host or device)."""
    if self._file is None:
      return
    row = {"step": int(step)}
    row.update({k: to_json(v) for k, v in sorted(metrics.items())})
    # Python's json writes NaN / Infinity for non-finite floats; json.loads reads them back.
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      # One event per row holding every finite scalar (TensorBoard reads each value by its
      # tag), rather than one event per scalar: a tenth of the host time.
      values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()
                if k != "step" and math.isfinite(float(v))]
      events = self._tb._get_file_writer()  # pylint: disable=protected-access
      events.add_summary(Summary(value=values), int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Write the resolved config as ``workdir/config.json``."""
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write("\n")


# ------------------------------------------------------------------------------ JSON lines


def truncate_rows(path: str, step: int) -> list[str]:
  """Keeps the lines of the JSON-lines file ``path`` whose ``step`` is below ``step``.

  Lines are kept verbatim (no re-serialisation, so bytes are unchanged); an unparsable line
  (a write torn by a kill) is dropped. The file is replaced atomically. Returns the kept
  lines ([] and a warning when the file does not exist).
  """
  if not os.path.exists(path):
    logging.warning("resuming without %s: rows before the restored step are missing", path)
    return []
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.endswith("\n"):
        continue  # torn last line
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if int(row.get("step", -1)) < step:
        kept.append(line)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return kept


def append_audit(workdir: str, record: Mapping[str, Any], name: str = AUDIT_LOG) -> None:
  """Appends one strict-JSON line (NaN → null) to ``workdir/name``."""
  convergence.AuditLog(os.path.join(workdir, name)).append(to_json(record, nonfinite="null"))


def read_audit(workdir: str, name: str = AUDIT_LOG) -> list[dict[str, Any]]:
  """The records of ``workdir/name`` ([] if absent; a torn last line is skipped)."""
  path = os.path.join(workdir, name)
  out = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          break
  return out


def truncate_audit(workdir: str, step: int, name: str = AUDIT_LOG) -> int:
  """Keeps the audit lines with ``step`` below ``step`` (on resume); returns how many."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return 0
  return len(truncate_rows(path, step))
