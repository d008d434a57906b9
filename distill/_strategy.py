r"""An adaptive distillation engine, as optax pieces plus a pure controller.

The engine watches training metrics and issues five kinds of decisions: loss re-weighting,
learning-rate profile reshaping per layer, switching the gradient-clipping mode, re-batching
(micro-batches, accumulation steps) and distillation stage transitions. A learned "decision
network" would have no training signal, so here each decision is an explicit, documented
rule on named metrics; every rule is a pure function of the controller state and the metrics
of one evaluation, so the controller is jit-able, its state is a checkpointable pytree, and
each decision is logged.

Pieces (the optimizer side, each an optax transformation that accepts and forwards unknown
extra args and keeps its decision in its state as a traced value, so a change never
recompiles):

* :func:`clip_by_mode` — clipping by global norm, per-layer norm or per-leaf norm; the mode
  is an int in the state (``optax.clip_by_global_norm`` is the global mode).
* :func:`per_layer_learning_rates` — ``optax.multi_transform`` over layer groups, each with
  its own schedule, a multiplier and an optional restart onto its own schedule.
* :func:`accumulate_gradients` — ``optax.MultiSteps`` with the number of accumulation steps
  held in the state. :func:`micro_batched_value_and_grad` splits one batch inside a step.

The controller side: :func:`adaptive_controller` returns ``(init, update)``;
``update(state, metrics)`` applies the rules and returns the new :class:`ControllerState`;
:func:`decision_args` turns it into extra args for the optimizer::

    tx = optax.chain(clip_by_mode(1.0, layer_labels=labels),
                     optax.scale_by_adam(),
                     per_layer_learning_rates({"embed": 1e-3, "blocks": 3e-3}, labels))
    tx = accumulate_gradients(tx, every_k=1)
    ...
    updates, opt_state = tx.update(grads, opt_state, params, **decision_args(ctrl_state))
    ...
    if step % eval_every == 0:                           # outside the train step
      metrics = {**evaluate(params), **strategy_metrics(opt_state)}
      new_ctrl = controller.update(ctrl_state, metrics)  # pure, jit-able
      for record in audit_records(ctrl_state, new_ctrl, metrics, step=step):
        audit_log.append(record)                         # a convergence.AuditLog
      ctrl_state = new_ctrl

``decision_args`` yields ``clip_mode``, ``lr_scales``, ``lr_restarts`` and ``accum_steps``;
the pieces read theirs and pass the rest on; the loss weights go to the loss function
(``ctrl_state.loss_weights``, e.g. into :class:`distill.FixedFusion`-style weighting).
Transformations that reject unknown keywords (optax 0.2's linesearches) must not be chained
with these extra args. To keep the controller inside the optimizer state instead of beside it,
wrap it with :func:`controller_transformation`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]

CLIP_GLOBAL, CLIP_PER_LAYER, CLIP_PER_LEAF = 0, 1, 2
CLIP_MODES = {"global": CLIP_GLOBAL, "per_layer": CLIP_PER_LAYER, "per_leaf": CLIP_PER_LEAF}
CLIP_MODE_NAMES = {v: k for k, v in CLIP_MODES.items()}


# --------------------------------------------------------------------------------------------
# Layer labels.


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def top_level_labels(tree: PyTree) -> PyTree:
  """Labels every leaf by its top-level key (``{"dense1": {...}}`` → ``"dense1"``).

  The default "layer" of :func:`clip_by_mode`; usable as ``param_labels`` of
  :func:`per_layer_learning_rates` and ``optax.multi_transform``.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _key_name(path[0]) if path else "", tree)


def _leaf_labels(labels, tree) -> list:
  if labels is None:
    labels = top_level_labels
  if callable(labels):
    labels = labels(tree)
  leaves, treedef = jax.tree.flatten(tree)
  flat = treedef.flatten_up_to(labels)
  if len(flat) != len(leaves):
    raise ValueError("`layer_labels` must have the structure of the updates.")
  return list(flat)


# --------------------------------------------------------------------------------------------
# Clipping with a switchable mode.


class ClipInfo(NamedTuple):
  """Norms of the incoming update (before clipping) at the last step.

  ``spread`` = max over layers of the layer norm / mean layer norm, in [1, #layers]: large
  when one layer dominates the global norm (the controller's default clip-mode signal).
  """

  global_norm: jax.Array
  max_layer_norm: jax.Array
  mean_layer_norm: jax.Array
  max_leaf_norm: jax.Array
  spread: jax.Array


class ClipByModeState(NamedTuple):
  """``clip_mode`` is a traced int32 (``CLIP_GLOBAL``/``CLIP_PER_LAYER``/``CLIP_PER_LEAF``)."""

  clip_mode: jax.Array
  info: ClipInfo


def _clip_mode_id(mode) -> int:
  if isinstance(mode, str):
    if mode not in CLIP_MODES:
      raise ValueError(f"`mode` must be one of {sorted(CLIP_MODES)}, got {mode!r}")
    return CLIP_MODES[mode]
  if mode not in CLIP_MODES.values():
    raise ValueError(f"`mode` must be one of {sorted(CLIP_MODES)} or 0/1/2, got {mode!r}")
  return int(mode)


