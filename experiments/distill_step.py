r"""The student's training step of a distillation run: one gradient of the fused objective.

``make_step`` returns a pure function for ``jax.jit``; the learned parts of the objective
(feature projections, the fusion's log-variances or gate network) are parameters in the same
optimizer state as the student, so one gradient of the fused total trains all of them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import curvature
import distill
from experiments import distill_controller
from experiments import optim


def make_optimizer(config, schedule, params) -> optax.GradientTransformationExtraArgs:
  """The student's optimizer: ``experiments.optim``'s (AdamW by the config, the λ_c probe in
  the chain when ``probe.critical``), or with ``distill.adaptive`` the controller's switches
  (``distill_controller.make_adaptive_optimizer``) over the layer groups of ``params``."""
  if not config.distill.adaptive:
    return optim.make_optimizer(config, schedule).tx
  groups = sorted(set(jax.tree.leaves(distill_controller.layer_labels(params))))
  return distill_controller.make_adaptive_optimizer(config, schedule, groups)


class StudentState(NamedTuple):
  """What the jitted step carries: ``step`` (int32, updates done), ``params``
  (``{"student": ..., "objective": ...}``) and the optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


def make_step(objective, tx, schedule, *, directional: bool = False, layer_labels=None):
  r"""``step(state, teacher_params, batch, decisions=None) -> (state, metrics)``.

  One update :math:`\theta \leftarrow \theta + \mathrm{tx}(\nabla_\theta L)` of the
  fused objective ``L`` (:func:`experiments.distill_objective.make_objective`) over the
  student's and the objective's parameters. ``decisions`` (adaptive runs): ``{"loss_scales",
  "clip_mode", "lr_scales", "lr_restarts"}`` from ``distill_controller.controller_decisions``,
  traced values: a new decision recompiles nothing. The last three go to ``tx.update`` as
  extra args (``distill.clip_by_mode``, ``distill.per_layer_learning_rates``); the step then
  also returns the strategy metrics (``clip/*``, ``lr/<group>``) and ``update_ratio/<group>``
  (``layer_labels`` groups).
  """
  def step(state, teacher_params, batch, decisions=None):
    params = state.params
    scales = None if decisions is None else decisions["loss_scales"]

    def loss_fn(p):
      return objective(p, teacher_params, batch, scales)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra = {} if decisions is None else {
        k: decisions[k] for k in ("clip_mode", "lr_scales", "lr_restarts")}
    updates, new_opt_state = tx.update(
        grads, state.opt_state, params, value=loss, grad=grads,
        value_fn=lambda p: loss_fn(p)[0], **extra)
    new_params = optax.apply_updates(params, updates)
    metrics = {"train/loss": loss, "train/lr": jnp.asarray(schedule(state.step), jnp.float32),
               "train/grad_norm": optax.tree.norm(grads),
               "train/update_norm": optax.tree.norm(updates), **aux}
    if decisions is not None:
      metrics.update(distill.strategy_metrics(new_opt_state))
      metrics.update(distill.update_ratios(updates, params, layer_labels))
    probes = curvature.probe_metrics(new_opt_state)
    if not directional:
      probes.pop("curv/directional_sharpness", None)
    metrics.update(probes)
    return StudentState(state.step + 1, new_params, new_opt_state), metrics
  return step
