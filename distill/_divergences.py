"""Token-level distillation divergences on logits, with temperature, padding masks and weights.

Every loss compares a student distribution :math:`S = \\mathrm{softmax}(z_s/T)` and a teacher
distribution :math:`P = \\mathrm{softmax}(z_t/T)` at each position of ``[..., V]`` logits and
reduces over positions (see *Reductions*). Conventions:

* forward KL :math:`\\mathrm{KL}(P\\|S)` (Hinton et al. 2015), reverse KL :math:`\\mathrm{KL}(S\\|P)`;
* generalised JSD(β) in the TRL / Liger convention, β = 0 and β = 1 special-cased;
* skew KL and skew reverse KL (Ko et al. 2024, DistiLLM, arXiv 2402.03898);
* soft-target KL with an explicit :math:`T^2` factor and Hinton's mix with hard labels.

Precision: logits are upcast to float32 (or kept wider: float64 stays float64) before any
arithmetic, whatever the input dtype; mixtures are formed in probability space with a
log-sum-exp; every per-position divergence is clamped at 0, so rounding cannot make it
negative (the bf16 JSD pitfall of other libraries).

Reductions (``reduction=``), with :math:`d_i` the per-position divergence, :math:`m_i \\in
\\{0,1\\}` the padding mask and :math:`w_i` the per-position weights (default 1):

* ``"mean"`` (default): weighted mean over unmasked positions,
  :math:`\\sum_i w_i m_i d_i / \\sum_i w_i m_i`; 0 when the denominator is 0 (all padding);
* ``"token_mean"``: :math:`\\sum_i w_i m_i d_i / \\sum_i m_i` (weights change the scale);
* ``"sum"``: :math:`\\sum_i w_i m_i d_i`;
* ``"none"``: the ``[...]`` array :math:`w_i m_i d_i` (0 at masked positions).

Masks: a masked position contributes nothing to the value or to any gradient, even when its
logits or labels are NaN or out of range (they are replaced by zeros before any arithmetic).
NaN at an unmasked position propagates to the loss (it is never silently skipped; a weight of
0 does not sanitise it, a mask does). Logits of ``-inf`` (a vocabulary entry excluded in both
models) give 0 for that entry.

Validation happens at the boundary, outside jit-traced values: shapes always; temperature,
β and α when they are Python numbers (traced values are accepted unchecked).
"""

from __future__ import annotations

import math
import numbers
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "token_mean", "sum", "none")
TOKEN_LOSSES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
                "soft_target_kl", "hinton")
"""Names accepted by :func:`token_loss` and by :func:`distill.chunked_token_loss`."""


# ----------------------------------------------------------------------------- validation


def _is_static(x) -> bool:
  """True for Python and NumPy scalars (checked and branched on at trace time)."""
  if isinstance(x, numbers.Number):
    return True
  return isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0


def _check_temperature(temperature) -> None:
  if _is_static(temperature):
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
      raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")


def _check_unit(name: str, value) -> None:
  if _is_static(value):
    v = float(value)
    if not 0.0 <= v <= 1.0:
      raise ValueError(f"`{name}` must be in [0, 1], got {value!r}")


def _check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")


def _check_positions(name: str, x, positions_shape: tuple) -> None:
  if x is not None and tuple(jnp.shape(x)) != tuple(positions_shape):
    raise ValueError(f"`{name}` must have shape {tuple(positions_shape)} (the logits' shape "
                     f"without the vocabulary axis), got {tuple(jnp.shape(x))}")


def check_token_args(student_logits, teacher_logits, *, mask=None, weights=None, labels=None,
                     temperature=1.0, reduction="mean") -> None:
  """Validates the arguments shared by every token loss; raises ``ValueError`` naming one."""
  s_shape, t_shape = tuple(jnp.shape(student_logits)), tuple(jnp.shape(teacher_logits))
  if len(s_shape) < 1:
    raise ValueError(f"`student_logits` must have a vocabulary axis, got shape {s_shape}")
  if s_shape != t_shape:
    raise ValueError(f"`teacher_logits` shape {t_shape} must equal `student_logits` shape "
                     f"{s_shape}")
  positions = s_shape[:-1]
  _check_positions("mask", mask, positions)
  _check_positions("weights", weights, positions)
  _check_positions("labels", labels, positions)
  if labels is not None and not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"`labels` must be integer token ids, got dtype {jnp.result_type(labels)}")
  if weights is not None and not jnp.issubdtype(jnp.result_type(weights), jnp.floating):
    raise ValueError(f"`weights` must be floating point, got dtype {jnp.result_type(weights)}")
  _check_temperature(temperature)
  _check_reduction(reduction)


