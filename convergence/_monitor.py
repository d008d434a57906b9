"""A convergence monitor for any training loop: anomalies, the Bayesian verdict, checkpoint tiers.

:class:`Monitor` composes the package's streaming parts into the decisions a training loop needs
after each step, with its state explicit (nothing hidden in the object):

* a jitted :meth:`Monitor.update` ``(state, values) -> (state, MonitorOutput)`` over this step's
  scalars (loss, gradient norm, update norm, η·λ_c and the watched metrics) runs, in order,
  ``anomaly_detector`` (non-finite values, robust-z spikes and level shifts, η·λ_c above the
  limit; spikes while η·λ_c oscillates around the limit are edge-of-stability oscillation,
  Cohen et al. 2021, arXiv 2103.00065, not anomalies), ``evidence_tracker`` (multi-scale
  windows, rolling-quantile baseline, stationarity test) and ``convergence_network`` (exact
  posterior over the four nodes, conflicts, the decision);
* a host-side :meth:`Monitor.decide` turns the step's logged values and the :class:`HostState`
  (plain Python ints: the tier of the newest checkpoint, emergency saves and rollbacks used)
  into :class:`Actions`: write an emergency checkpoint of the state *before* the flagged update,
  roll back (skip the update), or stop, and the checkpoint tier the posterior asks for.

Evidence → node likelihoods. The nodes mean "settled" (1) vs "still moving" (0), so a metric's
evidence direction maps to settledness: STABLE → +1, IMPROVING or WORSENING → −1, with
strength ``s = Evidence.strength × clip(Evidence.reliability, 0, 1)`` (a half-empty window says
less), and the per-metric log-likelihood pair is ``soft_likelihood(s, settled)``. A metric gives
no evidence until its rolling-quantile baseline exists (4 short-window means; before that the
tracker's drift is 0 by construction, which would read as "stable"), nor on a step where it is
missing (NaN). The network's "unsettled" window is the evidence window, the largest span of
samples the evidence depends on: ``max(long, short × history)`` over the metrics.

Tiers. P(converged) ≥ ``tier_thresholds[0]`` asks for *observation*, ≥ ``tier_thresholds[1]``
for *candidate*, the decision "converged" for *release* (:func:`tier_level`). A save takes the
tier asked for at that moment; when the level rises between saves the newest checkpoint is
promoted (promotions only go up); release is given once per upward crossing, later saves while
the run stays converged are candidates.

Example (a hand-written loop; ``values`` holds this step's loss, gradient and update norms as
host scalars; the README runs a complete one)::

  monitor = convergence.Monitor([convergence.MonitoredMetric("train/loss", "functional",
                                                             short=4, long=20, history=8)],
                                rollback_on=("nonfinite",))
  state, host = monitor.init(), monitor.init_host()
  for step in range(num_steps):
    ...  # one optimizer step → values = {"train/loss": ..., "train/grad_norm": ..., ...}
    state, out = monitor.update(state, monitor.inputs_of(values))
    actions = monitor.decide(host, {**values, **jax.device_get(out.metrics)})
    host = monitor.commit(host, actions)
    if actions.emergency_save: ...  # save the state before this update
    if actions.rollback: ...  # keep the old parameters

Optional streams (η·λ_c as ``curv/lr_sharpness``, ``eval/loss``) may be absent: ``inputs_of``
enters them as NaN, which the detector and the evidence windows skip.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convergence._anomaly import AnomalyDetector
from convergence._anomaly import AnomalyState
from convergence._anomaly import anomaly_detector
from convergence._anomaly import NEVER
from convergence._anomaly import REASON_NAMES
from convergence._anomaly import reason_names
from convergence._checkpoint import CHECKPOINT_TIERS
from convergence._network import ConflictContext
from convergence._network import convergence_network
from convergence._network import DECISION_CONVERGED
from convergence._network import decision_record
from convergence._network import NetworkState
from convergence._network import NODES
from convergence._network import soft_likelihood
from convergence._windows import EvidenceState
from convergence._windows import evidence_tracker
from convergence._windows import MetricSpec
from convergence._windows import STABLE

# Actions.code bits (logged as monitor/action): what the loop did at this step.
ACTION_EMERGENCY_SAVE = 1
ACTION_ROLLBACK = 2
ACTION_STOP = 4
_REASON_BITS = {name: bit for bit, name in REASON_NAMES.items()}
# The streams the anomaly detector and the conflict context read, watched or not.
DETECTOR_INPUTS = ("train/loss", "train/grad_norm", "train/update_norm", "curv/lr_sharpness",
                   "eval/loss")


class MonitoredMetric(NamedTuple):
  """One metric the network takes evidence from.

  Attributes:
    name: the metric's key in the values passed to :meth:`Monitor.update`.
    node: the network node it informs (a name in ``convergence.NODES``).
    mode: "min" (lower is better) or "max".
    short, long, history: evidence windows (``convergence.MetricSpec``), in samples.
    half_life: steps after which its accumulated evidence counts half.
  """

  name: str
  node: str
  mode: str = "min"
  short: int = 20
  long: int = 200
  history: int = 64
  half_life: float = 100.0


class HostState(NamedTuple):
  """The monitor's host-side decisions that later steps and checkpoints depend on (ints).

  Attributes:
    newest_tier: tier level (0..3) of the newest checkpoint, -1 before the first.
    released: 1 while a release was given since the level last fell below release.
    emergency_saves: emergency checkpoints written so far.
    rollbacks: updates skipped so far.
    level: the tier level the posterior asked for at the last decided step (not saved).
  """

  newest_tier: int = -1
  released: int = 0
  emergency_saves: int = 0
  rollbacks: int = 0
  level: int = 0


class MonitorState(NamedTuple):
  """The device part of the monitor's state: detector, evidence windows, network."""

  detector: AnomalyState
  evidence: EvidenceState
  network: NetworkState


