"""Critical sharpness: the step size at which the loss starts to rise along an update.

Kalra et al. 2026, "Scalable curvature ... critical sharpness", arXiv 2601.16979.

The module has three layers: the reference point (L(θ) and the slope along Δθ, from the
gradient or one forward-mode pass), the search over the step size (one ``lax.while_loop`` whose
body is :func:`_search_step`), and the result (status codes, λ_c = 2/η_c).
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
"""Bracketed to the requested tolerance, with a loss change the loss's dtype resolves."""
STATUS_MAX_EVALS = 1
"""The evaluation cap stopped the search early: the bracket is valid but wider than asked
(λ_c from its midpoint), or no step with a lower loss was found yet (λ_c NaN)."""
STATUS_NO_RISE = 2
"""The loss never rose above L(θ) while the step grew up to the cap: η_c = ∞, λ_c = 0."""
STATUS_NOT_DESCENT = 3
"""Δθᵀ∇L(θ) ≤ 0: the step θ − ηΔθ raises the loss to first order at every small η.
Reported as λ_c = 0, η_c = ∞, decided from the slope before any trial step."""
STATUS_NONFINITE = 4
"""L(θ), the slope or a trial loss was NaN (or L(θ) was ±inf): λ_c and η_c are NaN."""
STATUS_UNRESOLVED = 5
"""The loss's dtype cannot place η_c to the tolerance: the first-order change of the loss
across the tolerance window, Δθᵀ∇L · 2^-k · η, is below twice the rounding of L(θ) (4 ulps)
for every step still in question. λ_c and η_c are NaN; ``lower``/``upper`` keep the bracket."""

STATUS_NAMES = {
    STATUS_OK: "ok",
    STATUS_MAX_EVALS: "max_evals",
    STATUS_NO_RISE: "no_rise",
    STATUS_NOT_DESCENT: "not_descent",
    STATUS_NONFINITE: "nonfinite",
    STATUS_UNRESOLVED: "unresolved",
}

# A trial loss is compared with L(θ) after both were rounded to the loss's dtype; each carries
# about one ulp of rounding from the forward pass's last reductions, so a difference below a few
# ulps of L(θ) says nothing about the sign of the true difference.
_RESOLUTION_ULPS = 4.0
# The interpolating search trusts its model for at most this many trials per search, then
# falls back to the paper's rule (which always makes progress).
_MAX_MODEL_TRIALS = 4
# After this many model trials in a row that left the bracket one-sided (both rose, or
# neither did), the next trial is the paper's (x growth or / growth). Two: the first model
# trial, from the parabola through one far trial, often errs by 10-30 % on the same side as
# that trial; the second, from the parabola through the last two trials, rarely does
# (benchmarks/critical_bench.py, GPT: 5-6 evaluations in 8 of 60 searches with one, 2 with two).
_ONE_SIDED_LIMIT = 2
# One model trial extrapolates at most this factor beyond the largest step without a rise: a
# parabola fitted where the line is still flat can overshoot (and a far step can overflow).
_MAX_EXTRAPOLATION = 8.0
# A closing trial is placed at the edge of the window that meets the stopping rule, moved in
# by this fraction of the tolerance so that rounding cannot leave the bracket just too wide.
_EDGE = 0.999

METHODS = ("interpolate", "bisect")
BRACKETS = ("trials", "convex")


class CriticalSharpness(NamedTuple):
  """Result of :func:`critical_sharpness`.

  Attributes:
    sharpness: λ_c = 2/η_c. 0 for STATUS_NO_RISE / STATUS_NOT_DESCENT, NaN for
      STATUS_NONFINITE / STATUS_UNRESOLVED and for STATUS_MAX_EVALS without a bracket.
    step_size: η_c = (lower + upper)/2; ∞ when the loss never rises or never falls, NaN where
      ``sharpness`` is NaN.
    lower: largest step tried at which the loss did not rise above L(θ) (0 when none).
    upper: smallest step tried at which it did (∞ when none did).
    num_evals: loss evaluations made, including the pass for L(θ) and the slope when they were
      computed here (one ``jax.jvp``, counted as one evaluation) (int32).
    loss0: L(θ), the reference loss (float32 or wider).
    slope: Δθᵀ∇L(θ), the rate at which the step θ − ηΔθ lowers the loss at η = 0 (> 0 for a
      descent direction); from ``grad`` when given, else from the jvp.
    status: one of the ``STATUS_*`` codes (int32); ``STATUS_NAMES`` maps them to words.
  """

  sharpness: jax.Array
  step_size: jax.Array
  lower: jax.Array
  upper: jax.Array
  num_evals: jax.Array
  loss0: jax.Array
  slope: jax.Array
  status: jax.Array