def clip_by_mode(max_norm: float, *, mode: str | int = "global",
                 layer_labels: PyTree | Callable[[PyTree], PyTree] | None = None
                 ) -> optax.GradientTransformationExtraArgs:
  r"""Clips the update to norm ``max_norm`` globally, per layer or per leaf; mode in the state.

  For a group :math:`G` of leaves (all leaves, one layer, or one leaf, by mode):

  .. math:: u_G \leftarrow u_G \cdot \min\big(1,\ c / \lVert u_G\rVert_2\big),

  with the norm over the group's leaves together. Mode ``global`` equals
  ``optax.clip_by_global_norm(c)``. The three sets of norms share one pass of per-leaf sums
  of squares; the mode only selects the scale (``lax.switch`` on the traced
  ``state.clip_mode``), so switching recompiles nothing. For head- or channel-level
  clipping, reshape heads or channels into their own leaves (or labels) to get
  them from the per-leaf / per-layer modes.

  Switch the mode by passing the extra arg ``clip_mode`` (an int, stored in the state and
  kept until the next one; see :func:`decision_args`) or with :func:`set_clip_mode` on the
  optimizer state.

  NaN: as ``optax.clip_by_global_norm``, a non-finite norm makes the clipped group NaN (the
  norms are in ``info`` to find it); a skip-on-NaN guard such as ``optax.apply_if_finite``
  belongs around the whole optimizer.

  Args:
    max_norm: :math:`c > 0`.
    mode: initial mode, ``"global"``, ``"per_layer"`` or ``"per_leaf"`` (or 0, 1, 2).
    layer_labels: a pytree of labels matching the updates, or a function of the updates
      returning one (the ``optax.multi_transform`` convention); default
      :func:`top_level_labels`.
  """
  # A traced max_norm (optax.inject_hyperparams) is accepted unchecked.
  if isinstance(max_norm, (int, float)) and not max_norm > 0:
    raise ValueError(f"`max_norm` must be > 0, got {max_norm!r}")
  mode0 = _clip_mode_id(mode)
  nan = jnp.float32(jnp.nan)

  def init_fn(params):
    del params
    return ClipByModeState(jnp.int32(mode0), ClipInfo(nan, nan, nan, nan, nan))

  def update_fn(updates, state, params=None, *, clip_mode=None, **extra_args):
    del params, extra_args
    current = state.clip_mode if clip_mode is None else jnp.asarray(clip_mode, jnp.int32)
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves:
      return updates, state._replace(clip_mode=current)
    labels = _leaf_labels(layer_labels, updates)
    groups = sorted(set(labels), key=str)
    leaf_sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
    group_sq = {g: sum(s for s, lab in zip(leaf_sq, labels) if lab == g) for g in groups}
    global_norm = jnp.sqrt(sum(leaf_sq))
    group_norm = {g: jnp.sqrt(v) for g, v in group_sq.items()}
    leaf_norm = [jnp.sqrt(s) for s in leaf_sq]

    def factor(norm):
      return jnp.where(norm < max_norm, 1.0, max_norm / norm)

    global_f = factor(global_norm)
    group_f = {g: factor(n) for g, n in group_norm.items()}
    per_mode = [
        jnp.stack([global_f] * len(leaves)),
        jnp.stack([group_f[lab] for lab in labels]),
        jnp.stack([factor(n) for n in leaf_norm]),
    ]
    scales = jax.lax.switch(jnp.clip(current, 0, 2), [lambda i=i: per_mode[i] for i in range(3)])
    new = [(x * scales[i]).astype(x.dtype) for i, x in enumerate(leaves)]
    norms = jnp.stack(list(group_norm.values()))
    info = ClipInfo(global_norm=global_norm, max_layer_norm=jnp.max(norms),
                    mean_layer_norm=jnp.mean(norms), max_leaf_norm=jnp.max(jnp.stack(leaf_norm)),
                    spread=jnp.max(norms) / jnp.mean(norms))
    return jax.tree.unflatten(treedef, new), ClipByModeState(current, info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_clip_mode(opt_state: PyTree, mode: str | int | jax.Array) -> PyTree:
  """Returns ``opt_state`` with every :func:`clip_by_mode` state switched to ``mode``."""
  if not isinstance(mode, jax.Array):
    mode = _clip_mode_id(mode)
  return optax.tree_utils.tree_set(opt_state, clip_mode=jnp.asarray(mode, jnp.int32))


# --------------------------------------------------------------------------------------------
# Per-layer learning rates.


class GroupScheduleState(NamedTuple):
  """State of one group in :func:`per_layer_learning_rates`.

  ``lr_scale`` multiplies the group's schedule; ``restart_generation`` counts restarts seen,
  ``restart_at`` is this group's step count at the last restart (-1: never restarted);
  ``learning_rate`` is the rate applied at the last step (for logging).
  """

  count: jax.Array
  lr_scale: jax.Array
  restart_generation: jax.Array
  restart_at: jax.Array
  learning_rate: jax.Array


def _as_schedule(lr) -> Schedule:
  if callable(lr):
    return lr
  return optax.constant_schedule(lr)


def scale_by_group_schedule(schedule: float | Schedule, *, group: str,
                            restart_schedule: float | Schedule | None = None
                            ) -> optax.GradientTransformationExtraArgs:
  r"""``u ← −η_t u`` with :math:`\eta_t = s\cdot\text{schedule}(t)`, or after a restart at
  step :math:`t_0`, :math:`\eta_t = s\cdot\text{restart\_schedule}(t - t_0)`.

  The group's multiplier :math:`s` and restart counter come through the extra args
  ``lr_scales`` and ``lr_restarts`` (dicts keyed by group, read when they hold ``group``);
  a restart happens when ``lr_restarts[group]`` exceeds the generation in the state. Both are
  stored, so omitting the extra args later keeps the last values. For example, a
  stalled layer gets its own cosine-annealing schedule while the others keep theirs.
  """
  base = _as_schedule(schedule)
  restart = base if restart_schedule is None else _as_schedule(restart_schedule)

  def init_fn(params):
    del params
    return GroupScheduleState(jnp.int32(0), jnp.float32(1.0), jnp.int32(0), jnp.int32(-1),
                              jnp.float32(jnp.nan))

  def update_fn(updates, state, params=None, *, lr_scales=None, lr_restarts=None,
                **extra_args):
    del params, extra_args
    scale, gen, at = state.lr_scale, state.restart_generation, state.restart_at
    if lr_scales is not None and group in lr_scales:
      scale = jnp.asarray(lr_scales[group], jnp.float32)
    if lr_restarts is not None and group in lr_restarts:
      new_gen = jnp.asarray(lr_restarts[group], jnp.int32)
      at = jnp.where(new_gen > gen, state.count, at)
      gen = jnp.maximum(new_gen, gen)
    lr = scale * jnp.where(at >= 0, restart(jnp.maximum(state.count - at, 0)),
                           base(state.count)).astype(jnp.float32)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, GroupScheduleState(optax.safe_increment(state.count), scale, gen, at, lr)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def per_layer_learning_rates(
    schedules: Mapping[str, float | Schedule],
    param_labels: PyTree | Callable[[PyTree], PyTree],
    *,
    restart_schedules: Mapping[str, float | Schedule] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Per-group learning rates: ``optax.multi_transform`` of :func:`scale_by_group_schedule`.

  Replaces ``optax.scale_by_learning_rate`` at the end of a chain: group ``g``'s update
  becomes :math:`-s_g\,\eta_g(t)\,u`. The multipliers :math:`s_g` and restarts come from the
  controller through the extra args ``lr_scales`` / ``lr_restarts`` (see
  :func:`decision_args`); without them every group follows its schedule.

  Args:
    schedules: ``{group: learning rate or optax schedule}``; every label must have one.
    param_labels: a pytree of group labels matching the params, or a function returning it.
    restart_schedules: ``{group: schedule}`` used after a restart of that group (default: the
      group's own schedule from 0), e.g. ``optax.cosine_decay_schedule(1e-3, 1000)``.
  """
  if not schedules:
    raise ValueError("`schedules` must name at least one group.")
  restart_schedules = dict(restart_schedules or {})
  unknown = set(restart_schedules) - set(schedules)
  if unknown:
    raise ValueError(f"`restart_schedules` names groups {sorted(unknown)} not in `schedules` "
                     f"{sorted(schedules)}")
  return optax.multi_transform(
      {g: scale_by_group_schedule(s, group=g, restart_schedule=restart_schedules.get(g))
       for g, s in schedules.items()}, param_labels)


# --------------------------------------------------------------------------------------------
# Accumulation and micro-batching.


class AccumulateState(NamedTuple):
  """``accum_steps``: the k in force; ``multi``: ``optax.MultiStepsState``."""

  accum_steps: jax.Array
  multi: optax.MultiStepsState


def accumulate_gradients(inner: optax.GradientTransformation, *, every_k: int = 1
                         ) -> optax.GradientTransformationExtraArgs:
  r"""``optax.MultiSteps(inner, every_k)`` with k in the state, switchable without recompiling.

  Over k calls the gradients are averaged, :math:`\bar g = \frac1k\sum_j g_j` (optax's running
  mean), and ``inner`` sees :math:`\bar g` once; the other calls return zero updates. With
  equal-sized micro-batches of a mean loss this is exactly one step on the big batch.

  A new k arrives through the extra arg ``accum_steps`` and takes effect only at an
  accumulation boundary (``mini_step == 0``), so no partial accumulation is lost or cut
  short; until then the old k stays in force. Use ``optax.MultiSteps(...).has_updated(
  state.multi)`` to know when an update was emitted. Other extra args go to ``inner``.

  NaN: as ``optax.MultiSteps``: a NaN gradient poisons its accumulation window (pass a
  ``should_skip_update_fn`` through your own ``optax.MultiSteps`` if that matters).
  """
  if not (isinstance(every_k, int) and every_k >= 1):
    raise ValueError(f"`every_k` must be an int >= 1, got {every_k!r}")

  def init_fn(params):
    return AccumulateState(jnp.int32(every_k),
                           optax.MultiSteps(inner, every_k_schedule=every_k).init(params))

  def update_fn(updates, state, params=None, *, accum_steps=None, **extra_args):
    k = state.accum_steps
    if accum_steps is not None:
      k = jnp.where(state.multi.mini_step == 0,
                    jnp.maximum(jnp.asarray(accum_steps, jnp.int32), 1), k)
    ms = optax.MultiSteps(inner, every_k_schedule=lambda _: k)
    updates, multi = ms.update(updates, state.multi, params, **extra_args)
    return updates, AccumulateState(k, multi)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def micro_batched_value_and_grad(loss_fn: Callable[..., jax.Array], num_micro: int
                                 ) -> Callable[..., tuple[jax.Array, PyTree]]:
  r"""``(params, batch) -> (loss, grad)`` of a mean loss, computed over ``num_micro`` slices.

  The batch (a pytree of arrays with a leading batch axis divisible by ``num_micro``) is cut
  into equal slices that ``lax.scan`` visits one at a time, so activations for only one slice
  are alive: :math:`L = \frac1m\sum_j L(\theta; b_j)`, the same value and gradient as the
  whole batch when ``loss_fn`` is a mean over examples. ``num_micro`` is static (a change
  recompiles); to change the effective batch at run time use :func:`accumulate_gradients`.
  """
  if not (isinstance(num_micro, int) and num_micro >= 1):
    raise ValueError(f"`num_micro` must be an int >= 1, got {num_micro!r}")
  vg = jax.value_and_grad(loss_fn)

  def fn(params, batch):
    def split(x):
      if x.shape[0] % num_micro:
        raise ValueError(f"batch axis {x.shape[0]} is not divisible by num_micro={num_micro}")
      return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])

    micro = jax.tree.map(split, batch)

    def body(carry, b):
      loss, grad = vg(params, b)
      return jax.tree.map(jnp.add, carry, (loss, grad)), None

    zero = (jnp.zeros((), jnp.float32),
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.result_type(p, jnp.float32)), params))
    (loss, grad), _ = jax.lax.scan(body, zero, micro)
    return loss / num_micro, jax.tree.map(
        lambda g, p: (g / num_micro).astype(p.dtype), grad, params)

  return fn


# --------------------------------------------------------------------------------------------
# The controller.


class ReweightRule(NamedTuple):
  """When ``metric`` is above (``above=True``) or below ``threshold``, multiply the loss
  weights by ``factors`` (``{term: factor}``), once per evaluation while it holds.

  For example, early collapse in long generations (say ``"val/long_ppl_ratio"`` above
  1.5) → raise the temporal weight, lower the soft-target weight:
  ``ReweightRule("val/long_ppl_ratio", 1.5, {"temporal": 1.25, "kd": 0.8})``.
  """

  metric: str
  threshold: float
  factors: Mapping[str, float]
  above: bool = True


class ClipRule(NamedTuple):
  """Chooses the clipping mode from ``metric`` (default :class:`ClipInfo`'s ``spread``):
  per-leaf above ``per_leaf_above``, per-layer above ``per_layer_above``, else global."""

  per_layer_above: float
  per_leaf_above: float = math.inf
  metric: str = "clip/spread"


class AccumulationRule(NamedTuple):
  """Doubles the accumulation steps (up to ``max_steps``) when ``metric`` > ``increase_above``
  (e.g. gradient-noise scale or loss variance), halves them (down to ``min_steps``) when it is
  below ``decrease_below``."""

  metric: str
  increase_above: float
  decrease_below: float
  min_steps: int = 1
  max_steps: int = 64


class StallRule(NamedTuple):
  """Per layer group ``g``: when ``f"{prefix}{g}"`` (by default the relative update size
  ‖Δθ_g‖/‖θ_g‖, see :func:`update_ratios`) stays below ``threshold`` for ``patience``
  evaluations, restart that group on its own schedule and multiply its rate by ``boost``."""

  threshold: float
  patience: int = 3
  boost: float = 1.0
  prefix: str = "update_ratio/"


class ControllerInfo(NamedTuple):
  """What the last evaluation decided (all traced; :func:`audit_records` turns it into JSON
  records, written with ``convergence.AuditLog``).

  ``stable``: per core metric, within the band over the full window; ``nonfinite``: per
  metric read, NaN/inf at this evaluation; ``rules_fired``: per re-weighting rule;
  ``restarted``: per layer group; ``transitioned``: a stage transition happened.
  """

  stable: dict[str, jax.Array]
  nonfinite: dict[str, jax.Array]
  rules_fired: jax.Array
  restarted: dict[str, jax.Array]
  transitioned: jax.Array


class ControllerState(NamedTuple):
  """The controller's whole state: a pytree of arrays, checkpointable with the optimizer's.

  ``window`` [W, M] holds the core metrics of the last W evaluations of this stage (a ring
  buffer; ``window_count`` evaluations written since the stage began).
  """

  evaluation: jax.Array
  stage: jax.Array
  loss_weights: dict[str, jax.Array]
  clip_mode: jax.Array
  accum_steps: jax.Array
  lr_scales: dict[str, jax.Array]
  lr_restarts: dict[str, jax.Array]
  stall_count: dict[str, jax.Array]
  window: jax.Array
  window_count: jax.Array
  info: ControllerInfo


class Controller(NamedTuple):
  """``init() -> ControllerState``; ``update(state, metrics) -> ControllerState`` (pure)."""

  init: Callable[[], ControllerState]
  update: Callable[[ControllerState, Mapping[str, Any]], ControllerState]
  metric_names: tuple[str, ...]


def _check_controller_args(*, terms, core, targets, window, rtol, min_stable, num_stages,
                           reweight_rules, weight_bounds, stall_rule, groups,
                           accumulation_rule, accum_steps) -> None:
  """The checks of :func:`adaptive_controller`'s arguments, each naming the argument."""
  if not terms:
    raise ValueError("`loss_weights` must name at least one term.")
  if not (isinstance(window, int) and window >= 1):
    raise ValueError(f"`window` must be an int >= 1, got {window!r}")
  if not rtol >= 0:
    raise ValueError(f"`rtol` must be >= 0, got {rtol!r}")
  if not (isinstance(min_stable, int) and 1 <= min_stable <= len(core)):
    raise ValueError(f"`min_stable` must be an int in [1, len(core_metrics)={len(core)}], "
                     f"got {min_stable!r}")
  if len(set(core)) != len(core):
    raise ValueError(f"`core_metrics` must be distinct, got {core!r}")
  for name, (op, _) in targets.items():
    if name not in core:
      raise ValueError(f"`targets` names {name!r}, not a core metric {list(core)}")
    if op not in ("<=", ">="):
      raise ValueError(f"`targets[{name!r}]` op must be '<=' or '>=', got {op!r}")
  if num_stages is not None and not (isinstance(num_stages, int) and num_stages >= 1):
    raise ValueError(f"`num_stages` must be None or an int >= 1, got {num_stages!r}")
  for r in reweight_rules:
    bad = set(r.factors) - set(terms)
    if bad:
      raise ValueError(f"ReweightRule on {r.metric!r} names terms {sorted(bad)} not in "
                       f"`loss_weights` {list(terms)}")
  lo_w, hi_w = weight_bounds
  if not 0 <= lo_w <= hi_w:
    raise ValueError(f"`weight_bounds` must satisfy 0 <= low <= high, got {weight_bounds!r}")
  if stall_rule is not None and not groups:
    raise ValueError("`stall_rule` needs `lr_groups`.")
  if accumulation_rule is not None and not (
      1 <= accumulation_rule.min_steps <= accum_steps <= accumulation_rule.max_steps):
    raise ValueError("need min_steps <= `accum_steps` <= max_steps for the AccumulationRule, "
                     f"got {accum_steps!r} and {accumulation_rule!r}")


def _controller_metric_names(core, reweight_rules, clip_rule, accumulation_rule, stall_rule,
                             groups) -> tuple[str, ...]:
  """Every metric the controller reads, each once, in rule order."""
  names = list(core)
  names += [r.metric for r in reweight_rules]
  if clip_rule is not None:
    names.append(clip_rule.metric)
  if accumulation_rule is not None:
    names.append(accumulation_rule.metric)
  if stall_rule is not None:
    names += [stall_rule.prefix + g for g in groups]
  return tuple(dict.fromkeys(names))


def _initial_controller_state(loss_weights, core, metric_names, groups, *, num_rules, mode,
                              accum_steps, window) -> ControllerState:
  f = jnp.bool_(False)
  info = ControllerInfo(
      stable={n: f for n in core}, nonfinite={n: f for n in metric_names},
      rules_fired=jnp.zeros((num_rules,), jnp.bool_),
      restarted={g: f for g in groups}, transitioned=f)
  return ControllerState(
      evaluation=jnp.int32(0), stage=jnp.int32(0),
      loss_weights={t: jnp.float32(loss_weights[t]) for t in loss_weights},
      clip_mode=jnp.int32(mode), accum_steps=jnp.int32(accum_steps),
      lr_scales={g: jnp.float32(1.0) for g in groups},
      lr_restarts={g: jnp.int32(0) for g in groups},
      stall_count={g: jnp.int32(0) for g in groups},
      window=jnp.full((window, len(core)), jnp.nan, jnp.float32),
      window_count=jnp.int32(0), info=info)


def _stage_step(state: ControllerState, m, *, core, targets, window, rtol, min_stable,
                num_stages):
  """Rule 1: (stable per core metric, transitioned, stage, window, window count)."""
  row = jnp.stack([m[n] for n in core])
  win = state.window.at[state.window_count % window].set(row)
  count = state.window_count + 1
  hi, lo = jnp.max(win, axis=0), jnp.min(win, axis=0)
  mean = jnp.mean(win, axis=0)
  stable_vec = ((count >= window) & jnp.all(jnp.isfinite(win), axis=0)
                & (hi - lo <= rtol * jnp.abs(mean)))
  for j, n in enumerate(core):
    if n in targets:
      op, v = targets[n]
      stable_vec = stable_vec.at[j].set(stable_vec[j] & (row[j] <= v if op == "<=" else
                                                         row[j] >= v))
  can_advance = True if num_stages is None else state.stage < num_stages - 1
  transitioned = (jnp.sum(stable_vec) >= min_stable) & can_advance
  stage = state.stage + transitioned.astype(jnp.int32)
  win = jnp.where(transitioned, jnp.full_like(win, jnp.nan), win)
  count = jnp.where(transitioned, 0, count)
  return stable_vec, transitioned, stage, win, count


def _reweight_step(weights, m, *, reweight_rules, weight_bounds, renormalize, initial_sum):
  """Rule 2: (the new loss weights, which rules fired)."""
  lo_w, hi_w = weight_bounds
  w = dict(weights)
  fired = []
  for r in reweight_rules:
    v = m[r.metric]
    on = (v > r.threshold) if r.above else (v < r.threshold)   # False for NaN
    fired.append(on)
    for t, f in r.factors.items():
      w[t] = jnp.where(on, w[t] * jnp.float32(f), w[t])
  w = {t: jnp.clip(v, lo_w, hi_w) for t, v in w.items()}
  if renormalize:
    total = sum(w.values())
    w = {t: jnp.where(total > 0, v * (initial_sum / total), v) for t, v in w.items()}
  return w, fired


def _clip_and_accumulation_step(state: ControllerState, m, finite, *, clip_rule,
                                accumulation_rule):
  """Rules 3 and 4: (the clip mode, the accumulation steps); a NaN metric keeps them."""
  mode = state.clip_mode
  if clip_rule is not None:
    v = m[clip_rule.metric]
    proposal = jnp.where(v > clip_rule.per_leaf_above, CLIP_PER_LEAF,
                         jnp.where(v > clip_rule.per_layer_above, CLIP_PER_LAYER,
                                   CLIP_GLOBAL)).astype(jnp.int32)
    mode = jnp.where(finite[clip_rule.metric], proposal, mode)
  k = state.accum_steps
  if accumulation_rule is not None:
    a = accumulation_rule
    v = m[a.metric]
    k = jnp.where(v > a.increase_above, jnp.minimum(2 * k, a.max_steps),
                  jnp.where(v < a.decrease_below, jnp.maximum(k // 2, a.min_steps), k))
    k = k.astype(jnp.int32)
  return mode, k


def _stall_step(state: ControllerState, m, finite, *, stall_rule, groups):
  """Rule 5: (lr scales, restart counts, stall counters, restarted) per layer group."""
  scales, restarts, stall = dict(state.lr_scales), dict(state.lr_restarts), \
      dict(state.stall_count)
  restarted = {g: jnp.bool_(False) for g in groups}
  if stall_rule is not None:
    for g in groups:
      name = stall_rule.prefix + g
      v = m[name]
      c = jnp.where(finite[name], jnp.where(v < stall_rule.threshold, stall[g] + 1, 0),
                    stall[g])
      fire = c >= stall_rule.patience
      restarted[g] = fire
      restarts[g] = restarts[g] + fire.astype(jnp.int32)
      scales[g] = jnp.where(fire, scales[g] * jnp.float32(stall_rule.boost), scales[g])
      stall[g] = jnp.where(fire, 0, c).astype(jnp.int32)
  return scales, restarts, stall, restarted


def adaptive_controller(
    *,
    loss_weights: Mapping[str, float],
    core_metrics: Sequence[str],
    window: int = 10,
    rtol: float = 3e-3,
    min_stable: int = 3,
    targets: Mapping[str, tuple[str, float]] | None = None,
    num_stages: int | None = None,
    reweight_rules: Sequence[ReweightRule] = (),
    weight_bounds: tuple[float, float] = (0.0, math.inf),
    renormalize: bool = False,
    clip_rule: ClipRule | None = None,
    clip_mode: str | int = "global",
    accumulation_rule: AccumulationRule | None = None,
    accum_steps: int = 1,
    lr_groups: Sequence[str] = (),
    stall_rule: StallRule | None = None,
) -> Controller:
  r"""The adaptive training engine as a pure controller.

  At each evaluation, with metrics :math:`m` (a dict of scalars):

  1. **Stage transition.** The core metrics :math:`c_1..c_M` are appended to a window of the
     last W (= ``window``) evaluations of this stage. Metric j is *stable* when the window is
     full and all its W values are finite with
     :math:`\max_w c_j - \min_w c_j \le \text{rtol}\cdot|\overline{c_j}|` (a band of 0.3% of
     its mean by default) and, if ``targets[j] = (op, v)`` is given, the latest value meets
     ``op`` (``"<="`` or ``">="``) ``v``. When at least ``min_stable`` core metrics are stable,
     the stage advances (up to ``num_stages - 1``) and the window restarts empty, so the next
     transition needs W new evaluations. With W = 10 and metrics inside the band from
     evaluation :math:`e_0` on, the transition fires at evaluation :math:`e_0 + 9`, not before.
  2. **Loss re-weighting** by :class:`ReweightRule` s, then clipped to ``weight_bounds``; with
     ``renormalize`` the weights are rescaled to keep their initial sum.
  3. **Clip mode** from :class:`ClipRule`.
  4. **Accumulation steps** from :class:`AccumulationRule`.
  5. **Per-layer learning rates** from :class:`StallRule` over ``lr_groups``.

  NaN: a non-finite metric never triggers anything: it enters the window (so its metric is
  not stable until it has left the window again, W evaluations later), fires no rule, leaves
  the clip mode, accumulation and stall counters as they were, and is flagged in
  ``info.nonfinite`` (and so in the audit log).

  Args:
    loss_weights: initial ``{term: weight}``.
    core_metrics: the metric names watched for stage transitions (at least ``min_stable``).
    window, rtol, min_stable: W, the relative band and the number of stable metrics needed.
    targets: optional ``{metric: (op, value)}`` thresholds for the core metrics.
    num_stages: number of stages (None: unbounded).
    reweight_rules, weight_bounds, renormalize: the re-weighting.
    clip_rule, clip_mode: the clip rule and the initial mode.
    accumulation_rule, accum_steps: the accumulation rule and the initial k.
    lr_groups, stall_rule: the layer groups (labels of :func:`per_layer_learning_rates`) and
      the stall rule.

  Returns:
    A :class:`Controller`; ``metric_names`` lists every metric ``update`` reads (a missing
    one raises ``KeyError`` naming it).
  """
  terms, core, groups = tuple(loss_weights), tuple(core_metrics), tuple(lr_groups)
  targets = dict(targets or {})
  _check_controller_args(terms=terms, core=core, targets=targets, window=window, rtol=rtol,
                         min_stable=min_stable, num_stages=num_stages,
                         reweight_rules=reweight_rules, weight_bounds=weight_bounds,
                         stall_rule=stall_rule, groups=groups,
                         accumulation_rule=accumulation_rule, accum_steps=accum_steps)
  mode0 = _clip_mode_id(clip_mode)
  metric_names = _controller_metric_names(core, reweight_rules, clip_rule, accumulation_rule,
                                          stall_rule, groups)
  initial_sum = sum(float(v) for v in loss_weights.values())

  def init_fn() -> ControllerState:
    return _initial_controller_state(loss_weights, core, metric_names, groups,
                                     num_rules=len(reweight_rules), mode=mode0,
                                     accum_steps=accum_steps, window=window)

  def update_fn(state: ControllerState, metrics: Mapping[str, Any]) -> ControllerState:
    missing = [n for n in metric_names if n not in metrics]
    if missing:
      raise KeyError(f"the controller needs the metrics {missing}; got {sorted(metrics)}")
    state = jax.tree.map(jnp.asarray, state)   # a restored checkpoint may hold NumPy arrays
    m = {n: jnp.asarray(metrics[n], jnp.float32) for n in metric_names}
    finite = {n: jnp.isfinite(v) for n, v in m.items()}
    stable_vec, transitioned, stage, win, count = _stage_step(
        state, m, core=core, targets=targets, window=window, rtol=rtol,
        min_stable=min_stable, num_stages=num_stages)
    w, fired = _reweight_step(state.loss_weights, m, reweight_rules=reweight_rules,
                              weight_bounds=weight_bounds, renormalize=renormalize,
                              initial_sum=initial_sum)
    mode, k = _clip_and_accumulation_step(state, m, finite, clip_rule=clip_rule,
                                          accumulation_rule=accumulation_rule)
    scales, restarts, stall, restarted = _stall_step(state, m, finite, stall_rule=stall_rule,
                                                     groups=groups)
    info = ControllerInfo(
        stable={n: stable_vec[j] for j, n in enumerate(core)},
        nonfinite={n: ~finite[n] for n in metric_names},
        rules_fired=jnp.stack(fired) if fired else jnp.zeros((0,), jnp.bool_),
        restarted=restarted, transitioned=transitioned)
    return ControllerState(
        evaluation=state.evaluation + 1, stage=stage, loss_weights=w, clip_mode=mode,
        accum_steps=k, lr_scales=scales, lr_restarts=restarts, stall_count=stall,
        window=win, window_count=count.astype(jnp.int32), info=info)

  return Controller(init_fn, update_fn, metric_names)


def decision_args(state: ControllerState) -> dict[str, Any]:
  """The controller's decisions as extra args for ``tx.update``.

  ``clip_mode`` (read by :func:`clip_by_mode`), ``lr_scales`` and ``lr_restarts``
  (:func:`per_layer_learning_rates`), ``accum_steps`` (:func:`accumulate_gradients`). The
  loss weights are not included: they belong to the loss (``state.loss_weights``).
  """
  return dict(clip_mode=state.clip_mode, lr_scales=state.lr_scales,
              lr_restarts=state.lr_restarts, accum_steps=state.accum_steps)


class ControllerTransformState(NamedTuple):
  controller: ControllerState


def controller_transformation(controller: Controller) -> optax.GradientTransformationExtraArgs:
  """Keeps the controller's state inside the optimizer state (like the probes'); identity on
  the updates.

  When the extra arg ``eval_metrics`` (a dict holding ``controller.metric_names``) is given,
  the controller is updated with it; otherwise its state is carried unchanged. Read the state
  with ``optax.tree_utils.tree_get(opt_state, "controller")`` and feed
  ``decision_args(...)`` to the next update: decisions made during a step apply from the next
  step on. A step with and one without ``eval_metrics`` are two traces (the dict is a Python
  value), compiled once each.
  """

  def init_fn(params):
    del params
    return ControllerTransformState(controller.init())

  def update_fn(updates, state, params=None, *, eval_metrics=None, **extra_args):
    del params, extra_args
    if eval_metrics is None:
      return updates, state
    return updates, ControllerTransformState(controller.update(state.controller, eval_metrics))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Metrics the rules read.


def update_ratios(updates: PyTree, params: PyTree,
                  param_labels: PyTree | Callable[[PyTree], PyTree] | None = None,
                  prefix: str = "update_ratio/") -> dict[str, jax.Array]:
  r"""``{prefix + g: ‖u_g‖ / ‖θ_g‖}`` per layer group (the :class:`StallRule` signal).

  NaN when a group's parameters are all zero (0/0 is not a stall: it fires nothing).
  """
  labels = _leaf_labels(param_labels, params)
  u = jax.tree.leaves(updates)
  p = jax.tree.leaves(params)
  out = {}
  for g in sorted(set(labels), key=str):
    su = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x, l in zip(u, labels) if l == g)
    sp = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x, l in zip(p, labels) if l == g)
    out[prefix + str(g)] = jnp.where(sp > 0, jnp.sqrt(su) / jnp.sqrt(jnp.where(sp > 0, sp, 1.0)),
                                     jnp.nan)
  return out


def strategy_metrics(opt_state: PyTree) -> dict[str, jax.Array]:
  """Metrics from the pieces inside an optimizer state: ``clip/global_norm``,
  ``clip/spread``, ``clip/mode``, ... (from the first :func:`clip_by_mode`), ``accum/steps``
  and ``lr/<group>`` (the rates applied at the last step)."""
  out: dict[str, jax.Array] = {}

  def visit(node, key=None):
    if isinstance(node, ClipByModeState):
      if "clip/mode" not in out:
        out["clip/mode"] = node.clip_mode
        for f, v in node.info._asdict().items():
          out[f"clip/{f}"] = v
    elif isinstance(node, AccumulateState):
      out.setdefault("accum/steps", node.accum_steps)
      visit(node.multi.inner_opt_state)
    elif isinstance(node, GroupScheduleState):
      if key is not None:
        out[f"lr/{key}"] = node.learning_rate
    elif isinstance(node, optax.MultiTransformState):
      for g, s in node.inner_states.items():
        visit(s, g)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child, key)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child, key)

  visit(opt_state)
  return out


# --------------------------------------------------------------------------------------------
# Audit log (host side).


def _py(x):
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return bool(x)
  if np.issubdtype(x.dtype, np.integer):
    return int(x)
  v = float(x)
  return v if math.isfinite(v) else None


def audit_records(old: ControllerState, new: ControllerState, metrics: Mapping[str, Any],
                  *, step: int | None = None,
                  rule_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """The decisions between two controller states, as JSON-ready dicts (host side, pure).

  One record per event: ``nonfinite_metric``, ``reweight``, ``clip_mode``,
  ``accumulation``, ``lr_restart``, ``stage_transition``; each carries ``evaluation``,
  ``stage`` (after the update) and ``step`` when given. Non-finite numbers become ``null``.
  """
  base = {"evaluation": _py(new.evaluation), "stage": _py(new.stage)}
  if step is not None:
    base["step"] = int(step)
  recs = []

  def add(event, **kw):
    recs.append({**base, "event": event, **kw})

  info = new.info
  for n, bad in info.nonfinite.items():
    if _py(bad):
      raw = np.asarray(metrics.get(n, np.nan), np.float64)
      add("nonfinite_metric", metric=n, value=str(float(raw)))
  fired = np.asarray(info.rules_fired)
  if fired.any():
    names = list(rule_names) if rule_names else [f"rule_{i}" for i in range(fired.size)]
    add("reweight", rules=[names[i] for i in np.flatnonzero(fired)],
        before={t: _py(v) for t, v in old.loss_weights.items()},
        after={t: _py(v) for t, v in new.loss_weights.items()})
  if _py(old.clip_mode) != _py(new.clip_mode):
    add("clip_mode", before=CLIP_MODE_NAMES[_py(old.clip_mode)],
        after=CLIP_MODE_NAMES[_py(new.clip_mode)])
  if _py(old.accum_steps) != _py(new.accum_steps):
    add("accumulation", before=_py(old.accum_steps), after=_py(new.accum_steps))
  for g, r in info.restarted.items():
    if _py(r):
      add("lr_restart", group=g, restarts=_py(new.lr_restarts[g]),
          lr_scale=_py(new.lr_scales[g]))
  if _py(info.transitioned):
    add("stage_transition", before=_py(old.stage), after=_py(new.stage),
        stable=[n for n, s in info.stable.items() if _py(s)],
        metrics={n: _py(metrics[n]) for n in info.stable})
  return recs

