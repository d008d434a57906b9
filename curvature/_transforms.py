"""Curvature probes as optax gradient transformations.

Each probe reads optax's ``value_fn`` extra argument (the loss at the current batch as a
function of the parameters, as ``optax.scale_by_backtracking_linesearch`` does), measures
along the update *as it stands at its place in the chain*, and stores its diagnostics in an
``info`` NamedTuple inside its state, to be logged outside jit (see :func:`probe_metrics`).
Placed before the learning-rate scaling, the update is the paper's unit-LR Δθ.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from curvature import _critical
from curvature import _hvp

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class CriticalSharpnessInfo(NamedTuple):
  """Diagnostics of the last step (kept from the last measured step when ``every`` > 1).

  Attributes:
    sharpness: λ_c = 2/η_c along the update (see :func:`curvature.critical_sharpness`).
    step_size: η_c.
    num_evals: loss evaluations the measurement took (0 on a skipped step).
    lr_sharpness: η_t·λ_c with η_t the learning rate of this step (NaN when no learning rate
      was given). The step raises the batch loss exactly when this exceeds 2.
    status: the search's status code (``curvature.STATUS_*``).
    measured: whether this step was measured (``every`` > 1 skips steps).
    directional_sharpness: ΔθᵀHΔθ/Δθᵀg when ``directional=True``, else NaN.
  """

  sharpness: jax.Array
  step_size: jax.Array
  num_evals: jax.Array
  lr_sharpness: jax.Array
  status: jax.Array
  measured: jax.Array
  directional_sharpness: jax.Array


class WarmStart(NamedTuple):
  """Warm start of the search: the last η_c and a running mean of |log(η_c,t / η_0,t)|."""

  step_guess: jax.Array
  log_change: jax.Array


class CriticalSharpnessProbeState(NamedTuple):
  """State of :func:`critical_sharpness_probe`: step count, warm start, diagnostics."""

  count: jax.Array
  warm: WarmStart
  info: CriticalSharpnessInfo


class RelativeSharpnessInfo(NamedTuple):
  """Per-name diagnostics of :func:`relative_sharpness_probe` (dicts keyed by loss name)."""

  sharpness: dict[str, jax.Array]
  step_size: dict[str, jax.Array]
  num_evals: dict[str, jax.Array]
  lr_sharpness: dict[str, jax.Array]
  status: dict[str, jax.Array]
  measured: jax.Array


class RelativeSharpnessProbeState(NamedTuple):
  count: jax.Array
  warm: dict[str, WarmStart]
  info: RelativeSharpnessInfo


class ScaleByCriticalSharpnessState(NamedTuple):
  """State of :func:`scale_by_critical_sharpness`: the probe's state and ``scale``, the factor
  applied to the last update (logged as ``curv/lr_scale`` by :func:`probe_metrics`)."""

  probe: CriticalSharpnessProbeState
  scale: jax.Array


def _learning_rate_at(learning_rate: ScalarOrSchedule | None, count: jax.Array) -> jax.Array:
  if learning_rate is None:
    return jnp.asarray(jnp.nan, jnp.float32)
  if callable(learning_rate):
    return jnp.asarray(learning_rate(count), jnp.float32)
  return jnp.asarray(learning_rate, jnp.float32)


def _check_probe_args(every, step_guess, tol_power, max_evals, growth, method,
                      bracket="trials") -> None:
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"`every` must be an int >= 1, got {every!r}")
  if isinstance(growth, str) and growth != "adaptive":
    raise ValueError(f"`growth` must be a number > 1 or 'adaptive', got {growth!r}")
  _critical.check_search_args(step_guess, tol_power, max_evals,
                              2.0 if growth == "adaptive" else growth, method, bracket)


def _require_value_fn(value_fn, name: str) -> None:
  if value_fn is None:
    raise TypeError(
        f"{name}.update needs the keyword argument `value_fn` (the loss at this batch as a "
        "function of params), e.g. tx.update(grads, state, params, value=loss, "
        "value_fn=lambda p: loss_fn(p, batch)).")


def _direction(updates: PyTree, scaled: bool) -> PyTree:
  # Before the learning-rate scaling an optax update points up the gradient (the step is
  # params - eta * u); after it, the update is already the signed step (params + u).
  return optax.tree.scale(-1.0, updates) if scaled else updates


_LOG_CHANGE_DECAY = 0.8
_CONVEX_LEAD = 1.5


def _init_warm(step_guess: float) -> WarmStart:
  # log 2: the first search grows by the paper's factor 2.
  return WarmStart(jnp.asarray(step_guess, jnp.float32), jnp.log(jnp.float32(2.0)))


def _growth(warm: WarmStart, growth, tol_power: int) -> jax.Array | float:
  """The exponential phase's factor: fixed, or adapted to how fast η_c has been moving.

  ``"adaptive"``: g = clip(exp(m), 1/(1 − 2^−k), 2) with m the running mean of
  |log(η_c,t/η_0,t)|. When η_c moves little, a bracket [η_0, g η_0] already meets the
  stopping rule 1 − lower/upper ≤ 2^−k and the search needs two trials; when it jumps, g
  returns to the paper's 2. The result's tolerance is the same either way.
  """
  if growth != "adaptive":
    return growth
  low = jnp.log(jnp.float32(1.0 / (1.0 - 2.0 ** (-tol_power))))
  return jnp.exp(jnp.clip(warm.log_change, low, jnp.log(jnp.float32(2.0))))


def _next_warm(warm: WarmStart, result: _critical.CriticalSharpness) -> WarmStart:
  ok = jnp.isfinite(result.step_size) & (result.step_size > 0)
  new = result.step_size.astype(jnp.float32)
  change = jnp.abs(jnp.log(jnp.where(ok, new, 1.0) / warm.step_guess))
  log_change = _LOG_CHANGE_DECAY * warm.log_change + (1 - _LOG_CHANGE_DECAY) * change
  return WarmStart(step_guess=jnp.where(ok, new, warm.step_guess),
                   log_change=jnp.where(ok, log_change, warm.log_change))


def _critical_info(res: _critical.CriticalSharpness | None, lr=None,
                   directional=None) -> CriticalSharpnessInfo:
  """The probe's diagnostics from one search (all NaN / 0 before the first, ``res=None``)."""
  nan = jnp.asarray(jnp.nan, jnp.float32)
  if res is None:
    return CriticalSharpnessInfo(
        sharpness=nan, step_size=nan, num_evals=jnp.int32(0), lr_sharpness=nan,
        status=jnp.int32(_critical.STATUS_OK), measured=jnp.bool_(False),
        directional_sharpness=nan)
  sharp = res.sharpness.astype(jnp.float32)
  return CriticalSharpnessInfo(
      sharpness=sharp, step_size=res.step_size.astype(jnp.float32), num_evals=res.num_evals,
      lr_sharpness=lr * sharp, status=res.status, measured=jnp.bool_(True),
      directional_sharpness=nan if directional is None else directional.astype(jnp.float32))


