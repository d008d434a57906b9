"""Tiered, verified, asynchronous checkpoints over Orbax's ``CheckpointManager``.

One checkpoint is one Orbax step directory holding two items written in one commit:

* ``state`` — the whole state pytree (params, optimizer and probe states, new-style PRNG
  keys, counters, Python scalars) through ``StandardSave``;
* ``meta``  — a JSON document: the caller's metadata (config, data-iterator position,
  monitor and posterior summaries, ...), the tier, kind, reason and metrics at save time,
  and a manifest with one SHA-256 checksum per state leaf, itself sealed by a digest.

Atomicity comes from Orbax: every item is written into ``<step>.orbax-checkpoint-tmp-*``
and the directory is renamed to ``<step>`` only after all writes finished, so a process
killed mid-save leaves a temporary directory (ignored, and removed on the next open with
``cleanup_tmp_directories=True``) and never a half-written ``<step>`` (tested with
SIGKILL; durability across power loss is the file system's rename guarantee). The checksums add
what Orbax lacks: Orbax restores flipped bytes silently (orbax-checkpoint 0.12), here a restore
recomputes every leaf's checksum and refuses with :class:`CorruptCheckpointError` naming
the step and the leaf.

Tiers (``preliminary → observation → candidate → release``) live in a small ledger file
(``tiers.json``, fsynced and replaced atomically) because a promotion must not rewrite a
committed checkpoint. On open the ledger is reconciled with the step directories: entries
without a directory (a save killed before its commit) are dropped, and a directory without
an entry gets its save-time tier back from its own ``meta`` item. Only promotions and
unpinning live solely in the ledger; losing the file reverts those steps to their
save-time tier.

Retention, decided after reading the Orbax 0.12 API:

* Saves use a custom Orbax ``PreservationPolicy`` that asks this manager's tier rules.
  Orbax evaluates it when ``save`` is called but deletes only in its finalize thread
  *after* the new checkpoint committed, and not at all if the save failed; own deletion
  on top of an asynchronous save would have to wait for the commit itself.
* The built-in ``LatestN``/``BestN`` cannot express tiers that change after a save
  (promotion), and ``BestN`` ranks NaN as best; one manager per tier directory would turn
  a promotion into a non-atomic copy between directories and split the global step order
  that Orbax's "skip steps <= latest" rule depends on.
* Promotions, unpinning and rollbacks change retention without a save, so they delete
  through ``CheckpointManager.delete`` directly, after waiting for any save in flight,
  with the same rule function.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import tempfile
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from convergence import _checksum

_log = logging.getLogger(__name__)

CHECKPOINT_TIERS = ('preliminary', 'observation', 'candidate', 'release')
_TIER_RANK = {t: i for i, t in enumerate(CHECKPOINT_TIERS)}
_LEDGER_NAME = 'tiers.json'
_FORMAT = 1
_PY_PLACEHOLDER = {'bool': False, 'int': 0, 'float': 0.0}


class CorruptCheckpointError(Exception):
  """A checkpoint exists but its contents do not verify.

  Attributes:
    step: the checkpoint step.
    leaf: the leaf path that failed (``'<metadata>'`` for the JSON item, ``None`` when
      Orbax could not read the state at all).
  """

  def __init__(self, step: int, leaf: str | None, detail: str):
    self.step = step
    self.leaf = leaf
    where = f'leaf {leaf!r}' if leaf is not None else 'state'
    super().__init__(f'checkpoint at step {step} is corrupt: {where} {detail}')


class CheckpointSaveError(RuntimeError):
  """An (asynchronous) save failed; the step named in the message was not committed."""


@dataclasses.dataclass(frozen=True)
class TierRetention:
  """How many checkpoints each tier keeps.

  Attributes:
    preliminary: keep the latest N unpinned preliminary checkpoints (None: all).
    observation: keep the latest M unpinned observation checkpoints (None: all).
    candidate: keep the best k unpinned candidates by `candidate_metric` (None: all).
      A NaN or missing metric ranks worst (+inf when minimising, -inf when maximising);
      ties keep the later step.
    candidate_metric: metric name used to rank candidates.
    candidate_mode: ``'min'`` or ``'max'``.
    keep_newest: always keep the newest checkpoint, whatever its tier, so a crash can
      resume from the last save (a candidate saved with a poor metric is deleted by the
      next save, not by its own).

  Release checkpoints and pinned checkpoints (emergency saves) are never deleted by
  retention.
  """

  preliminary: int | None = 3
  observation: int | None = 3
  candidate: int | None = 3
  candidate_metric: str = 'loss'
  candidate_mode: str = 'min'
  keep_newest: bool = True

  def __post_init__(self):
    for name in ('preliminary', 'observation', 'candidate'):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ValueError(f'TierRetention.{name} must be None or an int >= 0, got {v!r}')
    if self.candidate_mode not in ('min', 'max'):
      raise ValueError(
          f"TierRetention.candidate_mode must be 'min' or 'max', got {self.candidate_mode!r}"
      )


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
  """What the manager knows about one checkpoint (a read-only copy of its ledger entry).

  Attributes:
    step: the training step.
    tier: one of ``CHECKPOINT_TIERS``.
    kind: ``'regular'``, ``'forced'`` (stage boundary, hyper-parameter change) or
      ``'emergency'``; ``'unknown'`` if the metadata could not be read on open.
    reason: why a forced or emergency save happened, or the last promotion's reason.
    metrics: Python floats, as saved and updated by promotions.
    pinned: kept regardless of tier retention until :meth:`unpin`.
    history: ``({'tier', 'reason', 'time'}, ...)`` of the save and each promotion.
  """

  step: int
  tier: str
  kind: str
  reason: str | None
  metrics: Mapping[str, float]
  pinned: bool
  history: tuple


class Restored(NamedTuple):
  """Result of a restore.

  Attributes:
    step: the step restored.
    state: the state pytree, verified leaf by leaf against the saved checksums.
    metadata: the caller's JSON metadata saved with it.
    record: the checkpoint's :class:`CheckpointRecord`.
    skipped: for :meth:`TieredCheckpointManager.restore_latest_valid`, ``((step, error
      message), ...)`` of the newer checkpoints that failed verification.
  """

  step: int
  state: Any
  metadata: Any
  record: CheckpointRecord
  skipped: tuple = ()


def _check_tier(tier, name='tier') -> str:
  if tier not in _TIER_RANK:
    raise ValueError(f'{name}={tier!r} is not a tier; expected one of {CHECKPOINT_TIERS}')
  return tier


def _check_step(step, name='step') -> int:
  # numpy / jax integer scalars are accepted (a step often comes out of the state),
  # floats and bools are not.
  if isinstance(step, jax.Array) and step.shape == () and jnp.issubdtype(step.dtype, jnp.integer):
    step = int(step)
  elif isinstance(step, (int, np.integer)) and not isinstance(step, (bool, np.bool_)):
    step = int(step)
  else:
    raise ValueError(f'{name} must be a non-negative int, got {step!r}')
  if step < 0:
    raise ValueError(f'{name} must be a non-negative int, got {step!r}')
  return step


def _now() -> str:
  return datetime.datetime.now(tz=datetime.timezone.utc).isoformat(timespec='seconds')


def retained_steps(
    records: Mapping[int, Mapping[str, Any]], retention: TierRetention
) -> set[int]:
  """The steps that `retention` keeps among `records` (``{step: ledger entry}``).

  Pure function of the ledger: releases and pinned steps always; per tier the latest N
  (preliminary, observation) or best k by the sanitised metric (candidate); and the
  newest step when ``retention.keep_newest``.
  """
  keep = set()
  by_tier: dict[str, list[int]] = {t: [] for t in CHECKPOINT_TIERS}
  for step, rec in records.items():
    if rec['tier'] == 'release' or rec['pinned']:
      keep.add(step)
    else:
      by_tier[rec['tier']].append(step)
  for tier in ('preliminary', 'observation'):
    steps = sorted(by_tier[tier])
    n = getattr(retention, tier)
    keep.update(steps if n is None else steps[max(len(steps) - n, 0):])
  cands = by_tier['candidate']
  k = retention.candidate
  if k is None:
    keep.update(cands)
  elif k:
    sign = 1.0 if retention.candidate_mode == 'min' else -1.0

    def badness(s):
      v = records[s]['metrics'].get(retention.candidate_metric)
      return sign * _checksum.sanitised_rank_value(v, retention.candidate_mode)

    # Sort by badness, then newer first, and keep the first k.
    keep.update(sorted(cands, key=lambda s: (badness(s), -s))[:k])
  if retention.keep_newest and records:
    keep.add(max(records))
  return keep


class _TierPreservationPolicy:
  """Orbax ``PreservationPolicy`` that defers to the owning manager's tier rules."""

  def __init__(self, owner: 'TieredCheckpointManager'):
    self._owner = owner

  def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
    del context
    steps = [c.step for c in checkpoints]
    keep = self._owner._retained(steps)
    return [s in keep for s in steps]



