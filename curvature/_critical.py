"""Critical sharpness: the step size at which the loss starts to rise along an update.

Kalra et al. 2026, "Scalable curvature ... critical sharpness", arXiv 2601.16979.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from curvature import _hvp
from curvature import _tree

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

# Status codes carried in ``CriticalSharpness.status`` (an int32, so they survive jit).
STATUS_OK = 0
"""Bracketed and bisected to the requested tolerance."""
STATUS_MAX_EVALS = 1
"""Bracketed, but the evaluation cap stopped the bisection early; the bracket is still valid."""
STATUS_NO_RISE = 2
"""The loss never rose above L(θ) while the step doubled up to the cap: η_c = ∞, λ_c = 0."""
STATUS_NOT_DESCENT = 3
"""The loss never fell below L(θ) while the step halved down to the cap: Δθ is not a descent
direction (Δθᵀg ≤ 0); reported as λ_c = 0, η_c = ∞."""
STATUS_NONFINITE = 4
"""L(θ) or a trial loss was NaN (or L(θ) was ±inf): λ_c and η_c are NaN."""

STATUS_NAMES = {
    STATUS_OK: "ok",
    STATUS_MAX_EVALS: "max_evals",
    STATUS_NO_RISE: "no_rise",
    STATUS_NOT_DESCENT: "not_descent",
    STATUS_NONFINITE: "nonfinite",
}

# Phases of the search loop.
_START, _GROW, _SHRINK, _BISECT, _DONE = 0, 1, 2, 3, 4


_MAX_MODEL_TRIALS = 4


def _two_point_parabola(e1, f1, e2, f2):
  """Coefficients (a, b) of f(η) = aη + bη² through (0, 0), (e1, f1), (e2, f2)."""
  b = (f2 / e2 - f1 / e1) / (e2 - e1)
  return f2 / e2 - b * e2, b


def _slope_parabola(slope, e1, f1):
  """Coefficients (a, b) of f(η) = aη + bη² with f'(0) = slope through (e1, f1)."""
  return slope, (f1 - slope * e1) / (e1 * e1)


def _model_trial(a, b, lo, hi, eps, tol):
  """Next trial from the parabola f(η) = aη + bη², f = L(θ − ηΔθ) − L0.

  The parabola is exact on a quadratic loss. Its root η̂ = −a/b estimates η_c; the trial goes
  to η̂(1 − ε) unless a trial at η̂(1 + ε) would already meet the stopping rule, so that two
  trials close a bracket that meets the stopping rule. Returns the trial and whether the
  model is usable (convex, descending, root strictly inside the bracket); the trial is kept
  5 % of the bracket away from its ends.
  """
  root = -a / b
  ok = (b > 0) & (a < 0) & jnp.isfinite(root) & (root > lo) & (root < hi)
  # A trial above the root closes the bracket already when the lower end is close enough.
  need_low = 1 - lo / (root * (1 + eps)) > 0.999 * tol
  trial = jnp.where(need_low, root * (1 - eps), root * (1 + eps))
  width = jnp.where(jnp.isfinite(hi), hi - lo, 0.0)
  trial = jnp.clip(trial, lo + 0.05 * width, jnp.where(jnp.isfinite(hi), hi - 0.05 * width,
                                                       trial))
  return jnp.where(ok, trial, 1.0), ok


class CriticalSharpness(NamedTuple):
  """Result of :func:`critical_sharpness`.

  Attributes:
    sharpness: λ_c = 2/η_c. 0 for STATUS_NO_RISE / STATUS_NOT_DESCENT, NaN for STATUS_NONFINITE.
    step_size: η_c = (lower + upper)/2; ∞ when the loss never rose, NaN when non-finite.
    lower: largest step tried at which the loss did not rise above L(θ).
    upper: smallest step tried at which it did (∞ when none did).
    num_evals: loss evaluations made, including L(θ) when ``loss0`` was not given (int32).
    loss0: L(θ), the reference loss (float32 or wider).
    status: one of the ``STATUS_*`` codes (int32); ``STATUS_NAMES`` maps them to words.
  """

  sharpness: jax.Array
  step_size: jax.Array
  lower: jax.Array
  upper: jax.Array
  num_evals: jax.Array
  loss0: jax.Array
  status: jax.Array


def _check_search_args(step_guess, tol_power, max_evals, growth) -> None:
  if not isinstance(tol_power, int) or tol_power < 1:
    raise ValueError(f"`tol_power` must be an int >= 1, got {tol_power!r}")
  if not isinstance(max_evals, int) or max_evals < 2:
    raise ValueError(f"`max_evals` must be an int >= 2, got {max_evals!r}")
  if isinstance(growth, (int, float)) and not growth > 1:
    raise ValueError(f"`growth` must be > 1, got {growth!r}")
  if isinstance(step_guess, (int, float)) and not step_guess > 0:
    raise ValueError(f"`step_guess` must be > 0, got {step_guess!r}")