def check_search_args(step_guess, tol_power, max_evals, growth, method,
                      bracket="trials") -> None:
  """Raise a ValueError naming the first bad search argument (trace time)."""
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
  if bracket not in BRACKETS:
    raise ValueError(f"`bracket` must be one of {BRACKETS}, got {bracket!r}")
  if not isinstance(tol_power, int) or tol_power < 1:
    raise ValueError(f"`tol_power` must be an int >= 1, got {tol_power!r}")
  if not isinstance(max_evals, int) or max_evals < 2:
    raise ValueError(f"`max_evals` must be an int >= 2, got {max_evals!r}")
  if isinstance(growth, (int, float)) and not growth > 1:
    raise ValueError(f"`growth` must be > 1, got {growth!r}")
  if isinstance(step_guess, (int, float)) and not step_guess > 0:
    raise ValueError(f"`step_guess` must be > 0, got {step_guess!r}")


# --------------------------------------------------------------------------------------------
# The reference point: L(θ), the slope Δθᵀ∇L(θ) and the loss's resolution
# --------------------------------------------------------------------------------------------


def _reference(loss_fn, params, direction, loss0, grad, dtype):
  """``(L0, Δθᵀ∇L, evaluations made)``, all in ``dtype``.

  The slope comes from ``grad`` when given (free: the train step has it); otherwise from one
  ``jax.jvp`` of ``loss_fn`` along Δθ, which returns L(θ) with it, so when ``loss0`` is not
  given either the jvp replaces the forward pass for L(θ).
  """
  if grad is not None:
    _tree.check_same_structure(params, grad, "params", "grad")
    slope = _tree.tree_vdot(direction, grad).astype(dtype)
    if loss0 is not None:
      return jnp.asarray(loss0).astype(dtype), slope, 0
    return jnp.asarray(loss_fn(params)).astype(dtype), slope, 1
  tangent = jax.tree.map(lambda p, d: d.astype(p.dtype), params, direction)
  l0, dl = jax.jvp(loss_fn, (params,), (tangent,))
  if loss0 is not None:
    l0 = loss0
  return jnp.asarray(l0).astype(dtype), jnp.asarray(dl).astype(dtype), 1


def _resolution(loss_fn, params, l0):
  """``_RESOLUTION_ULPS`` ulps of L0 in the dtype ``loss_fn`` returns (a bfloat16 loss: 2^-7)."""
  out_dtype = jax.eval_shape(loss_fn, params).dtype
  return _RESOLUTION_ULPS * jnp.finfo(out_dtype).eps * jnp.abs(l0)


# --------------------------------------------------------------------------------------------
# Models of f(η) = L(θ − ηΔθ) − L0 that place the interpolating search's trials
# --------------------------------------------------------------------------------------------


def _parabola_root(slope, eta, f):
  """Root η̂ > 0 of f(η) ≈ −slope·η + bη² through (η, f); NaN when that parabola has none."""
  b = (f + slope * eta) / (eta * eta)
  return jnp.where(b > 0, slope / jnp.where(b > 0, b, 1.0), jnp.nan)


def _chord_parabola_root(e1, f1, e2, f2):
  """Root η̂ > 0 of f(η) ≈ aη + bη² through (0, 0), (e1, f1) and (e2, f2); NaN when none.

  It uses no slope: on a line far from quadratic, where the slope at 0 says little about the
  shape near η_c, the two trials nearest η_c place the next one much better.
  """
  b = (f2 / e2 - f1 / e1) / (e2 - e1)
  a = f1 / e1 - b * e1
  return jnp.where((b > 0) & (a < 0), -a / jnp.where(b > 0, b, 1.0), jnp.nan)


def _certified_lower(s, slope, resolution, convex: bool):
  """The bracket's lower end: the largest tried step at which the loss did not rise, or, with
  ``convex``, the root of the chord between the bracket's ends when that is larger.

  If f(η) = L(θ − ηΔθ) − L0 is convex on [lower, upper], it lies below that chord, so it is
  ≤ 0 up to the chord's root and η_c is at least the root. Used only when the samples are
  consistent with convexity on [0, upper]: the first secant f_lo/lo not below the tangent
  −slope at 0 (to the loss's rounding), and not above the secant from lower to upper.
  """
  if not convex:
    return s.lo
  both = (s.lo > 0) & jnp.isfinite(s.hi) & jnp.isfinite(s.f_hi)
  lo = jnp.where(both, s.lo, 1.0)
  rise = jnp.where(both, s.f_hi - s.f_lo, 1.0)
  chord = lo - s.f_lo * (s.hi - lo) / rise
  consistent = ((s.f_lo + slope * lo >= -2.0 * resolution)
                & (s.f_lo / lo <= rise / jnp.where(both, s.hi - lo, 1.0)))
  return jnp.where(both & consistent & (chord > s.lo) & (chord < s.hi), chord, s.lo)


