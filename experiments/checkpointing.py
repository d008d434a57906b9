"""The runner's checkpoint glue: what a checkpoint holds, and how a run resumes from one.

``experiments.trainer.train_and_evaluate`` saves through
:class:`convergence.TieredCheckpointManager` into ``workdir/checkpoints/`` (Orbax step
directories plus the tier ledger ``tiers.json``). One checkpoint at step ``s`` is the state
*before* update ``s`` (after ``s`` updates) and holds everything that decides the rows
``s, s+1, ...`` of ``metrics.jsonl``:

* ``state`` (arrays, per-leaf SHA-256 verified at restore): ``train`` — the ``TrainState``
  (step, params, optax state with the probe states); ``rng`` — the probe PRNG key (new-style);
  ``host`` — host-side loop state that later metrics read: ``rel_guess``, the warm start of the
  relative-sharpness searches; ``monitor`` (with ``config.monitor.enabled``) — the convergence
  monitor's whole state (anomaly detector windows, evidence windows and Kalman levels, the
  network's decayed evidence, tables and last decision, and the host counters: tier of the
  newest checkpoint, release given, emergency saves, rollbacks), packed into one array per
  dtype (``convergence.Monitor.pack``).
* tier, kind (regular / forced at a stage boundary or a hyper-parameter change / emergency)
  and reason in the ledger ``tiers.json`` (see ``experiments.monitoring`` for the promotion
  rule).
* ``metadata`` (JSON, sealed by a digest): the resolved config, the data-iterator position
  (``IteratorState`` per task; ``None`` in full-batch mode), the dataset fingerprint
  (``Dataset.info``: sizes and, for text, the corpus SHA-256), library versions (informational).

Resume (``config.checkpoint.resume``, default True): if ``workdir/checkpoints`` holds a committed
checkpoint, the run restores the newest one that verifies (skipping corrupt ones and then
deleting them by ``rollback``), keeps the ``metrics.jsonl`` rows with ``step <`` the restored
step (verbatim; a torn last line is dropped) and continues, so the finished file is
byte-identical to an uninterrupted run's. TensorBoard gets a new event file whose ``purge_step``
hides the older events from the restored step on.

A resume is refused (:class:`ResumeRefused`, listing the fields) when the saved config differs
from the current one in a field that changes the training maths or the metric values; only the
fields in :data:`RESUME_SAFE_FIELDS` may change. Overrides: ``checkpoint.allow_config_change=True``
resumes anyway (with a warning; the state must still have the same structure), and
``checkpoint.resume=False`` moves the old run directory aside to ``<workdir>.prev-<n>`` and starts
fresh (nothing is deleted).
"""

from __future__ import annotations

import datetime
import json
import logging as py_logging
import os
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections

from experiments import config_lib

CHECKPOINT_DIR = "checkpoints"
RESUME_LOG = "resume_log.jsonl"

# Fields that may differ between the saved and the current config without changing the training
# trajectory or the value of any logged metric: they change only which steps are measured /
# logged, presentation, or checkpointing itself. (relative_every is NOT here: the relative
# searches warm-start from the previous measurement, so their values depend on the cadence.)
RESUME_SAFE_FIELDS = (
    "progress_bar",
    "plots",
    "log_every",
    "eval_every",
    "probe.lanczos_every",
    "probe.preconditioned_every",
    "checkpoint.*",
    # Placement only: a run may resume on another mesh or number of hosts (Orbax re-shards on
    # restore). The values agree with the single-device run to float32 reduction order.
    "mesh.*",
    "distributed.*",
)