# ----------------------------------------------------------------------------- numerics


def compute_dtype(*arrays) -> jnp.dtype:
  """float32, or the inputs' floating dtype when it is wider (float64 under x64)."""
  dt = jnp.result_type(*[a for a in arrays if a is not None])
  if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits > 32:
    return dt
  return jnp.dtype(jnp.float32)


def _log_softmax(logits, temperature, dtype):
  return jax.nn.log_softmax(logits.astype(dtype) / jnp.asarray(temperature, dtype), axis=-1)


def _kl(logp, logq):
  """Σ_v p_v (log p_v − log q_v) over the last axis, 0 for entries with p_v = 0, clamped ≥ 0."""
  p = jnp.exp(logp)
  # The `where` keeps -inf - -inf (an entry excluded in both) out of the value and gradient.
  diff = jnp.where(p > 0, logp - logq, 0.0)
  return jnp.maximum(jnp.sum(p * diff, axis=-1), 0.0)


def _log_mix(a, logp, logq):
  """log(a·p + (1−a)·q), formed in probability space by log-sum-exp; a a scalar in (0, 1)."""
  x, y = jnp.log(a) + logp, jnp.log1p(-a) + logq
  # An entry excluded in both (-inf, -inf) would give a NaN gradient through logaddexp.
  both = jnp.isneginf(x) & jnp.isneginf(y)
  zero = jnp.zeros((), x.dtype)
  out = jnp.logaddexp(jnp.where(both, zero, x), jnp.where(both, zero, y))
  return jnp.where(both, jnp.asarray(-jnp.inf, x.dtype), out)


def _by_static_or_switch(param, lo_fn, mid_fn, hi_fn):
  """Exact special cases at param = 0 and 1: static branching for Python numbers, else lax.switch."""
  if _is_static(param):
    p = float(param)
    return lo_fn() if p == 0.0 else hi_fn() if p == 1.0 else mid_fn(p)
  param = jnp.asarray(param)
  index = jnp.where(param == 0, 0, jnp.where(param == 1, 2, 1))
  return jax.lax.switch(index, [lambda: lo_fn(), lambda: mid_fn(param), lambda: hi_fn()])


def _jsd(logp_t, logp_s, beta):
  def mid(b):
    b = jnp.asarray(b, logp_t.dtype)
    log_m = _log_mix(b, logp_t, logp_s)            # M = βP + (1−β)S
    return b * _kl(logp_t, log_m) + (1 - b) * _kl(logp_s, log_m)
  return _by_static_or_switch(beta, lambda: _kl(logp_t, logp_s), mid,
                              lambda: _kl(logp_s, logp_t))


def _skew(logp_a, logp_b, alpha):
  """KL(A ‖ αA + (1−α)B), exact at α = 0 (KL(A‖B)) and α = 1 (0)."""
  def mid(a):
    a = jnp.asarray(a, logp_a.dtype)
    return _kl(logp_a, _log_mix(a, logp_a, logp_b))
  return _by_static_or_switch(alpha, lambda: _kl(logp_a, logp_b), mid,
                              lambda: jnp.zeros(logp_a.shape[:-1], logp_a.dtype))