def _model_trial(slope, s, tol, convex: bool):
  """The interpolating search's next trial from the bracket and the model's root.

  The model's root η̂ is the best guess of η_c: after the first trial, from the parabola with
  the known slope through it (exact on a quadratic); later, from the parabola through (0, 0)
  and two trials — the bracket's ends once both are known, else the last two trials. When a
  trial at the edge of the window that meets the stopping rule (lower/(1 − τ) above a lower
  end, upper·(1 − τ) below an upper end, τ just under 2^-k) lies beyond η̂, that edge is
  tried: it closes the bracket if η̂ errs by less than the window. Otherwise η̂ itself is
  tried, so that the next trial can close the bracket on either side. Returns the trial,
  whether it is usable, and whether it is an edge trial.
  """
  has_lo, has_hi = s.lo > 0, jnp.isfinite(s.hi)
  both = has_lo & has_hi
  first = s.e_prev == 0
  e1 = jnp.where(both, s.lo, s.e_prev)
  f1 = jnp.where(both, s.f_lo, s.f_prev)
  e2 = jnp.where(both, s.hi, s.eta)
  f2 = jnp.where(both, s.f_hi, s.f_eta)
  root = jnp.where(first & ~both, _parabola_root(slope, s.eta, s.f_eta),
                   _chord_parabola_root(jnp.where(first, 1.0, e1), f1, e2, f2))
  # When the root sits within τ/4 of a known end (a trial landed on it: the model is good),
  # a window of τ/2 closes the bracket as surely and halves the midpoint's error; otherwise
  # the full window τ.
  tau = _EDGE * tol
  near_lo = has_lo & (root <= s.lo / (1.0 - 0.25 * tau))
  near_hi = has_hi & (root >= s.hi * (1.0 - 0.25 * tau))
  up_edge = s.lo / (1.0 - jnp.where(near_lo, 0.5 * tau, tau))
  down_edge = s.hi * (1.0 - jnp.where(near_hi, 0.5 * tau, tau))
  at_up, at_down = has_lo & (root <= up_edge), has_hi & (root >= down_edge)
  if convex:
    # Just above the root: a rise there closes the bracket with the chord from a lower end.
    root = jnp.where(has_lo, jnp.minimum(root * (1.0 + 0.25 * tol), 0.5 * (root + s.hi)),
                     root)
  trial = jnp.where(at_up, up_edge, jnp.where(at_down, down_edge, root))
  trial = jnp.where(has_hi, trial, jnp.minimum(trial, _MAX_EXTRAPOLATION * s.lo))
  # A root outside the bracket (rounding, when an end sits on η_c) still sends the trial to
  # the nearer edge, inside the bracket.
  ok = (jnp.isfinite(root) & (trial > s.lo) & (trial < s.hi)
        & jnp.isfinite(f1) & jnp.isfinite(f2) & (s.n_model < _MAX_MODEL_TRIALS))
  return trial, ok, at_up | at_down


# --------------------------------------------------------------------------------------------
# The search loop
# --------------------------------------------------------------------------------------------


class _Search(NamedTuple):
  eta: jax.Array        # the next trial step
  lo: jax.Array         # largest step without a rise (0: none yet)
  hi: jax.Array         # smallest step with a rise (∞: none yet)
  f_lo: jax.Array       # L − L0 at lo and at hi, for the model
  f_hi: jax.Array
  f_eta: jax.Array      # L − L0 at the trial just made (``eta`` until the next is placed)
  e_prev: jax.Array     # the trial before it and its L − L0 (0: none)
  f_prev: jax.Array
  num_evals: jax.Array
  n_model: jax.Array    # model trials made
  by_model: jax.Array   # whether ``eta`` was placed by the model
  n_one_sided: jax.Array  # consecutive model trials that left the bracket one-sided
  done: jax.Array       # converged, or stopped by a status below
  status: jax.Array     # provisional: NONFINITE / NOT_DESCENT / UNRESOLVED when ``done``