class ResumeRefused(RuntimeError):
  """The workdir holds a run that this config cannot continue; the message says why and how."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds a committed step directory (tmp dirs do not count)."""
  d = checkpoint_dir(workdir)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _is_safe(key: str) -> bool:
  for pattern in RESUME_SAFE_FIELDS:
    if pattern.endswith(".*") and key.startswith(pattern[:-1]):
      return True
    if key == pattern:
      return True
  return False


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON data (tuples become lists), as saved in config.json and checkpoints."""
  return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]
                       ) -> tuple[list[str], list[str]]:
  """``(blocking, safe)``: ``"key: saved → current"`` lines of the fields that differ.

  ``blocking`` lists the fields outside :data:`RESUME_SAFE_FIELDS` (a field present in only one
  of the two configs counts as differing, shown as ``<absent>``).
  """
  a, b = config_lib.flatten_config(saved), config_lib.flatten_config(current)
  blocking, safe = [], []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va != vb:
      (safe if _is_safe(key) else blocking).append(f"{key}: {va!r} → {vb!r}")
  return blocking, safe


def check_config(saved: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                 where: str, workdir: str, quiet: bool = False) -> list[str]:
  """Refuses (or, with ``allow_config_change``, warns) if ``saved`` differs in maths fields.

  Returns every changed field as ``"key: saved → current"`` (for the resume log); ``quiet``
  skips the log messages (an early check that is repeated later).
  """
  blocking, safe = config_differences(saved, config_json(config))
  if blocking:
    listing = "\n  ".join(blocking)
    if not config.checkpoint.allow_config_change:
      raise ResumeRefused(
          f"workdir {workdir!r} holds checkpoints of a run whose config ({where}) differs in "
          f"fields that change the training maths or the metrics:\n  {listing}\n"
          "Resuming would mix two different runs in one metrics.jsonl. Choose one: use a new "
          "--workdir; pass --config.checkpoint.resume=False to move the old run aside to "
          f"{workdir.rstrip(os.sep)}.prev-<n> and start fresh; or pass "
          "--config.checkpoint.allow_config_change=True to continue the old state under the "
          "new config.")
    if not quiet:
      logging.warning("resuming %s under a changed config (checkpoint.allow_config_change=True):"
                      "\n  %s", workdir, listing)
  if safe and not quiet:
    logging.info("resuming with changed logging/checkpoint fields: %s", "; ".join(safe))
  return blocking + safe


def check_data(saved: Any, current: Any, *, workdir: str, allow: bool) -> None:
  """Refuses if the dataset fingerprint changed (e.g. data.path's file was edited)."""
  saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
  if saved == current:
    return
  message = (f"the data of the run in {workdir!r} changed since it was checkpointed "
             f"(saved {saved}, now {current}); the same config no longer means the same data.")
  if not allow:
    raise ResumeRefused(message + " Use a new --workdir, --config.checkpoint.resume=False, or "
                        "--config.checkpoint.allow_config_change=True.")
  logging.warning("%s Continuing (checkpoint.allow_config_change=True).", message)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Creates ``workdir`` and says whether the run resumes from its checkpoints.

  With ``checkpoint.resume`` False an old run is moved aside (:func:`move_aside`) and the run
  starts fresh. When resuming, the saved ``config.json`` is checked against ``config`` first
  (a cheap early refusal, before data and compilation; the checkpoint's own copy of the config
  is checked again after the restore) unless ``checkpoint.allow_config_change``.
  """
  ck = config.checkpoint
  os.makedirs(workdir, exist_ok=True)
  resuming = has_checkpoints(workdir)
  if resuming and not ck.resume:
    move_aside(workdir)
    os.makedirs(workdir)
    resuming = False
  saved = os.path.join(workdir, "config.json")
  if resuming and not ck.allow_config_change and os.path.exists(saved):
    with open(saved, encoding="utf-8") as f:
      check_config(json.load(f), config, where="config.json", workdir=workdir, quiet=True)
  return resuming


def close_after_error(mgr) -> None:
  """Closes ``mgr`` (waiting for a save in flight) while an error propagates, logging rather
  than raising a second error so the first one is not masked."""
  try:
    mgr.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("closing the checkpoint manager after an error: %s", e)


def move_aside(workdir: str) -> str:
  """Renames ``workdir`` to the first free ``<workdir>.prev-<n>``; returns the new path."""
  base = os.path.normpath(workdir)
  n = 1
  while os.path.exists(f"{base}.prev-{n}"):
    n += 1
  dest = f"{base}.prev-{n}"
  try:
    os.rename(base, dest)
  except OSError as e:
    raise ResumeRefused(
        f"checkpoint.resume=False: could not move the old run {base!r} aside to {dest!r} ({e}); "
        "move or delete it yourself, or use a new --workdir.") from e
  logging.warning("checkpoint.resume=False: moved the previous run in %s to %s", base, dest)
  return dest


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's INFO chatter (several lines per save) from absl's log; keeps warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


_QUIET_ORBAX = _QuietOrbax()


def make_manager(config: ml_collections.ConfigDict, workdir: str):
  """The ``convergence.TieredCheckpointManager`` of ``workdir``, as ``config.checkpoint`` says."""
  import convergence  # pylint: disable=g-import-not-at-top  (Orbax import only when needed)
  absl_logger = py_logging.getLogger("absl")
  if _QUIET_ORBAX not in absl_logger.filters:
    absl_logger.addFilter(_QUIET_ORBAX)
  c = config.checkpoint

  def keep(n):
    return None if n < 0 else int(n)

  retention = convergence.TierRetention(
      preliminary=keep(c.keep_preliminary), observation=keep(c.keep_observation),
      candidate=keep(c.keep_candidate), candidate_metric=c.candidate_metric,
      candidate_mode=c.candidate_mode)
  mgr = convergence.TieredCheckpointManager(
      checkpoint_dir(workdir), retention=retention, save_interval_steps=int(c.every),
      async_save=bool(c.async_save))
  # async_save: the manager's calls also leave the training thread (BackgroundManager), in a
  # one-process run only. With several processes a save runs collectives (Orbax's barriers, the
  # exchange of the checksum digests) that must stay in the same order as the training step's
  # collectives on every process, i.e. on the main thread; Orbax still writes in the background.
  if c.async_save and jax.process_count() == 1:
    return BackgroundManager(mgr)
  return mgr


class BackgroundManager:
  """Runs every call of a ``TieredCheckpointManager`` on one worker thread.

  ``save`` and ``emergency_save`` return as soon as the call is queued, so the training loop
  does not wait for the checksums and Orbax's synchronous set-up (host copies, directories),
  which cost about a train step of the tiny GPT (benchmarks/checkpoint_bench.py); Orbax's own
  background thread then writes the files. Every other method waits for the queued calls
  and returns the result of its own. All calls run on the same thread in submission order,
  which keeps the manager's one-thread rule and its step ordering. An error of a queued
  save is raised by the next call that waits (``close`` included), as Orbax's asynchronous
  errors are.

  One-process runs only (``make_manager``): with several processes the manager's calls run
  collectives, which must not leave the main thread.

  The arrays handed to ``save`` must not change afterwards: JAX arrays are immutable and the
  runner does not donate buffers, so the state of step s stays valid while step s+1 runs.
  """

  _QUEUED = ("save", "emergency_save")

  def __init__(self, mgr):
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    self._mgr = mgr
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
    self._queued: list = []

  def _raise_queued(self) -> None:
    queued, self._queued = self._queued, []
    for f in queued:
      f.result()  # re-raises the error of a failed save

  def _call(self, name: str, *args, **kwargs):
    future = self._pool.submit(getattr(self._mgr, name), *args, **kwargs)
    if name in self._QUEUED:
      self._queued.append(future)
      return True
    try:
      return future.result()
    finally:
      self._raise_queued()

  def __getattr__(self, name: str):
    attr = getattr(self._mgr, name)
    if not callable(attr):
      return attr
    return lambda *args, **kwargs: self._call(name, *args, **kwargs)

  def close(self) -> None:
    try:
      self._call("close")
    finally:
      self._pool.shutdown(wait=True)


def abstract(tree):
  """Shapes, dtypes and shardings of ``tree`` (the restore target), without copying data.

  Orbax restores each leaf with the sharding given here, so a state laid out on the current
  mesh restores onto that mesh whatever mesh it was saved from.
  """
  def one(x):
    if not isinstance(x, jax.Array):  # Python scalars, NumPy: as jax.eval_shape sees them
      return jax.eval_shape(lambda: x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                weak_type=bool(getattr(x, "weak_type", False)))
  return jax.tree.map(one, tree)


def restore(mgr, target, *, max_step: int, workdir: str):
  """Restores the newest verified checkpoint ≤ ``max_step`` and deletes the newer ones.

  Returns ``convergence.Restored``. A state whose structure differs from ``target`` (the config
  builds another model or optimizer) raises :class:`ResumeRefused`.
  """
  import convergence  # pylint: disable=g-import-not-at-top
  try:
    restored = mgr.restore_latest_valid(target, max_step=max_step)
  except convergence.CorruptCheckpointError as e:
    raise ResumeRefused(
        f"no checkpoint in {checkpoint_dir(workdir)!r} verifies (the oldest fails with: {e}). "
        "Inspect them, or pass --config.checkpoint.resume=False to move the run aside and start "
        "fresh.") from e
  except FileNotFoundError as e:
    raise ResumeRefused(
        f"{e}: every checkpoint lies beyond num_steps={max_step}. Use a new --workdir or "
        "--config.checkpoint.resume=False.") from e
  except ValueError as e:
    raise ResumeRefused(
        f"the checkpoints in {checkpoint_dir(workdir)!r} hold a state of another structure than "
        f"the one this config builds ({e}). Use a new --workdir or "
        "--config.checkpoint.resume=False.") from e
  for step, why in restored.skipped:
    logging.warning("checkpoint %d skipped: %s", step, why)
  newer = [s for s in mgr.all_steps() if s > restored.step]
  if newer:
    # Every newer step failed verification (or lies beyond num_steps under
    # allow_config_change); delete them, or Orbax would skip the saves at those steps.
    logging.warning("rolling back to step %d: deleting checkpoints %s", restored.step, newer)
    restored = mgr.rollback(restored.step, target, force=True)._replace(
        skipped=restored.skipped)
  return restored


def log_resume(workdir: str, entry: Mapping[str, Any]) -> None:
  """Appends one JSON line to ``workdir/resume_log.jsonl`` (audit trail of resumes)."""
  entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **entry}
  with open(os.path.join(workdir, RESUME_LOG), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")


def versions() -> dict[str, str]:
  """Library versions recorded in each checkpoint (informational, not compared)."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def restore_checked(config, workdir: str, mgr, target, data_info):
  """Restores the newest verified checkpoint at or below ``config.num_steps`` and checks that
  its config and data agree with the current ones (raising :class:`ResumeRefused` if not).

  Returns ``(restored, changed)``: the restored checkpoint and the config fields that changed
  in a resume-safe way. Shared by the trainer's and the distillation runner's resume.
  """
  restored = restore(mgr, abstract(target), max_step=config.num_steps, workdir=workdir)
  meta = restored.metadata
  changed = check_config(meta["config"], config, workdir=workdir,
                         where=f"checkpoint at step {restored.step}")
  check_data(meta["data"], data_info, workdir=workdir,
             allow=config.checkpoint.allow_config_change)
  return restored, changed