def critical_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    direction: PyTree,
    *,
    loss0: jax.Array | float | None = None,
    step_guess: jax.Array | float = 1.0,
    tol_power: int = 4,
    max_evals: int = 40,
    growth: jax.Array | float = 2.0,
    method: str = "bisect",
    slope: jax.Array | float | None = None,
) -> CriticalSharpness:
  r"""Critical sharpness along an update direction, from forward passes only.

  .. math::
     \eta_c = \min\{\eta > 0 : L(\theta - \eta\,\Delta\theta) > L(\theta)\}, \qquad
     \lambda_c = 2/\eta_c .

  The search of Kalra et al. (2026, arXiv 2601.16979, Alg. 1): one forward pass for
  :math:`L_0 = L(\theta)` (skipped when ``loss0`` is given); an exponential phase from
  :math:`\eta_0` = ``step_guess`` that multiplies the step by ``growth`` while the loss stays
  at or below :math:`L_0` (bracket :math:`[\eta/g, \eta]`) or divides it while the loss is not
  below :math:`L_0` (bracket :math:`[\eta, g\eta]`); then bisection — ``upper = mid`` when
  :math:`L(\text{mid}) > L_0`, else ``lower = mid`` — until
  :math:`1 - \text{lower}/\text{upper} \le 2^{-k}`. :math:`\eta_c` is the bracket's midpoint, so
  the relative error of :math:`\lambda_c` is at most :math:`2^{-k-1}/(1-2^{-k-1})` (3.2 % at the
  default ``k = 4``). The paper's search is ``growth = 2``.

  On the quadratic :math:`\tfrac12\theta^\top A\theta` the loss rises exactly when
  :math:`\eta > 2/\lambda_{dir}` with :math:`\lambda_{dir} = \Delta\theta^\top A\Delta\theta /
  \Delta\theta^\top g`, so :math:`\lambda_c = \lambda_{dir}` within the tolerance. The step
  :math:`\theta - \eta_t\Delta\theta` raises the loss on this batch exactly when
  :math:`\lambda_c > 2/\eta_t`.

  The loop is a ``lax.while_loop``: the function jits with no host round-trip, and every path
  ends within ``max_evals`` evaluations. Losses are compared in float32 or wider.

  Non-finite input: a non-finite :math:`L_0` or a NaN trial loss stops the search with
  ``STATUS_NONFINITE`` and NaN sharpness; a trial loss of ``+inf`` counts as a rise. A
  direction along which the loss never rises (``STATUS_NO_RISE``) or never falls
  (``STATUS_NOT_DESCENT``, i.e. :math:`\Delta\theta^\top g \le 0`) returns sharpness 0 and
  step ∞ after ``max_evals`` evaluations. Nothing raises inside jit.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, the loss at a fixed batch.
    params: :math:`\theta`.
    direction: :math:`\Delta\theta`, a descent direction at unit learning rate (the step is
      ``params - eta * direction``); same pytree structure as ``params``.
    loss0: :math:`L(\theta)` when already known (e.g. from the train step): saves one pass.
    step_guess: :math:`\eta_0`, e.g. the previous step's :math:`\eta_c` (warm start).
    tol_power: ``k`` in the stopping rule :math:`1-\text{lower}/\text{upper}\le 2^{-k}`.
    max_evals: cap on loss evaluations, including :math:`L_0` when it is computed here.
    growth: factor of the exponential phase (2 in the paper); may be a traced scalar > 1, so
      that a caller can adapt it from step to step without recompiling.
    method: ``"bisect"`` (the paper's search, above) or ``"interpolate"``: the same phases and
      the same stopping rule, but once two trials are known the next trial is placed from the
      parabola through :math:`(0, L_0)` and the last two trials, just below and then just above
      its root, so that a nearly quadratic loss is bracketed to tolerance in about four
      evaluations; the model is used at most four times per search and only when its root lies
      inside the current bracket, otherwise the paper's rule applies. The result satisfies the
      same guarantee (``lower`` not above, ``upper`` above :math:`L_0`, ratio within
      :math:`2^{-k}`).
    slope: with ``method="interpolate"``, the directional derivative
      :math:`\tfrac{d}{d\eta}L(\theta-\eta\Delta\theta)|_0 = -\Delta\theta^\top\nabla L(\theta)`
      when it is known for free (the train step has the gradient): the parabola is then
      fixed after the first trial, one trial earlier. It only places trials; a wrong slope
      costs evaluations, never accuracy.

  Returns:
    A :class:`CriticalSharpness`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p: 0.5 * 4.0 * jnp.sum(p ** 2)          # Hessian 4 I
    >>> theta = jnp.ones(3)
    >>> out = critical_sharpness(loss, theta, jax.grad(loss)(theta))
    >>> bool(abs(out.sharpness - 4.0) / 4.0 < 0.033)
    True
  """
  _check_search_args(step_guess, tol_power, max_evals, growth)
  if method not in ("bisect", "interpolate"):
    raise ValueError(f"`method` must be 'bisect' or 'interpolate', got {method!r}")
  _hvp.check_loss_fn(loss_fn, params)
  _tree.check_same_structure(params, direction, "params", "direction")
  dtype = _tree.accum_dtype(params)
  tol = 2.0 ** (-tol_power)

  def trial_loss(eta):
    moved = jax.tree.map(lambda p, d: (p - eta.astype(p.dtype) * d).astype(p.dtype),
                         params, direction)
    return jnp.asarray(loss_fn(moved)).astype(dtype)

  if loss0 is None:
    l0 = jnp.asarray(loss_fn(params)).astype(dtype)
    n0 = 1
  else:
    l0 = jnp.asarray(loss0).astype(dtype)
    n0 = 0
  eta0 = jnp.asarray(step_guess, dtype)
  inf = jnp.asarray(jnp.inf, dtype)
  zero = jnp.zeros((), dtype)
  g = jnp.asarray(growth, dtype)

  # The interpolating search places a trial at most this far from the model's root on either
  # side, so that two trials around the root meet the stopping rule: 1 - (1-e)/(1+e) < 2^-k.
  eps = jnp.asarray(0.45 * tol, dtype)
  interpolate = method == "interpolate"
  s0 = None if slope is None else jnp.asarray(slope, dtype)

  # state: (phase, eta, lower, upper, num_evals, nonfinite,
  #         previous trial step, its L - L0, model trials made)
  init = (jnp.int32(_START), eta0, zero, inf, jnp.int32(n0), ~jnp.isfinite(l0),
          zero, zero, jnp.int32(0))

  def cond(s):
    phase, _, _, _, n, bad = s[:6]
    return (phase != _DONE) & (n < max_evals) & ~bad

  def body(s):
    phase, eta, lo, hi, n, _, e_prev, f_prev, n_model = s
    loss = trial_loss(eta)
    bad = jnp.isnan(loss)
    above = loss > l0
    below = loss < l0
    # Where each phase goes next (``jnp.select`` over the current phase).
    start_or_grow = (phase == _START) | (phase == _GROW)
    # START: decide the direction of the exponential phase from the first trial.
    # GROW:  loss not above L0 -> keep growing; above -> bracket [lo, eta], bisect.
    # SHRINK: loss not below L0 -> keep shrinking; below -> bracket [eta, hi], bisect.
    # BISECT: move the bracket end.
    new_lo = jnp.where(
        (start_or_grow & ~above) | ((phase == _SHRINK) & below) | ((phase == _BISECT) & ~above),
        eta, lo)
    new_hi = jnp.where(
        ((phase == _START) & above) | ((phase == _GROW) & above)
        | ((phase == _SHRINK) & ~below) | ((phase == _BISECT) & above),
        eta, hi)
    new_phase = jnp.select(
        [phase == _START, phase == _GROW, phase == _SHRINK],
        [jnp.where(above, _SHRINK, _GROW),
         jnp.where(above, _BISECT, _GROW),
         jnp.where(below, _BISECT, _SHRINK)],
        _BISECT).astype(jnp.int32)
    converged = (new_phase == _BISECT) & (1 - new_lo / new_hi <= tol)
    new_phase = jnp.where(converged, _DONE, new_phase).astype(jnp.int32)
    new_eta = jnp.select(
        [new_phase == _GROW, new_phase == _SHRINK],
        [eta * g, eta / g],
        0.5 * (new_lo + new_hi))
    f = loss - l0
    if interpolate:
      a2, b2 = _two_point_parabola(e_prev, f_prev, eta, f)
      if slope is None:
        a, b, have_model = a2, b2, phase != _START
      else:
        a1, b1 = _slope_parabola(s0, eta, f)
        first = phase == _START
        a, b, have_model = jnp.where(first, a1, a2), jnp.where(first, b1, b2), True
      model_eta, ok = _model_trial(a, b, new_lo, new_hi, eps, tol)
      use = ok & have_model & (new_phase != _DONE) & (n_model < _MAX_MODEL_TRIALS)
      new_eta = jnp.where(use, model_eta, new_eta)
      n_model = n_model + use.astype(jnp.int32)
    return (new_phase, new_eta, new_lo, new_hi, n + 1, bad, eta, f, n_model)

  phase, _, lo, hi, n, bad = jax.lax.while_loop(cond, body, init)[:6]
  bracketed = (phase == _BISECT) | (phase == _DONE)
  status = jnp.select(
      [bad, phase == _DONE, bracketed, phase == _SHRINK, phase == _START],
      [STATUS_NONFINITE, STATUS_OK, STATUS_MAX_EVALS, STATUS_NOT_DESCENT, STATUS_MAX_EVALS],
      STATUS_NO_RISE).astype(jnp.int32)
  nan = jnp.asarray(jnp.nan, dtype)
  eta_c = jnp.select([bad, bracketed], [nan, 0.5 * (lo + hi)], inf)
  sharpness = jnp.select([bad, bracketed], [nan, 2.0 / eta_c], zero)
  return CriticalSharpness(sharpness=sharpness, step_size=eta_c, lower=lo, upper=hi,
                           num_evals=n, loss0=l0, status=status)