class _SearchSettings(NamedTuple):
  """The search arguments a probe passes on to :func:`curvature.critical_sharpness`."""

  tol_power: int
  max_evals: int
  growth: float | str
  method: str
  bracket: str


def _measure(value_fn, params, direction, warm: WarmStart, search: _SearchSettings, *,
             loss0=None, grad=None):
  """One λ_c measurement warm-started from ``warm``; returns it and the next warm start."""
  # The adaptive factor serves the paper's search, whose first two trials bracket η_c when it
  # moves slowly; the interpolating search places its own trials and grows by 2 without a model.
  growth = search.growth
  if growth == "adaptive":
    growth = _growth(warm, growth, search.tol_power) if search.method == "bisect" else 2.0
  guess = warm.step_guess
  if search.bracket == "convex":
    # A first trial below η_c lets a rise just above the model's root close the bracket with
    # the chord (two trials); from above it takes three. Start below the last η_c by 1.5 times
    # the typical step-to-step change of log η_c.
    guess = guess * jnp.exp(-_CONVEX_LEAD * warm.log_change)
  res = _critical.critical_sharpness(
      value_fn, params, direction, grad=grad, loss0=loss0, step_guess=guess,
      tol_power=search.tol_power, max_evals=search.max_evals, growth=growth,
      method=search.method, bracket=search.bracket)
  return res, _next_warm(warm, res)


