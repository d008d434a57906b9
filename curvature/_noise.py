"""Top eigenvalues of the per-example gradient covariance, matrix-free."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from curvature import _lanczos
from curvature import _tree

PyTree = Any


def gradient_noise_top_eigenvalue(per_example_loss_fn: Callable[[PyTree, Any], jax.Array],
                                  params: PyTree, batch: Any, *, k: int = 1,
                                  num_iters: Optional[int] = None,
                                  key: Optional[jax.Array] = None,
                                  return_eigenvectors: bool = False,
                                  tol: Optional[float] = None, max_restarts: int = 20
                                  ) -> _lanczos.HessianEigenvalues:
  r"""Top-``k`` eigenvalues of the per-example gradient covariance :math:`\Sigma`.

  .. math:: \Sigma = \frac1N \sum_{i=1}^N (g_i - \bar g)(g_i - \bar g)^\top,
     \qquad g_i = \nabla_\theta \ell_i(\theta),\ \bar g = \frac1N \sum_i g_i,

  the *population* (1/N, not 1/(N-1)) covariance over the N examples of ``batch``. It is the
  covariance of one example's gradient drawn uniformly from the batch; the noise of a
  mini-batch gradient of size B drawn with replacement from these N examples is
  :math:`\Sigma / B`. Its rank is at most N - 1.

  Matrix-free: with :math:`G` the :math:`N \times P` per-example Jacobian,
  :math:`\Sigma v = \frac1N G^\top (Gv - \bar{(Gv)}\,\mathbf 1)` (note
  :math:`\bar g^\top v` is the mean of :math:`Gv`), where :math:`Gv` is one ``jax.jvp``
  of the loss vector and :math:`G^\top u` one ``jax.vjp`` (its residuals are computed once);
  :math:`G` is never formed. Centring happens in the N-dimensional output space, in float32
  or wider. This operator then goes through the Lanczos of
  :func:`curvature.hessian_eigenvalues` (same defaults and accuracy guarantees).

  Non-finite input: a NaN in a per-example loss or gradient gives NaN eigenvalues; nothing
  hangs.

  Args:
    per_example_loss_fn: ``per_example_loss_fn(params, batch) -> [N]`` losses, one per
      example (e.g. a ``jax.vmap`` of a single-example loss).
    params: the point :math:`\theta`.
    batch: the examples, any pytree ``per_example_loss_fn`` accepts.
    k, num_iters, key, return_eigenvectors, tol, max_restarts: as in
      :func:`curvature.hessian_eigenvalues`.

  Returns:
    :class:`HessianEigenvalues` of :math:`\Sigma` (largest first).

  Reference: the gradient-noise / Hessian alignment studies, e.g. Jastrzebski et al.,
  "Three Factors Influencing Minima in SGD" (arXiv 1711.04623); Thomas et al., "On the
  interplay between noise and curvature and its effect on optimization and generalization"
  (AISTATS 2020).
  """
  if not callable(per_example_loss_fn):
    raise TypeError("`per_example_loss_fn` must be a callable (params, batch) -> [N] losses, "
                    f"got {type(per_example_loss_fn)}")
  out = jax.eval_shape(per_example_loss_fn, params, batch)
  if not hasattr(out, "shape") or len(out.shape) != 1 or out.shape[0] < 1:
    raise TypeError("`per_example_loss_fn` must return a 1-D array of per-example losses "
                    f"[N], got {getattr(out, 'shape', type(out))}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"`per_example_loss_fn` must return floating losses, got {out.dtype}")
  n = out.shape[0]
  dtype = _tree.accum_dtype(params)
  losses_fn = lambda p: per_example_loss_fn(p, batch)
  _, vjp_fn = jax.vjp(losses_fn, params)

  def matvec(v):
    gv = jax.jvp(losses_fn, (params,), (_lanczos.cast_like(v, params),))[1]
    gv = gv.astype(jnp.promote_types(gv.dtype, dtype))
    u = (gv - jnp.mean(gv)) / n
    return optax.tree.cast(vjp_fn(u.astype(out.dtype))[0], dtype)

  return _lanczos.top_eigenpairs(matvec, params, k=k, num_iters=num_iters, key=key,
                                 return_eigenvectors=return_eigenvectors, tol=tol,
                                 max_restarts=max_restarts)
