"""Preconditioned sharpness: the top eigenvalue of P^{-1/2} H P^{-1/2} for Adam's diagonal P."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _hvp
from curvature import _lanczos
from curvature import _tree

PyTree = Any


def find_adam_state(opt_state: PyTree) -> optax.ScaleByAdamState:
  """The one ``optax.ScaleByAdamState`` inside an arbitrary optax state.

  Walks the state pytree (``optax.chain`` tuples, ``inject_hyperparams``, ``MultiSteps``,
  ...) and returns the single ``ScaleByAdamState`` found, as produced by
  ``optax.adam``, ``optax.adamw`` or ``optax.scale_by_adam``.

  Args:
    opt_state: an optax optimizer state.

  Returns:
    The ``ScaleByAdamState(count, mu, nu)``.

  Raises:
    ValueError: when there is none, or more than one (the paths of all are listed).
  """
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  found = [(path, x) for path, x in
           jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_adam)[0] if is_adam(x)]
  if not found:
    raise ValueError(
        "`opt_state` contains no optax.ScaleByAdamState; build the optimizer with "
        "optax.adam / optax.adamw / optax.scale_by_adam, or pass the preconditioner "
        f"diagonal directly. Got a state of type {type(opt_state).__name__}.")
  if len(found) > 1:
    paths = ", ".join("opt_state" + jax.tree_util.keystr(p) for p, _ in found)
    raise ValueError(f"`opt_state` contains {len(found)} ScaleByAdamState entries ({paths}); "
                     "pick one and pass it as the preconditioner.")
  return found[0][1]


def adam_preconditioner(adam_state: optax.ScaleByAdamState, *, b1: float = 0.9,
                        b2: float = 0.999, eps: float = 1e-8) -> PyTree:
  r"""Adam's diagonal preconditioner :math:`P = (1-\beta_1^t)(\sqrt{\hat v_t} + \epsilon)`.

  With :math:`\hat v_t = \nu_t / (1 - \beta_2^t)` and :math:`t` = ``adam_state.count``,
  Adam's step is :math:`-\eta P^{-1} m_t`, so it is preconditioned gradient descent with
  heavy-ball momentum on :math:`P`, and it is stable only while
  :math:`\lambda_{max}(P^{-1/2} H P^{-1/2}) < (2 + 2\beta_1) / ((1-\beta_1)\eta)`
  (= 38/η at :math:`\beta_1 = 0.9`): the adaptive edge of stability (Cohen et al. 2022,
  "Adaptive Gradient Methods at the Edge of Stability", arXiv 2207.14484).

  ``b1``, ``b2`` and ``eps`` must be the values the optimizer was built with (optax's
  defaults are the defaults here). Computed in float32 or wider.

  Args:
    adam_state: ``optax.ScaleByAdamState(count, mu, nu)``; see :func:`find_adam_state`.
    b1, b2, eps: Adam's hyper-parameters.

  Returns:
    :math:`P` as a pytree shaped like ``adam_state.nu``. At ``count == 0`` (before the first
    update) :math:`P = 0`, and sharpness computed from it is inf or NaN: there is no
    preconditioner yet.
  """
  if not isinstance(adam_state, optax.ScaleByAdamState):
    raise TypeError("`adam_state` must be an optax.ScaleByAdamState (use find_adam_state on "
                    f"a chained state), got {type(adam_state).__name__}")
  dtype = _tree.accum_dtype(adam_state.nu)
  t = jnp.asarray(adam_state.count).astype(dtype)
  bias1 = 1 - jnp.asarray(b1, dtype) ** t
  bias2 = 1 - jnp.asarray(b2, dtype) ** t
  return jax.tree.map(lambda nu: bias1 * (jnp.sqrt(nu.astype(dtype) / bias2) + eps),
                      adam_state.nu)


def preconditioned_sharpness(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                             preconditioner, *, k: int = 1, num_iters: Optional[int] = None,
                             key: Optional[jax.Array] = None, b1: float = 0.9,
                             b2: float = 0.999, eps: float = 1e-8,
                             return_eigenvectors: bool = False,
                             tol: Optional[float] = None, max_restarts: int = 20
                             ) -> _lanczos.HessianEigenvalues:
  r"""Preconditioned sharpness :math:`\lambda_{max}(P^{-1/2} H P^{-1/2})` by Lanczos.

  Runs :func:`curvature.hessian_eigenvalues`' Lanczos on the symmetric operator
  :math:`v \mapsto P^{-1/2} H (P^{-1/2} v)` (same eigenvalues as :math:`P^{-1} H`). For Adam
  with :math:`P` from :func:`adam_preconditioner` the stability threshold is
  :math:`(2 + 2\beta_1)/((1-\beta_1)\eta) - \gamma` (38/η at :math:`\beta_1 = 0.9`, γ the
  decoupled weight decay; Cohen et al. 2022, arXiv 2207.14484). Defaults and accuracy are
  those of :func:`curvature.hessian_eigenvalues`.

  Non-finite input: a zero, negative or non-finite entry of :math:`P` (e.g. an Adam state
  at ``count == 0``) or a NaN in the loss or HVP gives NaN or inf eigenvalues; nothing
  hangs.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the point :math:`\theta`.
    preconditioner: either the positive diagonal :math:`P` as a pytree shaped like
      ``params``, or an ``optax.ScaleByAdamState`` (then :func:`adam_preconditioner` with
      ``b1``, ``b2``, ``eps`` gives :math:`P`). For a whole optax state use
      :func:`find_adam_state` first.
    k, num_iters, key, return_eigenvectors, tol, max_restarts: as in
      :func:`curvature.hessian_eigenvalues`.
    b1, b2, eps: Adam's hyper-parameters; used only for an Adam state.

  Returns:
    :class:`HessianEigenvalues` of :math:`P^{-1/2} H P^{-1/2}`; eigenvectors (if asked) are
    those of that symmetric matrix, i.e. in the coordinates :math:`P^{1/2}\theta`.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p: 0.5 * (p[0] ** 2 + 100.0 * p[1] ** 2)          # H = diag(1, 100)
    >>> out = preconditioned_sharpness(loss, jnp.zeros(2), jnp.array([1.0, 25.0]))
    >>> round(float(out.eigenvalues[0]), 4)                              # P⁻¹H = diag(1, 4)
    4.0
  """
  _hvp.check_loss_fn(loss_fn, params)
  if isinstance(preconditioner, optax.ScaleByAdamState):
    preconditioner = adam_preconditioner(preconditioner, b1=b1, b2=b2, eps=eps)
  _tree.check_same_structure(params, preconditioner, "params", "preconditioner")
  dtype = _tree.accum_dtype(params)
  inv_sqrt = jax.tree.map(lambda p: jax.lax.rsqrt(jnp.asarray(p, dtype)), preconditioner)

  def matvec(v):
    # P^{-1/2} is applied in the basis dtype, before the cast to the params' dtype.
    w = jax.tree.map(lambda x, s: x * s, v, inv_sqrt)
    hw = optax.tree.cast(_hvp.hvp(loss_fn, params, _lanczos.cast_like(w, params)), dtype)
    return jax.tree.map(lambda x, s: x * s, hw, inv_sqrt)

  return _lanczos.top_eigenpairs(matvec, params, k=k, num_iters=num_iters, key=key,
                                 return_eigenvectors=return_eigenvectors, tol=tol,
                                 max_restarts=max_restarts)