def _is_empty(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype') and math.prod(x.shape) == 0


def _without_empty(tree):
  """`tree` with zero-size arrays replaced by None (an empty subtree): Orbax refuses to save
  them ("Cannot save arrays with zero size"), e.g. a controller with no rules keeps a (0,)
  array of rule counts. Their shape and dtype are in the manifest; restore refills them."""
  if tree is None:
    return None
  return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _refill_empty(state, manifest: Mapping[str, Any]):
  """Puts back the zero-size leaves :func:`_without_empty` took out, from the manifest."""
  def fill(path, x):
    if x is not None:
      return x
    want = manifest.get(_checksum.leaf_path(path))
    if want is None or math.prod(want['shape']) != 0:
      return x
    return jnp.zeros(want['shape'], want['dtype'])
  return jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda x: x is None)

class TieredCheckpointManager:
  """Tiered, checksummed, asynchronous checkpoints of a complete training state.

  Example::

    mgr = TieredCheckpointManager(workdir / 'checkpoints',
                                  retention=TierRetention(preliminary=3, candidate=2))
    mgr.save(step, state, metadata={'config': cfg, 'data_position': pos},
             metrics={'loss': float(loss)})
    ...
    mgr.promote(step, 'candidate', metrics={'loss': val_loss}, reason='posterior 0.93')
    restored = mgr.restore_latest_valid(jax.eval_shape(init_state))
    state, pos = restored.state, restored.metadata['data_position']

  Not thread-safe: call it from one thread. A state saved from one mesh verifies when
  restored onto another (the checksums, ``convergence._checksum``, are checked per saved
  block whatever the new layout).

  Several processes (multi-host): every process makes the same calls in the same order, from
  the thread that runs the training collectives (the main thread). ``save`` and ``restore``
  run collectives there: Orbax's own barriers, one small all-gather of the per-block digests
  (each process hashes only the blocks it owns; no leaf is gathered) and, on restore, one of
  the per-block verdicts. With ``async_save`` Orbax writes the files on its own thread, which
  runs no device collective. Each process writes the same tier ledger.
  """

  def __init__(
      self,
      directory: os.PathLike | str,
      *,
      retention: TierRetention = TierRetention(),
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: root directory; Orbax step directories and ``tiers.json`` live in it.
      retention: per-tier retention rules.
      save_interval_steps: :meth:`save` without ``force`` writes only steps divisible by it.
      async_save: write in a background thread (Orbax async); :meth:`save` returns once
        the state is copied to host, errors surface in the next call that waits.

    Leftover temporary directories of interrupted saves are removed here.
    """
    if not isinstance(retention, TierRetention):
      raise ValueError(f'retention must be a TierRetention, got {type(retention).__name__}')
    if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f'save_interval_steps must be an int >= 1, got {save_interval_steps!r}')
    self._directory = epath.Path(os.fspath(directory)).absolute()
    self._retention = retention
    self._interval = save_interval_steps
    self._records: dict[int, dict[str, Any]] = {}
    self._in_flight: int | None = None
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_TierPreservationPolicy(self),
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._mgr = ocp.CheckpointManager(
        self._directory, options=options, item_names=('state', 'meta')
    )
    # Orbax 0.12 removes leftover temporary directories in a background thread and waits
    # for it only before the next save; wait now so the guarantee holds on return.
    await_cleanup = getattr(self._mgr, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      await_cleanup()
    self._reconcile(self._read_ledger())

  # ----------------------------------------------------------------------------- ledger

  @property
  def directory(self) -> epath.Path:
    return self._directory

  @property
  def retention(self) -> TierRetention:
    return self._retention

  def _ledger_path(self) -> str:
    return os.path.join(os.fspath(self._directory), _LEDGER_NAME)

  def _read_ledger(self) -> dict[int, dict[str, Any]]:
    path = self._ledger_path()
    if not os.path.exists(path):
      return {}
    try:
      with open(path) as f:
        doc = json.load(f)
      return {int(s): r for s, r in doc['records'].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
      # The ledger is a cache: tiers fall back to each checkpoint's own metadata.
      _log.warning('ignoring unreadable tier ledger %s (%s)', path, e)
      return {}

  def _write_ledger(self):
    live = set(self._mgr.all_steps())
    doc = {
        'format': _FORMAT,
        'records': {str(s): r for s, r in sorted(self._records.items()) if s in live},
    }
    # Replace atomically: a crash leaves either the old or the new ledger, never half.
    fd, tmp = tempfile.mkstemp(prefix='.tiers-', suffix='.tmp', dir=os.fspath(self._directory))
    try:
      with os.fdopen(fd, 'w') as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self._ledger_path())
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  def _reconcile(self, ledger: Mapping[int, dict[str, Any]]):
    """Makes the in-memory records match the step directories on disk."""
    records = {}
    for s in self._mgr.all_steps():
      if s in self._records:
        records[s] = self._records[s]
      elif s in ledger:
        records[s] = ledger[s]
      else:
        records[s] = self._record_from_checkpoint(s)
    self._records = records
    if os.path.isdir(os.fspath(self._directory)):
      self._write_ledger()

  def _record_from_checkpoint(self, step: int) -> dict[str, Any]:
    try:
      doc = self._read_meta(step)
    except CorruptCheckpointError as e:
      _log.warning('%s', e)
      return {'tier': 'preliminary', 'kind': 'unknown', 'reason': str(e), 'metrics': {},
              'pinned': False, 'history': []}
    return {
        'tier': doc['tier'], 'kind': doc['kind'], 'reason': doc['reason'],
        'metrics': doc['metrics'], 'pinned': doc['kind'] == 'emergency',
        'history': [{'tier': doc['tier'], 'reason': doc['reason'], 'time': doc['time']}],
    }

  def _retained(self, steps: Sequence[int]) -> set[int]:
    # A step without a record (should not happen after _reconcile) is kept: deleting
    # data on missing bookkeeping would be the wrong default.
    known = {s: self._records[s] for s in steps if s in self._records}
    return retained_steps(known, self._retention) | {s for s in steps if s not in known}

  def _apply_retention(self):
    """Deletes what retention no longer keeps (used when no save triggers Orbax's policy)."""
    self.wait_until_finished()
    steps = list(self._mgr.all_steps())
    keep = self._retained(steps)
    for s in steps:
      if s not in keep:
        self._mgr.delete(s)
        self._records.pop(s, None)
    self._write_ledger()

  # ------------------------------------------------------------------------------ query

  def all_steps(self) -> list[int]:
    """All committed (or in-flight) steps, ascending."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def steps(self, tier: str | None = None) -> list[int]:
    """Steps currently in `tier` (all steps when None), ascending."""
    if tier is not None:
      _check_tier(tier)
    return [s for s in self.all_steps() if tier is None or self._records[s]['tier'] == tier]

  def record(self, step: int) -> CheckpointRecord:
    """The :class:`CheckpointRecord` of `step`; ``ValueError`` if there is none."""
    step = self._existing_step(step)
    r = self._records[step]
    return CheckpointRecord(
        step=step, tier=r['tier'], kind=r['kind'], reason=r['reason'],
        metrics=dict(r['metrics']), pinned=r['pinned'],
        history=tuple(dict(h) for h in r['history']),
    )

  def _existing_step(self, step, name='step') -> int:
    step = _check_step(step, name)
    if step not in self._mgr.all_steps():
      raise ValueError(
          f'{name}={step} has no checkpoint in {self._directory}; '
          f'available steps: {self.all_steps()}'
      )
    return step

  def should_save(self, step: int) -> bool:
    """Whether :meth:`save` without ``force`` would write `step` (interval and order)."""
    step = _check_step(step)
    latest = self.latest_step()
    return step % self._interval == 0 and (latest is None or step > latest)

  # ------------------------------------------------------------------------------- save

  def save(
      self,
      step: int,
      state,
      *,
      tier: str = 'preliminary',
      metadata: Mapping[str, Any] | None = None,
      metrics: Mapping[str, Any] | None = None,
      force: bool = False,
      reason: str | None = None,
  ) -> bool:
    """Starts saving `state` and `metadata` as one checkpoint at `step`.

    Guarantees: when this returns True the state has been fingerprinted and copied for
    writing, and the checkpoint will appear complete and verified, or not at all (a
    failure is raised by the next :meth:`wait_until_finished`, :meth:`save` or restore,
    as :class:`CheckpointSaveError`). Retention of the other checkpoints is applied only
    after this one committed.

    Args:
      step: training step; must be greater than :meth:`latest_step` (Orbax would
        silently skip it otherwise; use :meth:`rollback` to go back).
      state: any pytree of arrays, PRNG key arrays and Python bool/int/float.
      tier: the initial tier, one of ``CHECKPOINT_TIERS``.
      metadata: JSON-like mapping (numpy/jax scalars and small arrays are converted).
      metrics: ``{name: scalar}``, stored as Python floats (NaN allowed; it ranks worst).
      force: write even if `step` is not on the save interval (stage boundaries,
        hyper-parameter changes); needs a `reason`.
      reason: why the save happened; recorded in the checkpoint and the ledger.

    Returns:
      True if a save was started, False if `step` is off the save interval.
    """
    step = _check_step(step)
    _check_tier(tier)
    if force and not reason:
      raise ValueError('reason: a forced save must say why (e.g. "stage boundary 2")')
    if not force and step % self._interval:
      return False
    return self._save(step, state, tier=tier, metadata=metadata, metrics=metrics,
                      kind='forced' if force else 'regular', reason=reason, pinned=False)

  def emergency_save(
      self,
      step: int,
      state,
      *,
      reason: str,
      tier: str = 'preliminary',
      metadata: Mapping[str, Any] | None = None,
      metrics: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves `state` (the last good state) as a pinned emergency checkpoint.

    Pinned checkpoints survive every retention rule until :meth:`unpin`. If `step`
    already has a checkpoint, that checkpoint is pinned instead and nothing is written.

    Returns:
      True if a new checkpoint was started, False if an existing one was pinned.
    """
    step = _check_step(step)
    _check_tier(tier)
    if not reason:
      raise ValueError('reason: an emergency save must say why (e.g. "NaN loss at step 812")')
    self.wait_until_finished()
    if step in self._mgr.all_steps():
      rec = self._records[step]
      rec['pinned'] = True
      rec['reason'] = reason
      rec['history'].append({'tier': rec['tier'], 'reason': f'emergency: {reason}', 'time': _now()})
      self._write_ledger()
      return False
    return self._save(step, state, tier=tier, metadata=metadata, metrics=metrics,
                      kind='emergency', reason=reason, pinned=True)

  def _save(self, step, state, *, tier, metadata, metrics, kind, reason, pinned) -> bool:
    # Surface a failure of the previous asynchronous save before starting another.
    self.wait_until_finished()
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(
          f'step={step} is not after the latest checkpoint ({latest}); Orbax would skip '
          'it. Call rollback(step) first to delete the newer checkpoints.'
      )
    metrics = _checksum.metrics_to_floats(metrics)
    user = _checksum.to_json({} if metadata is None else metadata, name='metadata')
    # The manifest is the structure of the state plus a checksum per leaf; it is written
    # in the same commit as the arrays, so it can never describe another checkpoint.
    manifest = _checksum.state_fingerprints(state)
    doc = {
        'format': _FORMAT, 'step': step, 'tier': tier, 'kind': kind, 'reason': reason,
        'metrics': metrics, 'metadata': user, 'leaves': manifest, 'time': _now(),
    }
    doc['digest'] = _checksum.canonical_digest(doc)
    # The record must exist before Orbax asks the preservation policy inside save().
    self._records[step] = {
        'tier': tier, 'kind': kind, 'reason': reason, 'metrics': metrics, 'pinned': pinned,
        'history': [{'tier': tier, 'reason': reason, 'time': doc['time']}],
    }
    args = ocp.args.Composite(state=ocp.args.StandardSave(_without_empty(state)),
                              meta=ocp.args.JsonSave(doc))
    try:
      # force=True: the save decision was made above; Orbax's own policy would skip
      # silently where this manager raises.
      self._mgr.save(step, args=args, force=True)
    except Exception as e:
      self._records.pop(step, None)
      self._mgr.reload()
      self._reconcile(self._read_ledger())
      raise CheckpointSaveError(f'saving step {step} failed: {e}') from e
    self._in_flight = step
    self._write_ledger()
    return True

  def wait_until_finished(self):
    """Blocks until the save in flight (if any) committed and retention ran.

    Raises:
      CheckpointSaveError: naming the step, if the asynchronous save failed; that step
        is then absent and the older checkpoints are untouched.
    """
    step, self._in_flight = self._in_flight, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:
      self._records.pop(step, None)
      # Orbax already forgot the steps it planned to delete; re-read the directory so
      # the ones that still exist (deletion never ran) are tracked again.
      self._mgr.reload()
      self._reconcile(self._read_ledger())
      raise CheckpointSaveError(
          f'asynchronous save of step {step} failed and was not committed: {e}'
      ) from e
    if step is not None:
      live = set(self._mgr.all_steps())
      self._records = {s: r for s, r in self._records.items() if s in live}

  # -------------------------------------------------------------------------- promotion

  def promote(
      self,
      step: int,
      tier: str,
      *,
      metrics: Mapping[str, Any] | None = None,
      reason: str | None = None,
  ):
    """Moves checkpoint `step` up to `tier` and applies retention immediately.

    Promotion only goes up the order ``CHECKPOINT_TIERS`` (same tier allowed, to update metrics).
    `metrics` are merged into the record and used for candidate ranking; the committed
    checkpoint itself is not rewritten. Promoting may delete other checkpoints: the new
    tier can overflow (a worse candidate beyond the best k, an older observation).

    Raises:
      ValueError: unknown `tier`, missing `step`, or a demotion.
    """
    _check_tier(tier)
    self.wait_until_finished()
    step = self._existing_step(step)
    rec = self._records[step]
    if _TIER_RANK[tier] < _TIER_RANK[rec['tier']]:
      raise ValueError(
          f'tier={tier!r}: step {step} is already {rec["tier"]!r}; promotion only moves '
          f'up {CHECKPOINT_TIERS}'
      )
    rec['tier'] = tier
    rec['metrics'] = {**rec['metrics'], **_checksum.metrics_to_floats(metrics)}
    if reason is not None:
      rec['reason'] = reason
    rec['history'].append({'tier': tier, 'reason': reason, 'time': _now()})
    self._apply_retention()

  def unpin(self, step: int):
    """Releases the hold of an emergency save; tier retention applies to it again now."""
    self.wait_until_finished()
    step = self._existing_step(step)
    self._records[step]['pinned'] = False
    self._apply_retention()

  # ---------------------------------------------------------------------------- restore

  def _read_meta(self, step: int) -> dict[str, Any]:
    try:
      doc = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:
      raise CorruptCheckpointError(step, '<metadata>', f'could not be read ({e})') from e
    if not isinstance(doc, dict) or 'digest' not in doc:
      raise CorruptCheckpointError(step, '<metadata>', 'has no digest (not written by this manager?)')
    body = {k: v for k, v in doc.items() if k != 'digest'}
    if _checksum.canonical_digest(body) != doc['digest']:
      raise CorruptCheckpointError(step, '<metadata>', 'does not match its digest')
    return doc

  @staticmethod
  def _orbax_target(target, manifest: Mapping[str, Any], step: int):
    """Checks `target` against the saved manifest; returns the target to hand to Orbax."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [_checksum.leaf_path(p) for p, _ in pairs]
    missing = sorted(set(manifest) - set(names))
    extra = sorted(set(names) - set(manifest))
    if missing or extra:
      raise ValueError(
          f'target does not match the checkpoint at step {step}: '
          f'leaves saved but not in target: {missing[:8]}; '
          f'leaves in target but not saved: {extra[:8]}'
      )
    leaves = []
    for name, (_, leaf) in zip(names, pairs):
      want = manifest[name]
      if want['kind'] == 'python':
        if tuple(getattr(leaf, 'shape', ())) != ():
          raise ValueError(f'target leaf {name!r} must be a scalar (saved Python {want["dtype"]})')
        # Orbax restores a Python scalar exactly when the target holds one of its type;
        # jax.eval_shape would have turned it into a float32/int32 ShapeDtypeStruct.
        leaves.append(_PY_PLACEHOLDER[want['dtype']])
        continue
      if not (hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')):
        raise ValueError(
            f'target leaf {name!r} must be an array or jax.ShapeDtypeStruct, '
            f'got {type(leaf).__name__}'
        )
      shape, dtype = list(leaf.shape), str(leaf.dtype)
      if shape != want['shape'] or dtype != want['dtype']:
        raise ValueError(
            f'target leaf {name!r} is {dtype}{shape} but the checkpoint at step {step} '
            f'holds {want["dtype"]}{want["shape"]}'
        )
      leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def restore(self, step: int, target=None) -> Restored:
    """Restores checkpoint `step` and verifies every leaf's checksum.

    Args:
      step: an existing step.
      target: the state's structure, e.g. ``jax.eval_shape(init_fn)``; tuples and
        NamedTuples come back as such, Python scalars as Python scalars. Without it Orbax
        returns lists for tuples and dicts for NamedTuples. Each leaf is restored with the
        target leaf's ``sharding``, onto any mesh (tests/sharding/check_checkpoint.py);
        a leaf without one (``jax.eval_shape`` of a function not jitted with
        ``out_shardings`` gives none) gets the sharding it was saved with.

    Returns:
      :class:`Restored` whose ``state`` equals the saved state bit for bit.

    Raises:
      ValueError: `step` has no checkpoint, or `target` does not match its structure,
        shapes or dtypes (the message names the leaf).
      CorruptCheckpointError: the data or metadata do not verify (names step and leaf).
    """
    self.wait_until_finished()
    step = self._existing_step(step)
    doc = self._read_meta(step)
    manifest = doc['leaves']
    orbax_target = None if target is None else self._orbax_target(target, manifest, step)
    try:
      state = self._mgr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
              _without_empty(orbax_target)))
      )['state']
    except Exception as e:
      raise CorruptCheckpointError(step, None, f'could not be read ({type(e).__name__}: {e})') from e
    state = _refill_empty(state, manifest)
    bad = _checksum.first_mismatch(state, manifest)
    if bad is not None:
      raise CorruptCheckpointError(step, *bad)
    return Restored(step, state, doc['metadata'], self.record(step))

  def restore_latest_valid(self, target=None, *, max_step: int | None = None) -> Restored:
    """Restores the newest checkpoint (at or below `max_step`) that verifies.

    Corrupt or unreadable checkpoints are skipped (logged, listed in
    ``Restored.skipped``) and left on disk for inspection; a `target` that does not
    match raises at once, since an older checkpoint would not match either. To resume
    training from the result, call :meth:`rollback` with its step so that newer (bad)
    steps do not block later saves.

    Raises:
      FileNotFoundError: there is no checkpoint at all (at or below `max_step`).
      CorruptCheckpointError: every candidate failed; the error of the oldest is raised.
    """
    self.wait_until_finished()
    steps = [s for s in self.all_steps() if max_step is None or s <= max_step]
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self._directory} (max_step={max_step})')
    skipped = []
    err = None
    for s in reversed(steps):
      try:
        r = self.restore(s, target)
      except CorruptCheckpointError as e:
        _log.warning('skipping checkpoint: %s', e)
        skipped.append((s, str(e)))
        err = e
        continue
      return r._replace(skipped=tuple(skipped))
    raise err

  def rollback(self, step: int, target=None, *, force: bool = False) -> Restored:
    """Restores `step` (verified) and deletes every newer checkpoint.

    Afterwards :meth:`latest_step` is `step`, so saves at later steps are written again
    (Orbax skips any step <= the latest one on disk). Nothing is deleted if the restore
    fails.

    Args:
      step: an existing step.
      target: as in :meth:`restore`.
      force: also delete newer release or pinned checkpoints; without it their presence
        raises ``ValueError``, since those are otherwise never deleted.
    """
    self.wait_until_finished()
    step = self._existing_step(step)
    newer = [s for s in self.all_steps() if s > step]
    protected = [s for s in newer if self._records[s]['tier'] == 'release' or self._records[s]['pinned']]
    if protected and not force:
      raise ValueError(
          f'step={step}: rolling back would delete release/pinned checkpoints {protected}; '
          'pass force=True to delete them too'
      )
    restored = self.restore(step, target)
    for s in newer:
      self._mgr.delete(s)
      self._records.pop(s, None)
    self._write_ledger()
    return restored

  # -------------------------------------------------------------------------- lifecycle

  def close(self):
    """Waits for the save in flight, then releases Orbax's resources."""
    try:
      self.wait_until_finished()
    finally:
      self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
