"""Hessian-vector products and directional sharpness."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from curvature import _tree

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]


def check_loss_fn(loss_fn: LossFn, params: PyTree, name: str = "loss_fn") -> None:
  """Trace-time check that ``loss_fn(params)`` is a real scalar (costs no FLOPs)."""
  if not callable(loss_fn):
    raise TypeError(f"`{name}` must be a callable loss_fn(params) -> scalar, got {type(loss_fn)}")
  _tree.check_scalar_loss(jax.eval_shape(loss_fn, params), name)


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
  r"""Hessian-vector product :math:`H v = \nabla^2 L(\theta)\, v`, forward-over-reverse.

  Computed as ``jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]``: one forward-mode sweep
  through the reverse-mode gradient, a small constant multiple of one gradient's cost
  (Pearlmutter 1994), and never forms :math:`H`.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``; bind the batch with a closure or ``partial``.
    params: the point :math:`\theta`, any pytree of float arrays.
    v: the vector, a pytree with the structure and shapes of ``params``.

  Returns:
    :math:`H v` as a pytree shaped like ``params``. A non-finite loss or parameter makes the
    product non-finite; nothing is masked.
  """
  check_loss_fn(loss_fn, params)
  _tree.check_same_structure(params, v, "params", "v")
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def grad_and_hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> tuple[PyTree, PyTree]:
  """``(∇L(θ), H v)`` from one forward-over-reverse sweep."""
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))


def directional_sharpness(loss_fn: LossFn, params: PyTree, direction: PyTree) -> jax.Array:
  r"""Directional sharpness :math:`\lambda_{dir} = \Delta\theta^\top H \Delta\theta / \Delta\theta^\top g`.

  For a descent direction :math:`\Delta\theta` (the step is :math:`\theta - \eta\Delta\theta`)
  on a quadratic, the loss rises along the step exactly when :math:`\eta > 2/\lambda_{dir}`,
  so :math:`\lambda_{dir}` is the quadratic model of critical sharpness (Kalra et al. 2026,
  arXiv 2601.16979, §2). For gradient descent (:math:`\Delta\theta = g`) it is a weighted mean
  of Hessian eigenvalues, hence at most :math:`\lambda_{max}`.

  Both inner products come from a single forward-over-reverse sweep and are accumulated in
  float32 or wider.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the point :math:`\theta`.
    direction: :math:`\Delta\theta`, shaped like ``params``.

  Returns:
    A scalar. Negative when :math:`\Delta\theta^\top g < 0` (an ascent direction: the value is
    returned as computed so the sign can be seen); NaN when :math:`\Delta\theta^\top g = 0`
    or when the loss, gradient or HVP is non-finite.
  """
  check_loss_fn(loss_fn, params)
  _tree.check_same_structure(params, direction, "params", "direction")
  g, hd = grad_and_hvp(loss_fn, params, direction)
  dhd = _tree.tree_vdot(direction, hd)
  dg = _tree.tree_vdot(direction, g)
  return jnp.where(dg != 0, dhd / jnp.where(dg != 0, dg, 1), jnp.nan)