def relative_critical_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    direction: PyTree,
    **kwargs,
) -> CriticalSharpness:
  r"""Relative critical sharpness: one task's loss along another task's update.

  .. math::
     \eta_c^{1\to2} = \min\{\eta : L_1(\theta - \eta\,\Delta\theta_2) > L_1(\theta)\},\qquad
     \lambda_c^{1\to2} = 2/\eta_c^{1\to2}.

  ``loss_fn`` is the monitored loss :math:`L_1` (e.g. pre-training data) and ``direction`` the
  unit-LR update :math:`\Delta\theta_2` computed for task 2 (e.g. a fine-tuning mix). Kalra et
  al. 2026 (arXiv 2601.16979) use it to choose data mixtures: a step of size :math:`\eta` on
  task 2 raises :math:`L_1` when :math:`\lambda_c^{1\to2} > 2/\eta`. The search, its
  arguments, status codes and non-finite handling are those of :func:`critical_sharpness`.
  ``STATUS_NOT_DESCENT`` is common here: task 2's update may raise :math:`L_1` at every step
  size (the tasks conflict), which is reported as sharpness 0 with that flag.
  """
  return critical_sharpness(loss_fn, params, direction, **kwargs)


def relative_sharpness_matrix(
    loss_fns: Sequence[LossFn],
    params: PyTree,
    directions: Sequence[PyTree],
    *,
    loss0s: Sequence[jax.Array] | None = None,
    step_guesses: jax.Array | float = 1.0,
    **kwargs,
) -> CriticalSharpness:
  r"""All pairs :math:`\lambda_c^{i\to j}`: loss :math:`i` along the update of task :math:`j`.

  Entry ``[i, j]`` is :func:`relative_critical_sharpness` of ``loss_fns[i]`` along
  ``directions[j]``; with one direction per loss, the diagonal holds each task's ordinary
  critical sharpness along its own update.

  Args:
    loss_fns: N callables ``loss_fn(params) -> scalar``.
    params: :math:`\theta`.
    directions: M unit-LR descent directions, each shaped like ``params``.
    loss0s: optional N known losses :math:`L_i(\theta)`.
    step_guesses: warm starts, a scalar or an ``[N, M]`` array (e.g. the previous matrix's
      ``step_size``; non-finite entries fall back to 1).
    **kwargs: ``tol_power``, ``max_evals``, ``growth`` as in :func:`critical_sharpness`.

  Returns:
    A :class:`CriticalSharpness` whose fields are ``[N, M]`` arrays.
  """
  loss_fns = list(loss_fns)
  directions = list(directions)
  if not loss_fns or not directions:
    raise ValueError("`loss_fns` and `directions` must be non-empty sequences")
  if loss0s is not None and len(loss0s) != len(loss_fns):
    raise ValueError(f"`loss0s` has {len(loss0s)} entries for {len(loss_fns)} `loss_fns`")
  guesses = jnp.broadcast_to(jnp.asarray(step_guesses), (len(loss_fns), len(directions)))
  guesses = jnp.where(jnp.isfinite(guesses) & (guesses > 0), guesses, 1.0)
  rows = []
  for i, fn in enumerate(loss_fns):
    row = []
    for j, d in enumerate(directions):
      row.append(critical_sharpness(
          fn, params, d, loss0=None if loss0s is None else loss0s[i],
          step_guess=guesses[i, j], **kwargs))
    rows.append(jax.tree.map(lambda *xs: jnp.stack(xs), *row))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
