"""The runner's convergence monitor: anomaly detector, evidence windows, Bayesian network, tiers.

``experiments.trainer.train_and_evaluate`` builds one :class:`Monitor` from ``config.monitor``
and, after every train step, calls :meth:`Monitor.update` (one jitted function of fixed
input structure, so it compiles once) with the step's metrics. It runs, in order:

1. ``convergence.anomaly_detector`` over the loss, gradient-norm, update-norm and η·λ_c
   streams: non-finite values, robust-z spikes and level shifts, η·λ_c above
   ``lr_sharpness_limit`` for ``unstable_sustain`` measured steps. Spikes, shifts and
   sustained η·λ_c > limit while η·λ_c approaches or oscillates around the limit (the edge
   of stability, see ``convergence._anomaly``) are *edge-of-stability oscillation*, not
   anomalies: logged as ``monitor/eos_oscillation``, no emergency checkpoint, no warning. A
   non-finite value, a loss above ``eos_max_loss_ratio`` × its window median, or a spike
   while η·λ_c is steadily far below (or beyond) the edge stays an anomaly. The keys
   ``monitor.eos_window``, ``monitor.eos_band``, ``monitor.eos_rise``,
   ``monitor.eos_max_loss_ratio`` set it (defaults 32 steps, (0.25, 1.25) × the limit, 10,
   100, the detector's own); ``monitor.eos_window=0`` turns the classification off.
2. ``convergence.evidence_tracker`` over the ``monitor.metrics`` (multi-scale windows,
   rolling-quantile baseline, Kalman level, stationarity test). A metric missing from a step
   (eval/loss between evaluations, a probe that is off) enters as NaN and is skipped.
3. ``convergence.convergence_network``: each metric's evidence becomes a soft likelihood on its
   node. The nodes mean "settled" (1) vs "still moving" (0), so the glue maps the evidence
   direction to *settledness*: STABLE → +1 (supports the node), IMPROVING or WORSENING → −1
   (the metric still moves); the strength is ``Evidence.strength × Evidence.reliability`` (a
   half-empty window says less), and a metric gives no evidence until its baseline exists (4
   short-window means; before that the tracker's drift is 0, which would read as "stable").
   The soft likelihood is
   ``convergence.soft_likelihood(strength, settled_direction)`` (a NaN row — the metric was
   skipped this step — adds nothing while older evidence decays at the metric's half-life).
   The conflict rules read a context built from the same streams (η·λ_c, the training loss
   trend, the generalisation-gap drift, the gradient-norm z-score, the non-finite rate).
   The context also carries the detector's steps since the last loss level shift and since
   η·λ_c last exceeded the limit: while either lies inside the evidence window the run is
   *unsettled* (``convergence_network``'s ``settle_window``): P(converged) gets the
   "unsettled" evidence and the decision is "not converged". The evidence window is the span
   of samples the windowed evidence is computed from, the largest of each metric's long
   window and its baseline's span (``short × history`` steps of block means; 1,280 steps by
   default): a shift inside the baseline inflates its spread, and a loss still falling by
   20 % per 200 steps then reads as "stable" (what made the edge-of-stability run look
   converged between its excursions).

Logged per step (``metrics.jsonl``): ``monitor/p_<node>`` for the four nodes,
``monitor/decision`` (1 = converged), ``monitor/conflict``, ``monitor/unsettled``,
``monitor/anomaly`` and ``monitor/anomaly_reason`` (bit mask of ``convergence.REASON_*``),
``monitor/eos_oscillation`` and ``monitor/eos_reason`` (the reasons classified as
edge-of-stability oscillation instead),
``monitor/strength/<metric>`` and ``monitor/direction/<metric>`` (the raw evidence; +1
improving, 0 stable, −1 worsening), and from the host loop ``monitor/tier`` (the tier level
the posterior asks for: 0 preliminary … 3 release), ``monitor/action`` (see ``ACTIONS``).

Audit (``audit.jsonl``): besides decisions, anomalies, saves and promotions, an
``eos_oscillation`` event where an episode of consecutive oscillation steps starts (its
reasons, η·λ_c, loss) and where it ends (its first step and length), :meth:`Monitor.eos_events`.

Checkpoint tiers (the rule, :func:`tier_level`): P(converged) ≥ ``tier_thresholds[0]`` asks
for observation, ≥ ``tier_thresholds[1]`` for candidate, and the network's decision
"converged" (P(converged) ≥ ``monitor.threshold`` with no conflict freezing it) for release. A
save is written in the tier the posterior asks for at that moment; when the level rises
between saves, the newest checkpoint is promoted (promotions only go up). Release is given
once per upward crossing (later saves while the run stays converged are candidates, ranked
best-k by ``checkpoint.candidate_metric``), so a converged run does not fill the disk with
never-deleted releases.

Everything here that decides a logged value lives in :class:`MonitorState` (a pytree of
arrays), saved in every checkpoint (packed into one array per dtype, :func:`pack`), so a
resumed run writes the same rows.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import convergence
from convergence._anomaly import NEVER  # the detector's "no event yet" count
from experiments import config_lib

AUDIT_LOG = "audit.jsonl"
TIER_NAMES = convergence.CHECKPOINT_TIERS  # level 0..3
# monitor/action codes (a bit mask): what the host loop did at this step.
ACTION_EMERGENCY_SAVE = 1
ACTION_ROLLBACK = 2
ACTION_STOP = 4
_REASON_BITS = {name: bit for bit, name in convergence.REASON_NAMES.items()}


def reason_mask(names) -> int:
  """Bit mask of ``convergence.REASON_*`` for reason names (``monitor.emergency_on``)."""
  mask = 0
  for n in names:
    mask |= _REASON_BITS[n]
  return mask


def _key(name: str) -> str:
  """A pytree key for a metric name (Orbax and the checksum manifest dislike '/')."""
  return re.sub(r"[^A-Za-z0-9_]", "_", name)


class HostState(NamedTuple):
  """Loop decisions that later rows or checkpoints depend on (int32 scalars)."""

  newest_tier: jax.Array  # tier level of the newest checkpoint (-1 = none yet)
  released: jax.Array  # 1 while a release was given since the level last fell below release
  emergency_saves: jax.Array
  rollbacks: jax.Array


class MonitorState(NamedTuple):
  """The monitor's complete state: detector, evidence windows, network, host counters."""

  detector: convergence.AnomalyState
  evidence: convergence.EvidenceState
  network: convergence.NetworkState
  host: HostState