class MonitorOutput(NamedTuple):
  """What one update reports (arrays; ``metrics`` is the dict logged as ``monitor/*``)."""

  metrics: dict[str, jax.Array]
  observed: jax.Array  # (M, 2) this step's soft log-likelihoods (for the audit log)
  context: ConflictContext
  changed: jax.Array  # the decision, the conflict flag or the unsettled flag changed


class Actions(NamedTuple):
  """What :meth:`Monitor.decide` asks the loop to do at one step.

  Attributes:
    reason: the anomaly's ``REASON_*`` bit mask (0: none).
    emergency_save: save the state before the flagged update (pinned).
    rollback: skip the flagged update (continue from the state before it).
    stop: the loss is non-finite and no rollback is left: stop the run.
    level: tier level the posterior asks for (0 preliminary … 3 release).
    code: the bit mask logged as ``monitor/action`` (``ACTION_*``).
  """

  reason: int
  emergency_save: bool
  rollback: bool
  stop: bool
  level: int
  code: int


def reason_mask(names: Sequence[str]) -> int:
  """Bit mask of ``convergence.REASON_*`` for reason names, e.g. ``["nonfinite", "spike"]``."""
  bad = [n for n in names if n not in _REASON_BITS]
  if bad:
    raise ValueError(f"anomaly reasons {bad} are not in {sorted(_REASON_BITS)}.")
  mask = 0
  for n in names:
    mask |= _REASON_BITS[n]
  return mask


def tier_level(p_converged: float, decision: int, thresholds: Sequence[float]) -> int:
  """The tier level (0 preliminary … 3 release) that the posterior asks for (module docstring)."""
  if decision == DECISION_CONVERGED:
    return 3
  if p_converged >= thresholds[1]:
    return 2
  if p_converged >= thresholds[0]:
    return 1
  return 0


def _key(name: str) -> str:
  """A pytree key for a metric name (Orbax and checksum manifests dislike '/')."""
  return re.sub(r"[^A-Za-z0-9_]", "_", name)


def pack(tree) -> dict[str, jax.Array]:
  """A pytree as one flat array per dtype (``{"float32": ..., "int32": ..., ...}``).

  The monitor state has ~200 small leaves; a checkpoint's blocking cost grows with the number
  of leaves (one checksum and one host transfer each), so it is saved packed. Leaves are
  concatenated in ``jax.tree.leaves`` order; :func:`unpack` with a tree of the same
  structure undoes it. Jit-able.
  """
  groups: dict[str, list[jax.Array]] = {}
  for leaf in jax.tree.leaves(tree):
    leaf = jnp.asarray(leaf)
    groups.setdefault(str(leaf.dtype), []).append(leaf.reshape(-1))
  return {k: jnp.concatenate(v) for k, v in sorted(groups.items())}