def _paper_trial(s, growth):
  """Kalra et al.'s rule: grow by ``growth`` until a rise, shrink until a fall, then bisect."""
  return jnp.where(~jnp.isfinite(s.hi), s.eta * growth,
                   jnp.where(s.lo == 0, s.eta / growth, 0.5 * (s.lo + s.hi)))


def _bracket_ratio(lo, hi):
  """hi/lo of a bracket; ∞ while one end is unknown."""
  return jnp.where((lo > 0) & jnp.isfinite(hi), hi / jnp.where(lo > 0, lo, 1.0), jnp.inf)


def _search_step(s: _Search, f, *, slope, resolution, tol, growth, interpolate,
                 convex) -> _Search:
  """One trial's bookkeeping: move a bracket end to ``s.eta``, then place the next trial.

  ``f = L(θ − ηΔθ) − L0`` at η = ``s.eta``. A rise (f > 0, +inf included) moves the upper
  end; otherwise the lower end, except while no lower end is known, when a fall must be strict
  (f < 0, the paper's shrink phase: a trial whose step rounds away leaves the loss unchanged)
  unless the model placed the trial.
  """
  eta, old_lo, old_hi = s.eta, s.lo, s.hi
  rise = f > 0
  # (A model trial sits at the model's root, far from steps that round away: a tie there is
  # a tie, not a step lost to rounding.)
  fall = jnp.where(s.lo > 0, ~rise, (f < 0) | ((f == 0) & s.by_model)) | (
      ~rise & ~jnp.isfinite(s.hi))
  lo = jnp.where(fall, eta, s.lo)
  f_lo = jnp.where(fall, f, s.f_lo)
  hi = jnp.where(rise, eta, s.hi)
  f_hi = jnp.where(rise, f, s.f_hi)
  n = s.num_evals + 1
  bad = jnp.isnan(f)
  s = s._replace(lo=lo, hi=hi, f_lo=f_lo, f_hi=f_hi)
  converged = (lo > 0) & jnp.isfinite(hi) & (
      1.0 - _certified_lower(s, slope, resolution, convex) / hi <= tol)
  # No lower end yet and the first-order fall at this step is already below the loss's
  # resolution over the tolerance window: every smaller step is as unresolved.
  floor = (lo == 0) & (slope * eta * tol < 2.0 * resolution)
  done = bad | converged | floor
  status = jnp.where(bad, STATUS_NONFINITE, jnp.where(converged, STATUS_OK, STATUS_UNRESOLVED))
  s = s._replace(f_eta=f, num_evals=n, done=done, status=status.astype(jnp.int32))
  nxt = _paper_trial(s, growth)
  if interpolate:
    model, use, edge = _model_trial(slope, s, tol, convex)
    # Safeguards for a line far from quadratic, where the model errs the same way trial after
    # trial: unless the model now asks for an edge trial (which may close the bracket),
    # ``_ONE_SIDED_LIMIT`` model trials in a row that left the bracket one-sided are followed
    # by the paper's step (x growth or / growth), and a model trial that did not halve the
    # bracket's log-width by a geometric bisection, before the model is trusted again.
    before = jnp.log(_bracket_ratio(old_lo, old_hi))
    after = jnp.log(_bracket_ratio(lo, hi))
    stalled = jnp.isfinite(after) & (after > 0.5 * before) & s.by_model
    one_sided = ~jnp.isfinite(after) & s.by_model
    n_one_sided = jnp.where(one_sided, s.n_one_sided + 1, 0)
    one_sided_again = n_one_sided >= _ONE_SIDED_LIMIT
    use = use & (edge | (~stalled & ~one_sided_again))
    nxt = jnp.where(use, model, jnp.where(stalled & ~edge, jnp.sqrt(lo * hi), nxt))
    s = s._replace(n_model=s.n_model + use.astype(jnp.int32), by_model=use,
                   n_one_sided=n_one_sided.astype(jnp.int32))
  return s._replace(eta=nxt, e_prev=eta, f_prev=f)


def _run_search(trial_loss, l0, slope, resolution, *, eta0, n0, tol, growth, max_evals,
                interpolate, convex) -> _Search:
  """The ``lax.while_loop`` over trials; stops on convergence, a status, or ``max_evals``."""
  dtype = l0.dtype
  nonfinite = ~jnp.isfinite(l0) | jnp.isnan(slope)
  not_descent = ~nonfinite & (slope <= 0)
  init = _Search(
      eta=eta0, lo=jnp.zeros((), dtype), hi=jnp.asarray(jnp.inf, dtype),
      f_lo=jnp.zeros((), dtype), f_hi=jnp.zeros((), dtype), f_eta=jnp.zeros((), dtype),
      e_prev=jnp.zeros((), dtype), f_prev=jnp.zeros((), dtype), num_evals=jnp.int32(n0),
      n_model=jnp.int32(0), by_model=jnp.bool_(False), n_one_sided=jnp.int32(0), done=nonfinite | not_descent,
      status=jnp.where(nonfinite, STATUS_NONFINITE, STATUS_NOT_DESCENT).astype(jnp.int32))

  def body(s):
    f = trial_loss(s.eta) - l0
    return _search_step(s, f, slope=slope, resolution=resolution, tol=tol, growth=growth,
                        interpolate=interpolate, convex=convex)

  return jax.lax.while_loop(lambda s: ~s.done & (s.num_evals < max_evals), body, init)