class MonitorOutput(NamedTuple):
  """What one update reports (arrays; ``metrics`` is the dict logged as ``monitor/*``)."""

  metrics: dict[str, jax.Array]
  observed: jax.Array  # (M, 2) this step's soft log-likelihoods (for the audit log)
  context: convergence.ConflictContext
  changed: jax.Array  # the decision or the conflict flag changed at this step


def tier_level(p_converged: float, decision: int, thresholds) -> int:
  """The tier level (0 preliminary … 3 release) that the posterior asks for (module docstring)."""
  if decision == convergence.DECISION_CONVERGED:
    return 3
  if p_converged >= thresholds[1]:
    return 2
  if p_converged >= thresholds[0]:
    return 1
  return 0


def pack(tree) -> dict[str, jax.Array]:
  """The monitor state as one flat array per dtype (``{"float32": ..., "int32": ..., ...}``).

  The state has ~200 small leaves (windows, counters, diagnostics); a checkpoint's blocking
  cost grows with the number of leaves (one checksum and one host transfer each), so the
  runner saves it packed. Leaves are concatenated in ``jax.tree.leaves`` order; use
  :func:`unpack` with a state of the same structure to undo it. Jit-able.
  """
  groups: dict[str, list[jax.Array]] = {}
  for leaf in jax.tree.leaves(tree):
    leaf = jnp.asarray(leaf)
    groups.setdefault(str(leaf.dtype), []).append(leaf.reshape(-1))
  return {k: jnp.concatenate(v) for k, v in sorted(groups.items())}


def unpack(packed: dict[str, Any], like):
  """Inverse of :func:`pack`: the state of ``like``'s structure from the flat arrays."""
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
                       f"the config's monitor needs {used}")
  return jax.tree.unflatten(treedef, out)