def unpack(packed: Mapping[str, Any], like):
  """Inverse of :func:`pack`: the tree of ``like``'s structure from the flat arrays."""
  leaves, treedef = jax.tree.flatten(like)
  offsets = {k: 0 for k in packed}
  out = []
  for leaf in leaves:
    leaf = jnp.asarray(leaf)
    k = str(leaf.dtype)
    flat = np.asarray(packed[k])
    n = int(np.prod(leaf.shape))
    out.append(jnp.asarray(flat[offsets[k]:offsets[k] + n].reshape(leaf.shape)))
    offsets[k] += n
  for k, used in offsets.items():
    if used != np.asarray(packed[k]).size:
      raise ValueError(f"packed monitor state has {np.asarray(packed[k]).size} {k} entries, "
                       f"this monitor needs {used}")
  return jax.tree.unflatten(treedef, out)


class Monitor:
  """Anomaly detector, evidence windows and convergence network behind one jitted update.

  Args:
    metrics: the :class:`MonitoredMetric` the network takes evidence from.
    detector: a ``convergence.anomaly_detector(...)`` (default: its defaults).
    threshold: P(converged) of the decision "converged".
    tier_thresholds: P(converged) asking for observation and for candidate.
    emergency_on: anomaly reasons that ask for an emergency checkpoint.
    rollback_on: anomaly reasons that skip the update (a subset of ``emergency_on``: the
      rollback restores that checkpoint); () never rolls back.
    max_emergency_saves, max_rollbacks: caps per run.
  """

  def __init__(self, metrics: Sequence[MonitoredMetric], *,
               detector: AnomalyDetector | None = None, threshold: float = 0.9,
               tier_thresholds: Sequence[float] = (0.4, 0.6),
               emergency_on: Sequence[str] = ("nonfinite", "spike", "unstable_lr"),
               rollback_on: Sequence[str] = (), max_emergency_saves: int = 10,
               max_rollbacks: int = 3):
    self.metrics = tuple(MonitoredMetric(*m) for m in metrics)
    if not self.metrics:
      raise ValueError("Monitor needs at least one MonitoredMetric.")
    self.names = [m.name for m in self.metrics]
    keys = [_key(n) for n in self.names]
    if len(set(keys)) != len(keys):
      raise ValueError(f"metric names {self.names} collide once '/' and other punctuation "
                       "become '_'; rename one.")
    self._keys = dict(zip(self.names, keys))
    t = tuple(float(x) for x in tier_thresholds)
    if len(t) != 2 or not 0 < t[0] <= t[1] <= threshold < 1:
      raise ValueError(f"tier_thresholds={tier_thresholds} must be (observation, candidate) "
                       f"with 0 < observation <= candidate <= threshold={threshold} < 1.")
    if not set(rollback_on) <= set(emergency_on):
      raise ValueError(f"rollback_on={list(rollback_on)} must be a subset of emergency_on="
                       f"{list(emergency_on)}: a rollback restores the emergency checkpoint.")
    self.thresholds = t
    self.emergency_mask = reason_mask(emergency_on)
    self.rollback_mask = reason_mask(rollback_on)
    self.max_emergency_saves = int(max_emergency_saves)
    self.max_rollbacks = int(max_rollbacks)
    self.detector = detector if detector is not None else anomaly_detector()
    # Steps of samples the windowed evidence depends on (the settle window, module docstring).
    self.evidence_window = max(max(m.long, m.short * m.history) for m in self.metrics)
    self.tracker = evidence_tracker([
        MetricSpec(self._keys[m.name], mode=m.mode, short=m.short, long=m.long,
                   history=m.history) for m in self.metrics])
    self.network = convergence_network(
        [m.node for m in self.metrics], [m.half_life for m in self.metrics],
        metric_names=tuple(self.names), threshold=float(threshold),
        settle_window=float(self.evidence_window))
    self.inputs = sorted(set(self.names) | set(DETECTOR_INPUTS))
    self.update = jax.jit(self._update)
    self._pack = jax.jit(pack)

  # ------------------------------------------------------------------------------ state

  def init(self) -> MonitorState:
    """The device state before the first step (strong-typed, committed arrays)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), MonitorState(
        self.detector.init(), self.tracker.init(), self.network.init()))

  def init_host(self) -> HostState:
    return HostState()

  def inputs_of(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The fixed-structure input of :meth:`update`: NumPy float32 scalars, NaN for a missing
    value (host values keep the jit signature, hence the compilation, the same whatever
    device arrays produced them)."""
    return {n: np.asarray(values.get(n, np.nan), np.float32) for n in self.inputs}

  def pack(self, state: MonitorState, host: HostState | None = None) -> dict[str, jax.Array]:
    """Device and host state as one flat array per dtype (for a checkpoint), :func:`pack`."""
    host = self.init_host() if host is None else host
    saved = (host.newest_tier, host.released, host.emergency_saves, host.rollbacks)
    return self._pack((state, tuple(np.int32(x) for x in saved)))

  def unpack(self, packed: Mapping[str, Any], like: MonitorState | None = None
             ) -> tuple[MonitorState, HostState]:
    """Inverse of :meth:`pack`: ``(state, host)``."""
    like = self.init() if like is None else like
    state, saved = unpack(packed, (like, tuple(np.int32(0) for _ in range(4))))
    return state, HostState(*(int(x) for x in saved))

  # ----------------------------------------------------------------------------- update

  def _update(self, state: MonitorState, values: Mapping[str, jax.Array]
              ) -> tuple[MonitorState, MonitorOutput]:
    v = {k: jnp.asarray(x, jnp.float32) for k, x in values.items()}
    det = self.detector.update(state.detector, loss=v["train/loss"],
                               grad_norm=v["train/grad_norm"],
                               update_norm=v["train/update_norm"],
                               lr_sharpness=v["curv/lr_sharpness"])
    ev_state = self.tracker.update(state.evidence, {self._keys[n]: v[n] for n in self.names})
    observed = self._observed(ev_state)
    context = self._context(det, ev_state, v["curv/lr_sharpness"])
    net = self.network.update(state.network, observed, context)
    ni = net.info
    out = {f"monitor/p_{node}": ni.marginals[i] for i, node in enumerate(NODES)}
    out.update({
        "monitor/decision": ni.decision.astype(jnp.int32),
        "monitor/conflict": ni.frozen.astype(jnp.int32),
        "monitor/unsettled": ni.unsettled.astype(jnp.int32),
        "monitor/anomaly": det.info.flag.astype(jnp.int32),
        "monitor/anomaly_reason": det.info.reason,
        "monitor/eos_oscillation": det.info.eos.astype(jnp.int32),
        "monitor/eos_reason": det.info.eos_reason,
    })
    for n in self.names:
      e = ev_state.info[self._keys[n]].evidence
      out[f"monitor/strength/{n}"] = e.strength
      out[f"monitor/direction/{n}"] = e.direction
    changed = ((ni.decision != state.network.decision)
               | (ni.frozen != state.network.info.frozen)
               | (ni.unsettled != state.network.info.unsettled))
    return MonitorState(det, ev_state, net), MonitorOutput(out, observed, context, changed)

  def _observed(self, ev_state: EvidenceState) -> jax.Array:
    """(M, 2) soft log-likelihoods of settledness (module docstring); NaN rows: no evidence."""
    strengths, settled, skipped = [], [], []
    for n in self.names:
      info = ev_state.info[self._keys[n]]
      e = info.evidence
      strengths.append(e.strength * jnp.clip(e.reliability, 0.0, 1.0))
      settled.append(jnp.where(e.direction == STABLE, 1.0, -1.0))
      ready = jnp.sum(ev_state.metrics[self._keys[n]].block_mask) >= 4
      skipped.append(info.skipped | ~ready)
    observed = soft_likelihood(jnp.stack(strengths), jnp.stack(settled))
    return jnp.where(jnp.stack(skipped)[:, None], jnp.nan, observed)

  def _context(self, det, ev_state, lr_sharpness) -> ConflictContext:
    nan = jnp.float32(jnp.nan)

    def evidence(name):
      k = self._keys.get(name)
      return None if k is None else ev_state.info[k].evidence

    train, held_out = evidence("train/loss"), evidence("eval/loss")
    # Fraction of non-finite losses among the filled entries of the detector's window (its
    # history stores a non-finite value as NaN, and starts all-NaN).
    window = det.history.shape[0]
    filled = jnp.minimum(det.count, window)
    nans = jnp.sum(jnp.isnan(det.history[:, 0])) - (window - filled)
    rate = jnp.where(filled > 0, nans / jnp.maximum(filled, 1), nan)
    gap = nan
    if train is not None and held_out is not None:
      gap = held_out.drift - train.drift  # standardised: > 0 = the gap widens
    age = lambda n: jnp.where(n >= NEVER, jnp.inf, n).astype(jnp.float32)
    return ConflictContext(
        lr_sharpness=lr_sharpness,
        train_loss_slope=nan if train is None else train.trend_t,
        gap_slope=gap,
        grad_norm_z=det.info.spike_z[1],
        nonfinite_rate=rate.astype(jnp.float32),
        data_drift=nan,
        steps_since_level_shift=age(det.info.steps_since_level_shift),
        steps_since_lr_above_limit=age(det.info.steps_since_lr_above_limit))

  # --------------------------------------------------------------------------- host side

  def decide(self, host: HostState, row: Mapping[str, Any], *, can_save: bool = True
             ) -> Actions:
    """The actions of one step from its host values (``train/loss`` and ``monitor/*``).

    An anomaly in ``emergency_on`` asks for an emergency save while ``can_save`` and fewer
    than ``max_emergency_saves`` were written; one in ``rollback_on`` rolls back while fewer
    than ``max_rollbacks`` were used; a non-finite loss that is not rolled back stops.
    """
    reason = int(row["monitor/anomaly_reason"])
    emergency = (bool(reason & self.emergency_mask) and can_save
                 and host.emergency_saves < self.max_emergency_saves)
    rollback = bool(reason & self.rollback_mask) and host.rollbacks < self.max_rollbacks
    stop = not math.isfinite(float(row["train/loss"])) and not rollback
    level = tier_level(float(row["monitor/p_converged"]), int(row["monitor/decision"]),
                       self.thresholds)
    code = ((ACTION_EMERGENCY_SAVE if emergency else 0) | (ACTION_ROLLBACK if rollback else 0)
            | (ACTION_STOP if stop else 0))
    return Actions(reason, emergency, rollback, stop, level, code)

  def commit(self, host: HostState, actions: Actions) -> HostState:
    """The host state after the loop carried out ``actions``."""
    return host._replace(emergency_saves=host.emergency_saves + int(actions.emergency_save),
                         rollbacks=host.rollbacks + int(actions.rollback),
                         level=actions.level)

  def save_tier(self, host: HostState) -> int:
    """The tier level of a new save: the asked level, release only once per upward crossing."""
    return 2 if host.level == 3 and host.released else host.level

  def saved(self, host: HostState, tier: int) -> HostState:
    """The host state after a checkpoint of tier level ``tier`` was written or promoted to."""
    return host._replace(newest_tier=tier, released=max(host.released, int(tier == 3)))

  def promotion(self, host: HostState) -> tuple[HostState, int | None]:
    """``(host, target)``: the tier the newest checkpoint should be promoted to, or None.

    Call once per step after :meth:`commit`; it also ends a release once the level fell
    below release (the next crossing may release again)."""
    if host.level < 3 and host.released:
      host = host._replace(released=0)
    target = self.save_tier(host)
    if host.newest_tier < 0 or target <= host.newest_tier:
      return host, None
    return host, target

  def audit_record(self, step: int, state: MonitorState, out: MonitorOutput) -> dict:
    """The audit line of a decision at ``step`` (``convergence.decision_record``)."""
    rec = decision_record(
        step, jax.device_get(state.network.info), observed=jax.device_get(out.observed),
        context=jax.device_get(out.context), metric_names=self.names,
        rule_names=self.network.rule_names)
    return {"event": "decision", **rec}

  def eos_events(self, step: int, before: MonitorState, after: MonitorState,
                 values: Mapping[str, Any]) -> list[dict]:
    """Audit records of edge-of-stability episodes at ``step`` (host side).

    An episode is a run of consecutive steps classified as oscillation. Its first step gives
    ``{"event": "eos_oscillation", "phase": "start", "reasons": [...], "curv/lr_sharpness",
    "train/loss", "emergency_checkpoint": False}``; the first step after it ``{"phase": "end",
    "first_step", "steps"}``. ``before`` / ``after`` are the states around this step's update.
    """
    return self.eos_events_of(step, jax.device_get(self.eos_fields(before, after)), values)

  @staticmethod
  def eos_fields(before: MonitorState, after: MonitorState) -> tuple[jax.Array, ...]:
    """The arrays :meth:`eos_events_of` reads: fetch them with the step's other values."""
    info = after.detector.info
    return before.detector.eos_run, info.eos, info.eos_run, info.eos_reason

  @staticmethod
  def eos_events_of(step: int, fields, values: Mapping[str, Any]) -> list[dict]:
    """:meth:`eos_events` from host copies of :meth:`eos_fields`."""
    ended, eos, run, reason = (int(x) for x in fields)
    out = []
    if ended and not eos:
      out.append({"event": "eos_oscillation", "step": step, "phase": "end",
                  "first_step": step - ended, "steps": ended})
    if eos and run == 1:
      out.append({"event": "eos_oscillation", "step": step, "phase": "start",
                  "reasons": reason_names(reason),
                  "curv/lr_sharpness": values.get("curv/lr_sharpness"),
                  "train/loss": values.get("train/loss"), "emergency_checkpoint": False})
    return out


TIER_NAMES = CHECKPOINT_TIERS  # tier level 0..3 → name