def _on_schedule(every: int, count: jax.Array, measure, skip):
  """``measure(None)`` on steps with ``count % every == 0``, else ``skip(None)``: a
  ``lax.cond``, so that the step compiles once whatever ``every`` is."""
  if every == 1:
    return measure(None)
  return jax.lax.cond(count % every == 0, measure, skip, None)


def critical_sharpness_probe(
    *,
    learning_rate: ScalarOrSchedule | None = None,
    every: int = 1,
    step_guess: float = 1.0,
    tol_power: int = 4,
    max_evals: int = 40,
    growth: float | str = "adaptive",
    method: str = "interpolate",
    bracket: str = "trials",
    directional: bool = False,
    scaled: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Records critical sharpness λ_c along the update; leaves the updates unchanged.

  Drop it into an existing chain, before the learning-rate scaling, and pass optax's
  ``value_fn`` (and ``value``, the loss the train step already computed, and ``grad``, the
  gradient, which gives the slope Δθᵀg for free — the same extra args as
  ``optax.scale_by_backtracking_linesearch``; without them one jvp of ``value_fn`` gives
  both)::

    tx = optax.chain(optax.scale_by_adam(), curvature.critical_sharpness_probe(
        learning_rate=schedule), optax.scale_by_learning_rate(schedule))
    updates, state = tx.update(grads, state, params, value=loss, grad=grads,
                               value_fn=lambda p: loss_fn(p, batch))

  At that place the update is the paper's unit-LR Δθ (for Adam-type optimisers
  :math:`\hat m/(\sqrt{\hat v}+\epsilon)` with the current gradient already folded in, plus
  :math:`\gamma\theta` after ``add_decayed_weights``), and the step
  :math:`\theta-\eta_t\Delta\theta` raises the batch loss exactly when
  :math:`\eta_t\lambda_c > 2` (Kalra et al. 2026, arXiv 2601.16979). Each measurement
  warm-starts from the previous :math:`\eta_c` (about three forward passes with ``value`` and
  ``grad``; see ``benchmarks/critical_bench.py``). With ``every=k`` only steps with
  ``count % k == 0`` are measured (a ``lax.cond``: no recompilation); the info of the last
  measurement is kept in between.

  Bad input: the search's rules apply (``curvature.critical_sharpness``): a NaN loss gives NaN
  sharpness with ``status = STATUS_NONFINITE``, an update with Δθᵀg ≤ 0 sharpness 0 with
  ``STATUS_NOT_DESCENT``, a dip below the loss's rounding NaN with ``STATUS_UNRESOLVED``; a
  NaN result does not disturb the warm start.

  Args:
    learning_rate: the learning rate or optax schedule of the chain (indexed by this probe's
      own step count), used only to report :math:`\eta_t\lambda_c`.
    every: measure every ``every`` steps.
    step_guess: initial :math:`\eta_0` for the first measurement.
    tol_power, max_evals: search settings, see :func:`curvature.critical_sharpness`.
    growth: factor of the exponential phase, or ``"adaptive"`` (default): with
      ``method="bisect"``, start at the paper's 2 and shrink towards 1/(1 − 2^−k) while η_c
      moves slowly from step to step (a warm search then needs about 4 evaluations instead of
      6 at equal tolerance); the interpolating search places its own trials and falls back
      to 2.
    method, bracket: the search and its bracket, see :func:`curvature.critical_sharpness`.
    directional: also record :math:`\Delta\theta^\top H\Delta\theta/\Delta\theta^\top g`
      (one extra forward-over-reverse pass).
    scaled: set to True when the probe sits *after* the learning-rate scaling; the direction
      is then ``-updates`` and step sizes are in units of the scaled update (η·λ_c of the
      actual step is then ``sharpness`` itself, which is what ``lr_sharpness`` reports).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
    keyword ``value_fn``; ``value`` and ``grad`` are optional (``grad`` must be the gradient
    of ``value_fn`` at ``params``: the sign of Δθᵀg decides ``STATUS_NOT_DESCENT``); other
    extra args are ignored.

  Example (on the quadratic ½θᵀAθ, λ_c and the directional sharpness both equal
  gᵀAg/gᵀg along the gradient g = Aθ: here (1 + 27)/(1 + 9) = 2.8, λ_c within the search's
  tolerance 1/31):
    >>> import jax, jax.numpy as jnp, optax, curvature
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(batch * p ** 2)      # A = diag(batch)
    >>> params, batch = jnp.ones(2), jnp.array([1.0, 3.0])
    >>> tx = optax.chain(
    ...     curvature.critical_sharpness_probe(learning_rate=0.5, directional=True),
    ...     optax.scale_by_learning_rate(0.5))
    >>> loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    >>> updates, state = tx.update(grads, tx.init(params), params, value=loss, grad=grads,
    ...                            value_fn=lambda p: loss_fn(p, batch))
    >>> info = state[0].info
    >>> bool(abs(info.sharpness / 2.8 - 1) <= 1 / 31)
    True
    >>> round(float(info.directional_sharpness), 4)
    2.8
    >>> bool(info.lr_sharpness < 2)          # η·λ_c < 2: this step lowers the loss
    True
  """
  _check_probe_args(every, step_guess, tol_power, max_evals, growth, method, bracket)
  search = _SearchSettings(tol_power, max_evals, growth, method, bracket)

  def init_fn(params):
    del params
    return CriticalSharpnessProbeState(count=jnp.int32(0), warm=_init_warm(step_guess),
                                       info=_critical_info(None))

  def update_fn(updates, state, params=None, *, value_fn=None, value=None, grad=None,
                **extra_args):
    del extra_args
    _require_value_fn(value_fn, "critical_sharpness_probe")
    if params is None:
      raise ValueError("critical_sharpness_probe.update needs `params`.")
    direction = _direction(updates, scaled)
    lr = jnp.float32(1.0) if scaled else _learning_rate_at(learning_rate, state.count)

    def measure(_):
      res, warm = _measure(value_fn, params, direction, state.warm, search, loss0=value,
                           grad=grad)
      ds = _hvp.directional_sharpness(value_fn, params, direction) if directional else None
      return _critical_info(res, lr, ds), warm

    def skip(_):
      return state.info._replace(num_evals=jnp.int32(0), measured=jnp.bool_(False)), \
          state.warm

    info, warm = _on_schedule(every, state.count, measure, skip)
    new_state = CriticalSharpnessProbeState(
        count=optax.safe_increment(state.count), warm=warm, info=info)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def relative_sharpness_probe(
    names: Sequence[str],
    *,
    learning_rate: ScalarOrSchedule | None = None,
    every: int = 1,
    step_guess: float = 1.0,
    tol_power: int = 4,
    max_evals: int = 40,
    growth: float | str = "adaptive",
    method: str = "interpolate",
    bracket: str = "trials",
    scaled: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Records relative critical sharpness of named extra losses along the current update.

  For every name ``k`` it measures :math:`\lambda_c^{k\to\text{train}} = 2/\eta_c` with
  :math:`\eta_c = \min\{\eta: L_k(\theta-\eta\Delta\theta) > L_k(\theta)\}`, where
  :math:`\Delta\theta` is the update being trained on (Kalra et al. 2026, relative critical
  sharpness for data mixing). The losses come through the extra argument
  ``relative_value_fns``, a dict ``{name: fn(params) -> scalar}`` holding at least ``names``::

    tx.update(grads, state, params, value_fn=train_loss,
              relative_value_fns={"prose": lambda p: loss_fn(p, prose_batch)})

  A step of size η on the training loss raises :math:`L_k` when ``lr_sharpness[k]`` > 2.

  The direction is the chain's own update, the one the run takes (for AdamW its moments
  carry the history of the training mix): the in-training reading of the paper's quantity.
  Kalra et al.'s Fig. 5 measures along a *fresh* optimizer's first step on a candidate mix from
  a fixed checkpoint instead; :func:`curvature.relative_sharpness_band` with such directions
  (and ``experiments.repro_mixing``) does that.
  Status and non-finite handling per name as in :func:`curvature.critical_sharpness`;
  ``STATUS_NOT_DESCENT`` means the update raises :math:`L_k` at every step size.

  Args:
    names: the loss names to measure (static: they fix the state's structure).
    learning_rate, every, step_guess, tol_power, max_evals, growth, method, bracket, scaled:
      as in :func:`critical_sharpness_probe`. No gradient of :math:`L_k` is at hand, so each
      measurement takes :math:`L_k(\theta)` and the slope :math:`\Delta\theta^\top\nabla L_k`
      from one jvp (counted in ``num_evals``).
  """
  names = tuple(names)
  if not names or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`names` must be a non-empty sequence of str, got {names!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"`names` must be distinct, got {names!r}")
  _check_probe_args(every, step_guess, tol_power, max_evals, growth, method, bracket)
  search = _SearchSettings(tol_power, max_evals, growth, method, bracket)
  nan = jnp.asarray(jnp.nan, jnp.float32)

  def per_name(v):
    return {n: v for n in names}

  def init_fn(params):
    del params
    info = RelativeSharpnessInfo(
        sharpness=per_name(nan), step_size=per_name(nan), num_evals=per_name(jnp.int32(0)),
        lr_sharpness=per_name(nan), status=per_name(jnp.int32(0)), measured=jnp.bool_(False))
    return RelativeSharpnessProbeState(
        count=jnp.int32(0), warm=per_name(_init_warm(step_guess)), info=info)

  def update_fn(updates, state, params=None, *, relative_value_fns=None, **extra_args):
    del extra_args
    if relative_value_fns is None:
      raise TypeError(
          "relative_sharpness_probe.update needs the keyword argument `relative_value_fns`, "
          f"a dict {{name: loss_fn(params)}} with the names {list(names)}.")
    missing = [n for n in names if n not in relative_value_fns]
    if missing:
      raise KeyError(f"`relative_value_fns` lacks the names {missing}; it has "
                     f"{sorted(relative_value_fns)}.")
    if params is None:
      raise ValueError("relative_sharpness_probe.update needs `params`.")
    direction = _direction(updates, scaled)
    lr = jnp.float32(1.0) if scaled else _learning_rate_at(learning_rate, state.count)

    def measure(_):
      # No gradient of L_k is at hand: each search takes L_k(θ) and its slope from one jvp.
      out, warm = {}, {}
      for n in names:
        out[n], warm[n] = _measure(relative_value_fns[n], params, direction, state.warm[n],
                                   search)
      sharp = {n: r.sharpness.astype(jnp.float32) for n, r in out.items()}
      info = RelativeSharpnessInfo(
          sharpness=sharp,
          step_size={n: r.step_size.astype(jnp.float32) for n, r in out.items()},
          num_evals={n: r.num_evals for n, r in out.items()},
          lr_sharpness={n: lr * s for n, s in sharp.items()},
          status={n: r.status for n, r in out.items()},
          measured=jnp.bool_(True))
      return info, warm

    def skip(_):
      info = state.info._replace(num_evals=per_name(jnp.int32(0)), measured=jnp.bool_(False))
      return info, state.warm

    info, warm = _on_schedule(every, state.count, measure, skip)
    return updates, RelativeSharpnessProbeState(
        count=optax.safe_increment(state.count), warm=warm, info=info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_critical_sharpness(
    target: float = 1.0,
    *,
    learning_rate: ScalarOrSchedule,
    min_scale: float = 0.0,
    max_scale: float = 1.0,
    smoothing: float = 0.0,
    **probe_kwargs,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the update so that the effective :math:`\eta_{eff}\lambda_c` stays near ``target``.

  Kalra et al. (2026) observe that the step raises the batch loss when :math:`\eta\lambda_c>2`
  and suggest critical sharpness as a cheap signal for step-size control. This controller
  measures :math:`\lambda_c` along the incoming update (placed before the learning-rate
  scaling, like :func:`critical_sharpness_probe`) and multiplies the update by

  .. math:: s_t = \operatorname{clip}\big(\text{target} / (\eta_t\lambda_c),\;
            \text{min\_scale},\; \text{max\_scale}\big),

  so that :math:`\eta_t s_t \lambda_c = \text{target}` whenever the clip is inactive. With the
  default ``max_scale = 1`` it only ever shortens steps (a curvature-aware brake below the
  schedule); ``max_scale > 1`` lets it lengthen them too. ``smoothing`` in [0, 1) mixes in the
  previous factor, :math:`s_t \leftarrow \text{smoothing}\, s_{t-1} + (1-\text{smoothing})\, s_t`.

  Non-finite or absent measurements (NaN sharpness, a skipped step with ``every`` > 1) keep the
  previous factor; a measured :math:`\lambda_c = 0` gives ``max_scale`` when the loss never rises
  along the update (``STATUS_NO_RISE``) and ``min_scale`` when the update is not a descent
  direction (``STATUS_NOT_DESCENT``: any step raises the loss to first order).

  Args:
    target: the desired :math:`\eta_{eff}\lambda_c`, below 2 for a step that lowers the loss.
    learning_rate: the chain's learning rate or schedule (the scaling that follows).
    min_scale, max_scale: bounds on the factor.
    smoothing: EMA coefficient on the factor.
    **probe_kwargs: ``every``, ``step_guess``, ``tol_power``, ``max_evals``, ``growth``,
      ``method``, ``bracket`` of the underlying :func:`critical_sharpness_probe`.
  """
  # A traced target (optax.inject_hyperparams) is accepted unchecked.
  if isinstance(target, (int, float)) and not target > 0:
    raise ValueError(f"`target` must be > 0, got {target!r}")
  if not 0 <= min_scale <= max_scale:
    raise ValueError(f"need 0 <= `min_scale` <= `max_scale`, got {min_scale!r}, {max_scale!r}")
  if not 0 <= smoothing < 1:
    raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}")
  if "scaled" in probe_kwargs or "directional" in probe_kwargs:
    raise TypeError("scale_by_critical_sharpness must sit before the learning-rate scaling; "
                    "`scaled` / `directional` are not accepted.")
  probe = critical_sharpness_probe(learning_rate=learning_rate, **probe_kwargs)

  def init_fn(params):
    return ScaleByCriticalSharpnessState(probe=probe.init(params), scale=jnp.float32(1.0))

  def update_fn(updates, state, params=None, **extra_args):
    _, probe_state = probe.update(updates, state.probe, params, **extra_args)
    info = probe_state.info
    # λ_c = 0 means two different things: the loss never rises along a descent direction
    # (NO_RISE: lengthen, up to max_scale) or the update is not a descent direction at all
    # (NOT_DESCENT: every step raises the loss to first order: shorten to min_scale).
    raw = jnp.where(info.lr_sharpness > 0, target / info.lr_sharpness,
                    jnp.where(info.status == _critical.STATUS_NOT_DESCENT, min_scale, max_scale))
    raw = jnp.clip(raw, min_scale, max_scale)
    new = smoothing * state.scale + (1 - smoothing) * raw
    usable = info.measured & jnp.isfinite(info.lr_sharpness)
    scale = jnp.where(usable, new, state.scale).astype(jnp.float32)
    # optax.tree.scale promotes to the scale's float32; the update keeps its own dtype.
    updates = optax.tree.cast_like(optax.tree.scale(scale, updates), updates)
    return updates, ScaleByCriticalSharpnessState(probe=probe_state, scale=scale)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def probe_metrics(opt_state: PyTree, prefix: str = "curv/") -> dict[str, jax.Array]:
  """Collects the diagnostics of every losslab probe inside an optax state into flat metrics.

  Names: ``curv/critical_sharpness``, ``curv/step_size``, ``curv/num_evals``,
  ``curv/lr_sharpness``, ``curv/status``, ``curv/directional_sharpness``,
  ``curv/relative/<name>``, ``curv/relative_lr/<name>`` and ``curv/relative_evals/<name>``,
  ``curv/lr_scale`` for the controller. When a chain holds several probes of one kind, later
  ones get a ``_<i>`` suffix. Works inside or outside jit.

  ``curv/directional_sharpness`` is present for every :func:`critical_sharpness_probe` and
  is NaN unless the probe was built with ``directional=True``: a directional and a plain
  probe have states of the same structure (the value is traced inside jit), so the key cannot
  be left out here. A caller that knows its probe is not directional drops it, e.g.
  ``metrics.pop("curv/directional_sharpness")``.

  Example (λ_c of a quadratic with curvature 4 along every direction is 4, within the
  search's tolerance 1/31):
    >>> import jax, jax.numpy as jnp, optax, curvature
    >>> loss_fn = lambda p, batch: 2.0 * jnp.sum((p - batch) ** 2)   # Hessian 4 I
    >>> params, batch = jnp.ones(3), jnp.zeros(3)
    >>> tx = optax.chain(curvature.critical_sharpness_probe(learning_rate=0.1),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    >>> _, state = tx.update(grads, tx.init(params), params, value=loss, grad=grads,
    ...                      value_fn=lambda p: loss_fn(p, batch))
    >>> m = curvature.probe_metrics(state)
    >>> sorted(m)                                             # doctest: +NORMALIZE_WHITESPACE
    ['curv/critical_sharpness', 'curv/directional_sharpness', 'curv/lr_sharpness',
     'curv/num_evals', 'curv/status', 'curv/step_size']
    >>> lam = float(m["curv/critical_sharpness"])
    >>> abs(lam / 4 - 1) <= 1 / 31, float(m["curv/lr_sharpness"]) == float(jnp.float32(0.1) * lam)
    (True, True)
    >>> bool(jnp.isnan(m["curv/directional_sharpness"]))            # directional=False
    True
  """
  out: dict[str, jax.Array] = {}

  def put(name, value):
    key, i = prefix + name, 1
    while key in out:
      key, i = f"{prefix}{name}_{i}", i + 1
    out[key] = value

  def visit(node):
    if isinstance(node, ScaleByCriticalSharpnessState):
      put("lr_scale", node.scale)
      visit(node.probe)
    elif isinstance(node, CriticalSharpnessProbeState):
      i = node.info
      put("critical_sharpness", i.sharpness)
      put("step_size", i.step_size)
      put("num_evals", i.num_evals)
      put("lr_sharpness", i.lr_sharpness)
      put("status", i.status)
      put("directional_sharpness", i.directional_sharpness)
    elif isinstance(node, RelativeSharpnessProbeState):
      for n in node.info.sharpness:
        put(f"relative/{n}", node.info.sharpness[n])
        put(f"relative_lr/{n}", node.info.lr_sharpness[n])
        put(f"relative_evals/{n}", node.info.num_evals[n])
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)

  visit(opt_state)
  return out