def _result(s: _Search, l0, slope, tol, resolution, convex) -> CriticalSharpness:
  """Status, η_c and λ_c from the final search state (see the ``STATUS_*`` codes)."""
  dtype = l0.dtype
  bracketed = (s.lo > 0) & jnp.isfinite(s.hi)
  lower = _certified_lower(s, slope, resolution, convex)
  eta_c = 0.5 * (lower + s.hi)
  # A bracket that met the stopping rule (or the cap) but whose tolerance window changes the
  # loss by less than its rounding was placed by rounding, not by the loss.
  unresolved = bracketed & (slope * eta_c * tol < 2.0 * resolution)
  status = jnp.select(
      [s.done & (s.status != STATUS_OK), unresolved, s.done, bracketed, s.lo > 0],
      [s.status, STATUS_UNRESOLVED, STATUS_OK, STATUS_MAX_EVALS, STATUS_NO_RISE],
      STATUS_MAX_EVALS).astype(jnp.int32)
  nan, inf, zero = (jnp.asarray(v, dtype) for v in (jnp.nan, jnp.inf, 0.0))
  measured = (status == STATUS_OK) | ((status == STATUS_MAX_EVALS) & bracketed)
  no_curvature = (status == STATUS_NO_RISE) | (status == STATUS_NOT_DESCENT)
  eta_c = jnp.where(measured, eta_c, jnp.where(no_curvature, inf, nan))
  sharpness = jnp.where(measured, 2.0 / eta_c, jnp.where(no_curvature, zero, nan))
  return CriticalSharpness(sharpness=sharpness, step_size=eta_c, lower=lower, upper=s.hi,
                           num_evals=s.num_evals, loss0=l0, slope=slope, status=status)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def critical_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    direction: PyTree,
    *,
    grad: PyTree | None = None,
    loss0: jax.Array | float | None = None,
    step_guess: jax.Array | float = 1.0,
    tol_power: int = 4,
    max_evals: int = 40,
    growth: jax.Array | float = 2.0,
    method: str = "interpolate",
    bracket: str = "trials",
) -> CriticalSharpness:
  r"""Critical sharpness along an update direction, from forward passes only.

  .. math::
     \eta_c = \min\{\eta > 0 : L(\theta - \eta\,\Delta\theta) > L(\theta)\}, \qquad
     \lambda_c = 2/\eta_c .

  (Kalra et al. 2026, arXiv 2601.16979.) The search brackets :math:`\eta_c` between a step at
  which the loss did not rise (``lower``) and one at which it did (``upper``) until
  :math:`1 - \text{lower}/\text{upper} \le 2^{-k}`, and reports the midpoint :math:`m`, so
  :math:`|\lambda_c/\lambda_c^* - 1| = |\eta_c^* - m|/m \le (\text{upper}-\text{lower})/
  (\text{upper}+\text{lower}) \le 2^{-k}/(2 - 2^{-k})` (1/31 = 3.2 % at the default
  ``k = 4``). On a quadratic, :math:`\lambda_c = \Delta\theta^\top A\Delta\theta /
  \Delta\theta^\top g` (the directional sharpness) within that tolerance; the step
  :math:`\theta-\eta_t\Delta\theta` raises the loss on this batch exactly when
  :math:`\lambda_c > 2/\eta_t`.

  The slope :math:`\Delta\theta^\top\nabla L(\theta)` is known before any trial: from ``grad``
  (free), else from one ``jax.jvp`` of ``loss_fn`` along Δθ (one forward-mode pass, about two
  to three forward passes of time, which also yields :math:`L_0`; a loss with a
  ``jax.custom_vjp`` has no jvp and needs ``grad``). A slope ≤ 0 stops the search before any
  trial with ``STATUS_NOT_DESCENT`` (every small step raises the loss); a step whose first-order
  change is below the loss's rounding ends it with ``STATUS_UNRESOLVED`` (see the codes).

  ``method="interpolate"`` (default) places each trial from a model of
  :math:`f(\eta) = L(\theta-\eta\Delta\theta) - L_0` (see ``_model_trial``): its root, or
  the edge of the window that meets the stopping rule next to a known end, which closes the
  bracket in one more trial; a warm search takes about three evaluations, with the paper's
  rule as the fallback, so the guarantee is the same. ``method="bisect"`` is the paper's
  search (Alg. 1, with ``growth=2``): multiply the step by ``growth`` while the loss does not
  rise, divide while it does not fall, then bisect.

  The loop is a ``lax.while_loop``: it jits with no host round trip and ends within
  ``max_evals`` evaluations. Losses are compared in float32 or wider. Nothing raises inside jit:
  a NaN :math:`L_0`, slope or trial loss gives ``STATUS_NONFINITE``; a trial loss of ``+inf``
  counts as a rise.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, the loss at a fixed batch.
    params: :math:`\theta`.
    direction: :math:`\Delta\theta`, a descent direction at unit learning rate (the step is
      ``params - eta * direction``); same pytree structure as ``params``.
    grad: :math:`\nabla L(\theta)` of this ``loss_fn`` (e.g. from the train step), shaped like
      ``params``: saves the jvp. Its sign decides ``STATUS_NOT_DESCENT``.
    loss0: :math:`L(\theta)` when already known (e.g. from the train step).
    step_guess: :math:`\eta_0`, the first trial, e.g. the previous step's :math:`\eta_c`.
    tol_power: ``k`` in the stopping rule :math:`1-\text{lower}/\text{upper}\le 2^{-k}`.
    max_evals: cap on loss evaluations, including the reference pass when it is made here.
    growth: factor of the paper's exponential phase; may be a traced scalar > 1.
    method: ``"interpolate"`` or ``"bisect"``, see above.
    bracket: ``"trials"`` (default): both ends are tried steps, the loss not above
      :math:`L_0` at ``lower`` and above it at ``upper`` (the paper's guarantee).
      ``"convex"``: ``lower`` may be the root of the chord between the trials around
      :math:`\eta_c`, a lower bound on the crossing where the loss is convex between them
      (used only when the samples and the slope are consistent with convexity); trials aim
      just above the model's root, so one rise there often closes the bracket.

  Returns:
    A :class:`CriticalSharpness`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p: 0.5 * 4.0 * jnp.sum(p ** 2)          # Hessian 4 I
    >>> theta = jnp.ones(3)
    >>> g = jax.grad(loss)(theta)
    >>> out = critical_sharpness(loss, theta, g, grad=g)
    >>> bool(abs(out.sharpness - 4.0) / 4.0 < 0.0334), STATUS_NAMES[int(out.status)]
    (True, 'ok')
    >>> STATUS_NAMES[int(critical_sharpness(loss, theta, -g, grad=g).status)]
    'not_descent'
  """
  check_search_args(step_guess, tol_power, max_evals, growth, method, bracket)
  _hvp.check_loss_fn(loss_fn, params)
  _tree.check_same_structure(params, direction, "params", "direction")
  dtype = _tree.accum_dtype(params)
  tol = 2.0 ** (-tol_power)
  l0, slope, n0 = _reference(loss_fn, params, direction, loss0, grad, dtype)
  resolution = _resolution(loss_fn, params, l0)

  def trial_loss(eta):
    moved = jax.tree.map(lambda p, d: (p - eta.astype(p.dtype) * d).astype(p.dtype),
                         params, direction)
    return jnp.asarray(loss_fn(moved)).astype(dtype)

  final = _run_search(trial_loss, l0, slope, resolution, eta0=jnp.asarray(step_guess, dtype),
                      n0=n0, tol=tol, growth=jnp.asarray(growth, dtype), max_evals=max_evals,
                      interpolate=method == "interpolate", convex=bracket == "convex")
  return _result(final, l0, slope, tol, resolution, bracket == "convex")


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
  arguments, status codes and non-finite handling are those of :func:`critical_sharpness`;
  ``grad``, if given, is :math:`\nabla L_1(\theta)`, the gradient of the *monitored* loss.
  ``STATUS_NOT_DESCENT`` is common here: when :math:`\Delta\theta_2^\top\nabla L_1 \le 0` task
  2's update raises :math:`L_1` at every small step (the tasks conflict), reported as
  sharpness 0 with that flag; ``STATUS_UNRESOLVED`` when the two gradients are so nearly
  orthogonal that the change in :math:`L_1` is below its rounding.
  """
  return critical_sharpness(loss_fn, params, direction, **kwargs)


def relative_sharpness_matrix(
    loss_fns: Sequence[LossFn],
    params: PyTree,
    directions: Sequence[PyTree],
    *,
    grads: Sequence[PyTree] | None = None,
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
    grads: optional N gradients :math:`\nabla L_i(\theta)`; without them every entry takes
      its slope (and :math:`L_i`) from one jvp.
    loss0s: optional N known losses :math:`L_i(\theta)`.
    step_guesses: warm starts, a scalar or an ``[N, M]`` array (e.g. the previous matrix's
      ``step_size``; non-finite entries fall back to 1).
    **kwargs: ``tol_power``, ``max_evals``, ``growth``, ``method`` as in
      :func:`critical_sharpness`.

  Returns:
    A :class:`CriticalSharpness` whose fields are ``[N, M]`` arrays.
  """
  loss_fns = list(loss_fns)
  directions = list(directions)
  if not loss_fns or not directions:
    raise ValueError("`loss_fns` and `directions` must be non-empty sequences")
  for name, seq in (("loss0s", loss0s), ("grads", grads)):
    if seq is not None and len(seq) != len(loss_fns):
      raise ValueError(f"`{name}` has {len(seq)} entries for {len(loss_fns)} `loss_fns`")
  guesses = jnp.broadcast_to(jnp.asarray(step_guesses), (len(loss_fns), len(directions)))
  guesses = jnp.where(jnp.isfinite(guesses) & (guesses > 0), guesses, 1.0)
  rows = []
  for i, fn in enumerate(loss_fns):
    row = []
    for j, d in enumerate(directions):
      row.append(critical_sharpness(
          fn, params, d, loss0=None if loss0s is None else loss0s[i],
          grad=None if grads is None else grads[i], step_guess=guesses[i, j], **kwargs))
    rows.append(jax.tree.map(lambda *xs: jnp.stack(xs), *row))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