def pointwise_loss(loss: str, student_logits, teacher_logits, labels=None, *,
                   temperature=1.0, beta=0.5, alpha=None) -> jax.Array:
  """Per-position value of the token loss ``loss`` (one of :data:`TOKEN_LOSSES`), ``[...]``.

  No masking, weighting or reduction; arguments are assumed validated. ``alpha`` defaults to
  0.1 for the skew losses and 0.5 for ``"hinton"``. Used by the public losses and by the
  chunked form, so that both compute exactly the same per-position function.
  """
  dtype = compute_dtype(student_logits, teacher_logits)
  logp_s = _log_softmax(student_logits, temperature, dtype)
  logp_t = _log_softmax(teacher_logits, temperature, dtype)
  t2 = jnp.square(jnp.asarray(temperature, dtype))
  if loss == "forward_kl":
    return _kl(logp_t, logp_s)
  if loss == "reverse_kl":
    return _kl(logp_s, logp_t)
  if loss == "generalized_jsd":
    return _jsd(logp_t, logp_s, beta)
  if loss == "skew_kl":
    return _skew(logp_t, logp_s, 0.1 if alpha is None else alpha)
  if loss == "skew_reverse_kl":
    return _skew(logp_s, logp_t, 0.1 if alpha is None else alpha)
  if loss == "soft_target_kl":
    return t2 * _kl(logp_t, logp_s)
  if loss == "hinton":
    a = jnp.asarray(0.5 if alpha is None else alpha, dtype)
    # Hard-label cross-entropy at temperature 1, whatever T.
    logp_s1 = jax.nn.log_softmax(student_logits.astype(dtype), axis=-1)
    ce = -jnp.take_along_axis(logp_s1, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return a * ce + (1 - a) * t2 * _kl(logp_t, logp_s)
  raise ValueError(f"`loss` must be one of {TOKEN_LOSSES}, got {loss!r}")


def sanitize(mask, *arrays):
  """Replaces each array's entries at masked positions (``mask`` False) by zeros."""
  if mask is None:
    return arrays
  m = jnp.asarray(mask).astype(bool)
  return tuple(None if a is None else
               jnp.where(m.reshape(m.shape + (1,) * (a.ndim - m.ndim)), a, jnp.zeros((), a.dtype))
               for a in arrays)


def effective_weights(mask, weights, positions_shape, dtype) -> jax.Array:
  """:math:`w_i m_i` as a ``dtype`` array of ``positions_shape`` (ones where not given)."""
  w = jnp.ones(positions_shape, dtype) if weights is None else jnp.asarray(weights).astype(dtype)
  if mask is not None:
    w = jnp.where(jnp.asarray(mask).astype(bool), w, jnp.zeros((), dtype))
  return w


def reduce_positions(values, mask, weights, reduction: str) -> jax.Array:
  """Applies a reduction of :data:`REDUCTIONS` to per-position ``values`` (see the module doc)."""
  w = effective_weights(mask, weights, values.shape, values.dtype)
  weighted = w * values
  if mask is not None:
    # where, not only w = 0: a masked position must not bring a NaN into the sum.
    weighted = jnp.where(jnp.asarray(mask).astype(bool), weighted, jnp.zeros((), values.dtype))
  if reduction == "none":
    return weighted
  total = jnp.sum(weighted)
  if reduction == "sum":
    return total
  if reduction == "mean":
    den = jnp.sum(w)
  else:
    den = (jnp.asarray(values.size, values.dtype) if mask is None
           else jnp.sum(jnp.asarray(mask).astype(values.dtype)))
  return safe_divide(total, den)


def safe_divide(num, den):
  """num / den, and 0 where den is 0 (an all-padding batch gives a zero loss, not NaN)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.zeros((), num.dtype))


def _token_loss(loss, student_logits, teacher_logits, labels=None, *, temperature, mask,
                weights, reduction, beta=0.5, alpha=None):
  check_token_args(student_logits, teacher_logits, mask=mask, weights=weights, labels=labels,
                   temperature=temperature, reduction=reduction)
  student_logits, teacher_logits, labels = sanitize(mask, student_logits, teacher_logits, labels)
  values = pointwise_loss(loss, student_logits, teacher_logits, labels, temperature=temperature,
                          beta=beta, alpha=alpha)
  return reduce_positions(values, mask, weights, reduction)


# ----------------------------------------------------------------------------- public losses

_ARGS_DOC = """
    student_logits: ``[..., V]`` student logits :math:`z_s` (any float dtype; computed in
      float32 or wider).
    teacher_logits: ``[..., V]`` teacher logits :math:`z_t`, same shape.
    temperature: :math:`T > 0`, applied to both models' logits.
    mask: optional ``[...]`` padding mask (True / 1 = counts); masked positions contribute
      nothing, even when their logits are NaN.
    weights: optional ``[...]`` float per-position importance weights :math:`w_i` (e.g. from
      :func:`distill.importance_weights`).
    reduction: ``"mean"`` (weighted mean over unmasked positions), ``"token_mean"``,
      ``"sum"`` or ``"none"``; see the module docstring.
"""

_RETURNS_DOC = """
  Returns:
    A float32 (or wider) scalar, or the ``[...]`` per-position array for ``"none"``.

  NaN: NaN logits at an unmasked position give a NaN loss; at a masked position, nothing.
"""


def _doc(f):
  doc = f.__doc__.replace("    {args}\n", _ARGS_DOC.strip("\n") + "\n")
  f.__doc__ = doc.rstrip() + "\n" + _RETURNS_DOC.rstrip() + "\n  "
  return f


@_doc
def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, weights=None,
               reduction="mean") -> jax.Array:
  r"""Forward KL from the teacher, :math:`\mathrm{KL}(P\|S)`, per position, then reduced.

  .. math:: d_i = \sum_v P_{iv} (\log P_{iv} - \log S_{iv}),\quad
     P = \mathrm{softmax}(z_t/T),\ S = \mathrm{softmax}(z_s/T).

  Mean-seeking (the student covers every teacher mode); no :math:`T^2` factor — see
  :func:`soft_target_kl`. Reference: Hinton, Vinyals & Dean 2015, arXiv 1503.02531.

  Args:
    {args}

  Example:
    >>> import math, jax.numpy as jnp
    >>> teacher = jnp.array([[0.0, 0.0]])                     # P = (1/2, 1/2)
    >>> student = jnp.array([[0.0, math.log(3.0)]])           # S = (1/4, 3/4)
    >>> round(float(forward_kl(student, teacher)), 4)         # ½ log 2 + ½ log(2/3) = ½ log(4/3)
    0.1438
  """
  return _token_loss("forward_kl", student_logits, teacher_logits, temperature=temperature,
                     mask=mask, weights=weights, reduction=reduction)


@_doc
def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, weights=None,
               reduction="mean") -> jax.Array:
  r"""Reverse KL, :math:`\mathrm{KL}(S\|P)`, per position, then reduced.

  .. math:: d_i = \sum_v S_{iv} (\log S_{iv} - \log P_{iv}).

  Mode-seeking. Reference: Gu et al. 2024, MiniLLM, arXiv 2306.08543.

  Args:
    {args}
  """
  return _token_loss("reverse_kl", student_logits, teacher_logits, temperature=temperature,
                     mask=mask, weights=weights, reduction=reduction)


@_doc
def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None,
                    weights=None, reduction="mean") -> jax.Array:
  r"""Generalised Jensen–Shannon divergence JSD(β) (the TRL / Liger convention).

  .. math:: d_i = \beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(S\|M),\qquad
     M = \beta P + (1-\beta) S,

  with :math:`\log M` formed in probability space, ``logaddexp(log β + log P,
  log(1−β) + log S)``. At β = 0.5 it is the symmetric JSD (bounded by log 2).

  Special cases: the formula tends to 0 at both ends (M tends to S, resp. P), so by convention
  β = 0 is **defined** as the forward KL :math:`\mathrm{KL}(P\|S)` and β = 1 as the reverse KL
  :math:`\mathrm{KL}(S\|P)`, exactly. The ends are the continuous limits of
  :math:`\mathrm{JSD}_\beta/\beta` (β → 0) and :math:`\mathrm{JSD}_\beta/(1-\beta)` (β → 1), not
  of :math:`\mathrm{JSD}_\beta` itself: the loss jumps at the ends by design.
  References: Agarwal et al. 2024 (GKD), arXiv 2306.13649; TRL ``generalized_jsd_loss``;
  Liger-Kernel ``LigerFusedLinearJSDLoss``.

  Args:
    {args}
    beta: β in [0, 1]; a Python number is checked and special-cased statically, a traced
      scalar is special-cased with ``lax.switch``.
  """
  _check_unit("beta", beta)
  return _token_loss("generalized_jsd", student_logits, teacher_logits, beta=beta,
                     temperature=temperature, mask=mask, weights=weights, reduction=reduction)


@_doc
def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None,
            weights=None, reduction="mean") -> jax.Array:
  r"""Skew KL (DistiLLM): :math:`\mathrm{SKL}_\alpha = \mathrm{KL}(P \,\|\, \alpha P + (1-\alpha)S)`.

  The mixture is formed in probability space (log-sum-exp). α = 0 is the forward KL exactly,
  α = 1 gives 0; the paper uses α = 0.1. Reference: Ko et al. 2024, DistiLLM, arXiv 2402.03898.

  Args:
    {args}
    alpha: skew α in [0, 1].
  """
  _check_unit("alpha", alpha)
  return _token_loss("skew_kl", student_logits, teacher_logits, alpha=alpha,
                     temperature=temperature, mask=mask, weights=weights, reduction=reduction)


@_doc
def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None,
                    weights=None, reduction="mean") -> jax.Array:
  r"""Skew reverse KL (DistiLLM): :math:`\mathrm{SRKL}_\alpha = \mathrm{KL}(S \,\|\, (1-\alpha)P + \alpha S)`.

  α = 0 is the reverse KL exactly, α = 1 gives 0. Reference: Ko et al. 2024, DistiLLM,
  arXiv 2402.03898.

  Args:
    {args}
    alpha: skew α in [0, 1].
  """
  _check_unit("alpha", alpha)
  return _token_loss("skew_reverse_kl", student_logits, teacher_logits, alpha=alpha,
                     temperature=temperature, mask=mask, weights=weights, reduction=reduction)


@_doc
def soft_target_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None,
                   weights=None, reduction="mean") -> jax.Array:
  r"""Soft-target loss :math:`T^2\,\mathrm{KL}(P_T\|S_T)` with the :math:`T^2` factor explicit.

  .. math:: d_i = T^2 \sum_v P_{iv}(\log P_{iv} - \log S_{iv}),\quad
     P_T = \mathrm{softmax}(z_t/T),\ S_T = \mathrm{softmax}(z_s/T).

  Why :math:`T^2`: :math:`\partial\,\mathrm{KL}/\partial z_s = (S_T - P_T)/T`, and for large T
  :math:`S_T - P_T \approx (z_s - z_t)/(TV)` (zero-mean logits), so the gradient of the bare
  KL shrinks as :math:`1/T^2`; multiplying by :math:`T^2` keeps the soft-target gradient on
  the scale of the hard-label one when T changes (Hinton et al. 2015, §2,
  arXiv 1503.02531). :func:`forward_kl` is the same divergence without the factor.

  Args:
    {args}
  """
  return _token_loss("soft_target_kl", student_logits, teacher_logits, temperature=temperature,
                     mask=mask, weights=weights, reduction=reduction)


@_doc
def hinton_loss(student_logits, teacher_logits, *, labels, alpha=0.5, temperature=1.0,
                mask=None, weights=None, reduction="mean") -> jax.Array:
  r"""Hinton's mix of hard-label cross-entropy and the soft-target loss.

  .. math:: d_i = \alpha\,\mathrm{CE}\big(y_i, \mathrm{softmax}(z_s)\big)
     + (1-\alpha)\,T^2\,\mathrm{KL}(P_T\|S_T),

  the cross-entropy at temperature 1 (the deployed student), the KL at temperature T with
  the explicit :math:`T^2` of :func:`soft_target_kl`. Weights and mask apply to the whole
  per-position sum. Reference: Hinton, Vinyals & Dean 2015, arXiv 1503.02531.

  Args:
    {args}
    labels: ``[...]`` integer hard labels :math:`y_i` in [0, V) (ignored at masked positions;
      an out-of-range label at an unmasked position gives an undefined CE term).
    alpha: weight α in [0, 1] of the cross-entropy.

  Example (student = teacher, so the KL term is 0; uniform over V = 4, so CE = log 4):
    >>> import jax.numpy as jnp
    >>> logits, labels = jnp.zeros((1, 2, 4)), jnp.array([[0, 3]])
    >>> loss = hinton_loss(logits, logits, labels=labels, alpha=0.5, temperature=2.0)
    >>> round(float(loss), 4)                                  # ½ log 4 = log 2
    0.6931
  """
  if labels is None:
    raise ValueError("`labels` is required by hinton_loss")
  _check_unit("alpha", alpha)
  return _token_loss("hinton", student_logits, teacher_logits, labels, alpha=alpha,
                     temperature=temperature, mask=mask, weights=weights, reduction=reduction)


def token_loss(loss: str, student_logits, teacher_logits, *, labels=None, temperature=1.0,
               beta=0.5, alpha=None, mask=None, weights=None, reduction="mean") -> jax.Array:
  """Dispatches by name to one of the losses above (``loss`` in :data:`TOKEN_LOSSES`).

  ``alpha=None`` takes the named loss's default (0.1 skew, 0.5 Hinton); ``beta`` is used by
  ``"generalized_jsd"`` only, ``labels`` by ``"hinton"`` only.
  """
  check_loss_name(loss, labels, beta, alpha)
  return _token_loss(loss, student_logits, teacher_logits, labels, temperature=temperature,
                     mask=mask, weights=weights, reduction=reduction, beta=beta, alpha=alpha)


def check_loss_name(loss, labels, beta, alpha) -> None:
  """Validates ``loss`` and its loss-specific arguments."""
  if loss not in TOKEN_LOSSES:
    raise ValueError(f"`loss` must be one of {TOKEN_LOSSES}, got {loss!r}")
  if loss == "hinton" and labels is None:
    raise ValueError("`labels` is required when `loss` is 'hinton'")
  if loss == "generalized_jsd":
    _check_unit("beta", beta)
  if alpha is not None:
    _check_unit("alpha", alpha)