def stage_boundaries(config) -> dict[int, str]:
  """``{step: reason}`` of the schedule's stage boundaries inside the run (forced saves).

  The end of warmup (step ``warmup_steps``: the state after the last warmup update) and, for
  WSD, the start of the decay (the state before the first decayed update; the same formula as
  ``experiments.optim.make_schedule``). Steps 0 and ``num_steps`` are left out (nothing to mark
  at the start; the end of the run is always saved).
  """
  s, total = config.schedule, int(config.num_steps)
  warm = int(s.warmup_steps)
  out: dict[int, str] = {}
  if warm > 0:
    out[warm] = f"stage boundary: end of warmup (step {warm})"
  if s.name == "warmup_stable_decay":
    decay_start = max(total - max(1, int(round(float(s.decay_fraction) * total))), warm)
    reason = f"stage boundary: start of decay (step {decay_start})"
    out[decay_start] = f"{out[decay_start]}; {reason}" if decay_start in out else reason
  return {k: v for k, v in out.items() if 0 < k < total}


class Monitor:
  """Builds the detector, tracker and network from ``config.monitor``; jitted update."""

  def __init__(self, config):
    m = config.monitor
    self.config = config
    self.specs = config_lib.monitor_metric_specs(config)
    # Steps of samples the windowed evidence depends on (the settle window, module docstring).
    self.evidence_window = max(max(s["long"], s["short"] * s["history"]) for s in self.specs)
    self.names = [s["name"] for s in self.specs]
    keys = [_key(n) for n in self.names]
    if len(set(keys)) != len(keys):
      raise ValueError(f"config.monitor.metrics names {self.names} collide once '/' and other "
                       "punctuation become '_'; rename one.")
    self._keys = dict(zip(self.names, keys))
    eos = {"eos_window": int(m.eos_window), "eos_band": tuple(float(x) for x in m.eos_band),
           "eos_rise": float(m.eos_rise), "eos_max_loss_ratio": float(m.eos_max_loss_ratio)}
    self.detector = convergence.anomaly_detector(
        window=int(m.anomaly_window), short_window=int(m.anomaly_short_window),
        spike_threshold=float(m.spike_threshold), shift_threshold=float(m.shift_threshold),
        min_history=int(m.min_history), lr_sharpness_limit=float(m.lr_sharpness_limit),
        sustain=int(m.unstable_sustain), **eos)
    self.tracker = convergence.evidence_tracker([
        convergence.MetricSpec(self._keys[s["name"]], mode=s["mode"], short=s["short"],
                               long=s["long"], history=s["history"]) for s in self.specs])
    self.network = convergence.convergence_network(
        [s["node"] for s in self.specs], [s["half_life"] for s in self.specs],
        metric_names=tuple(self.names), threshold=float(m.threshold),
        settle_window=float(self.evidence_window))
    self.thresholds = tuple(float(t) for t in m.tier_thresholds)
    self.emergency_mask = reason_mask(m.emergency_on)
    self.rollback_mask = reason_mask(m.rollback_on) if m.rollback_on_anomaly else 0
    # Streams the detector and the context read, whether or not they feed evidence.
    self.inputs = sorted(set(self.names) | {"train/loss", "train/grad_norm",
                                            "train/update_norm", "curv/lr_sharpness",
                                            "eval/loss"})
    self.update = jax.jit(self._update)
    self.pack = jax.jit(pack)

  # ------------------------------------------------------------------------------ state

  def init(self) -> MonitorState:
    i = jnp.int32
    host = HostState(newest_tier=i(-1), released=i(0), emergency_saves=i(0), rollbacks=i(0))
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), MonitorState(
        self.detector.init(), self.tracker.init(), self.network.init(), host))

  def inputs_of(self, metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    """The fixed-structure input of :meth:`update` from host metrics: NumPy float32 scalars,
    NaN for a missing metric (host values keep the jit signature, hence the compilation,
    the same whatever device arrays produced them)."""
    return {n: np.asarray(metrics.get(n, np.nan), np.float32) for n in self.inputs}

  # ----------------------------------------------------------------------------- update

  def _update(self, state: MonitorState, values: dict[str, jax.Array]
              ) -> tuple[MonitorState, MonitorOutput]:
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    v = {k: f32(x) for k, x in values.items()}
    det = self.detector.update(state.detector, loss=v["train/loss"],
                               grad_norm=v["train/grad_norm"],
                               update_norm=v["train/update_norm"],
                               lr_sharpness=v["curv/lr_sharpness"])
    ev_state = self.tracker.update(state.evidence, {self._keys[n]: v[n] for n in self.names})
    strengths, settled, skipped = [], [], []
    for n in self.names:
      info = ev_state.info[self._keys[n]]
      e = info.evidence
      strengths.append(e.strength * jnp.clip(e.reliability, 0.0, 1.0))
      settled.append(jnp.where(e.direction == convergence.STABLE, 1.0, -1.0))
      # No evidence until the rolling-quantile baseline exists (4 short-window means): before
      # that the tracker's drift is 0 by construction, which would read as "stable".
      ready = jnp.sum(ev_state.metrics[self._keys[n]].block_mask) >= 4
      skipped.append(info.skipped | ~ready)
    observed = convergence.soft_likelihood(jnp.stack(strengths), jnp.stack(settled))
    observed = jnp.where(jnp.stack(skipped)[:, None], jnp.nan, observed)

    context = self._context(det, ev_state, v["curv/lr_sharpness"])
    net = self.network.update(state.network, observed, context)
    ni = net.info
    out = {f"monitor/p_{node}": ni.marginals[i]
           for i, node in enumerate(convergence.NODES)}
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
    new = MonitorState(det, ev_state, net, state.host)
    return new, MonitorOutput(out, observed, context, changed)

  def _context(self, det, ev_state, lr_sharpness) -> convergence.ConflictContext:
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
    # The detector's "steps since" counters; before the first event: inf (never).
    age = lambda n: jnp.where(n >= NEVER, jnp.inf, n).astype(jnp.float32)
    return convergence.ConflictContext(
        lr_sharpness=lr_sharpness,
        train_loss_slope=nan if train is None else train.trend_t,
        gap_slope=gap,
        grad_norm_z=det.info.spike_z[1],
        nonfinite_rate=rate.astype(jnp.float32),
        data_drift=nan,
        steps_since_level_shift=age(det.info.steps_since_level_shift),
        steps_since_lr_above_limit=age(det.info.steps_since_lr_above_limit))

  # --------------------------------------------------------------------------- host side

  def audit_record(self, step: int, state: MonitorState, out: MonitorOutput) -> dict:
    """The audit line of a decision at ``step`` (``convergence.decision_record``)."""
    rec = convergence.decision_record(
        step, jax.device_get(state.network.info), observed=jax.device_get(out.observed),
        context=jax.device_get(out.context), metric_names=self.names,
        rule_names=self.network.rule_names)
    return {"event": "decision", **rec}

  def eos_events(self, step: int, before: MonitorState, after: MonitorState,
                 metrics: dict[str, Any]) -> list[dict]:
    """Audit records of edge-of-stability episodes at ``step`` (host side, outside jit).

    An episode is a run of consecutive steps classified as oscillation. Its first step gives
    ``{"event": "eos_oscillation", "phase": "start", "reasons": [...], "curv/lr_sharpness",
    "train/loss", "emergency_checkpoint": False}``; the first step after it ``{"phase": "end",
    "first_step", "steps"}``. ``before`` / ``after`` are the monitor states around this step's
    update (both restored from checkpoints on resume, so a resumed run writes the same lines).
    """
    info = after.detector.info
    out = []
    ended = int(before.detector.eos_run)
    if ended and not bool(info.eos):
      out.append({"event": "eos_oscillation", "step": step, "phase": "end",
                  "first_step": step - ended, "steps": ended})
    if bool(info.eos) and int(info.eos_run) == 1:
      out.append({"event": "eos_oscillation", "step": step, "phase": "start",
                  "reasons": convergence.reason_names(int(info.eos_reason)),
                  "curv/lr_sharpness": metrics.get("curv/lr_sharpness"),
                  "train/loss": metrics.get("train/loss"), "emergency_checkpoint": False})
    return out


# ------------------------------------------------------------------------------ audit I/O


def append_audit(workdir: str, record: dict) -> None:
  """Appends one JSON line to ``workdir/audit.jsonl`` (NaN → null; see convergence.AuditLog)."""
  convergence.AuditLog(os.path.join(workdir, AUDIT_LOG)).append(_clean(record))


def _clean(x):
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)):
    return _clean(x.tolist())
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def truncate_audit(workdir: str, step: int) -> int:
  """Keeps the audit lines with ``step`` below ``step`` (on resume); returns how many."""
  path = os.path.join(workdir, AUDIT_LOG)
  if not os.path.exists(path):
    return 0
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  return len(checkpointing.truncate_metrics(path, step))


def read_audit(workdir: str) -> list[dict]:
  path = os.path.join(workdir, AUDIT_LOG)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