class SharpnessBand(NamedTuple):
  """λ_c of each (monitored loss, direction) pair summarised across held-out batches.

  Per batch, the value summarised is the sharpness that bounds the usable step: 2/η_c where
  the search bracketed η_c (``STATUS_OK``, or ``STATUS_MAX_EVALS`` with a bracket); ``+inf``
  for ``STATUS_NOT_DESCENT`` (the step raises the monitored loss at every size: η_c = 0);
  0 for ``STATUS_NO_RISE`` (it never does: η_c = ∞). Unresolved and non-finite searches are
  left out (NaN), and counted.

  Attributes:
    median: median over the batches counted (the mean of the two middle values for an even
      count; ``+inf`` when more than half of them are ``not_descent``); NaN when none is.
    min, max: the band's ends over the batches counted.
    num_counted: batches whose value is counted (int32).
    num_not_descent: batches with ``STATUS_NOT_DESCENT`` (int32).
  """

  median: jax.Array
  min: jax.Array
  max: jax.Array
  num_counted: jax.Array
  num_not_descent: jax.Array


def sharpness_band(result: CriticalSharpness, axis: int = 0) -> SharpnessBand:
  """:class:`SharpnessBand` of a batched :class:`CriticalSharpness` over its ``axis``.

  Args:
    result: a :class:`CriticalSharpness` whose fields have a batch axis ``axis`` (e.g. from
      ``jax.lax.map`` of :func:`relative_sharpness_matrix` over held-out batches).
    axis: the batch axis.

  Returns:
    A :class:`SharpnessBand` with the other axes' shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p, a: 0.5 * a * jnp.sum(p ** 2) + (1 - a) * jnp.sum(p)
    >>> theta = jnp.ones(2)                              # gradient 1, curvature a: λ_c = a
    >>> per = jax.lax.map(lambda a: critical_sharpness(lambda p: loss(p, a), theta, theta,
    ...                                                tol_power=10), jnp.array([1., 2., 4.]))
    >>> band = sharpness_band(per)
    >>> [round(float(x), 2) for x in (band.median, band.min, band.max)]
    [2.0, 1.0, 4.0]
  """
  s = result.status
  measured = (s == STATUS_OK) | ((s == STATUS_MAX_EVALS) & jnp.isfinite(result.sharpness))
  value = jnp.where(measured, result.sharpness, jnp.nan)
  value = jnp.where(s == STATUS_NOT_DESCENT, jnp.inf, jnp.where(s == STATUS_NO_RISE, 0.0, value))
  v = jnp.sort(jnp.moveaxis(value, axis, 0), axis=0)  # NaN sorts last
  n = jnp.sum(~jnp.isnan(v), axis=0)
  at = lambda i: jnp.take_along_axis(v, jnp.maximum(i, 0)[None], axis=0)[0]
  # Every counted value is ≥ 0 or +inf, so the midpoint never meets inf − inf.
  median = 0.5 * (at((n - 1) // 2) + at(n // 2))
  nan = jnp.asarray(jnp.nan, v.dtype)
  return SharpnessBand(
      median=jnp.where(n > 0, median, nan), min=jnp.where(n > 0, v[0], nan),
      max=jnp.where(n > 0, at(n - 1), nan), num_counted=n.astype(jnp.int32),
      num_not_descent=jnp.sum(s == STATUS_NOT_DESCENT, axis=axis).astype(jnp.int32))


def relative_sharpness_band(
    loss_fns: Sequence[Callable[[PyTree, PyTree], jax.Array]],
    params: PyTree,
    directions: Sequence[PyTree],
    batches: Sequence[PyTree],
    *,
    step_guesses: jax.Array | float = 1.0,
    **kwargs,
) -> tuple[CriticalSharpness, SharpnessBand]:
  r""":math:`\lambda_c^{i\to j}` on each of K held-out batches of task :math:`i`, and its band.

  For batch :math:`k`, entry ``[k, i, j]`` is :func:`relative_critical_sharpness` of
  :math:`L_{i,k}(\theta)` = ``loss_fns[i](params, batch)`` on batch :math:`k` of
  ``batches[i]`` along ``directions[j]``:

  .. math::
     \eta_c^{i\to j}(k) = \min\{\eta : L_{i,k}(\theta - \eta\,\Delta\theta_j)
     > L_{i,k}(\theta)\},\qquad \lambda_c^{i\to j}(k) = 2/\eta_c^{i\to j}(k),

  and the band summarises entry ``[i, j]`` across the K batches (:func:`sharpness_band`).
  Kalra et al. 2026 (arXiv 2601.16979, Fig. 5) measure each evaluation task's loss along the
  update of a training mix this way, with a band across batches. Measuring on held-out batches
  that played no part in :math:`\Delta\theta_j` keeps the diagonal and the off-diagonal
  entries alike: an update measured on the batch that produced it looks flatter there.

  Each batch's :math:`L_{i,k}` and :math:`\nabla L_{i,k}` come from one ``value_and_grad``
  and serve all M directions (``grads=`` and ``loss0s=`` of
  :func:`relative_sharpness_matrix`, so no jvp); the batches are scanned, each search
  warm-started from the previous batch's :math:`\eta_c`.

  Args:
    loss_fns: N callables ``loss_fn(params, batch) -> scalar``.
    params: :math:`\theta`.
    directions: M unit-LR update directions, each shaped like ``params``.
    batches: N pytrees, ``batches[i]`` holding task i's K batches stacked on a leading axis
      (the same K for every task).
    step_guesses: first trial step, a scalar or an ``[N, M]`` array.
    **kwargs: ``tol_power``, ``max_evals``, ``growth``, ``method`` as in
      :func:`critical_sharpness`.

  Returns:
    ``(per_batch, band)``: a :class:`CriticalSharpness` with ``[K, N, M]`` fields and a
    :class:`SharpnessBand` with ``[N, M]`` fields.
  """
  loss_fns, directions, batches = list(loss_fns), list(directions), list(batches)
  if len(batches) != len(loss_fns):
    raise ValueError(f"`batches` has {len(batches)} entries for {len(loss_fns)} `loss_fns`")
  counts = {int(jax.tree.leaves(b)[0].shape[0]) for b in batches}
  if len(counts) != 1:
    raise ValueError(f"every task needs the same number of batches, got {sorted(counts)}")
  guesses = jnp.broadcast_to(jnp.asarray(step_guesses, jnp.float32),
                             (len(loss_fns), len(directions)))

  def one(guess, batch_k):
    fns = [lambda p, f=f, b=b: f(p, b) for f, b in zip(loss_fns, batch_k)]
    l0g = [jax.value_and_grad(f)(params) for f in fns]
    out = relative_sharpness_matrix(fns, params, directions, grads=[g for _, g in l0g],
                                    loss0s=[l for l, _ in l0g], step_guesses=guess, **kwargs)
    ok = jnp.isfinite(out.step_size) & (out.step_size > 0)
    return jnp.where(ok, out.step_size, guess).astype(guess.dtype), out

  _, per_batch = jax.lax.scan(one, guesses, batches)
  return per_batch, sharpness_band(per_batch, axis=0)
