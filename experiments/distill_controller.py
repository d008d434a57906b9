r"""The adaptive controller of a distillation run (``distill.adaptive=True``).

The controller of ``distill._strategy`` (``distill.adaptive_controller``) runs on the host every
``controller.every`` steps, before that step, on metrics of the fixed eval batch and of the last
interval; its decisions reach the jitted step as traced arguments, so nothing recompiles:

* **Loss re-weighting.** Loss weights :math:`c_i` (start 1) multiply the terms before the
  fusion, :math:`L_i \to c_i\,\kappa^{s[i\ne ce]}\,L_i` with stage :math:`s` and
  ``controller.stage_decay`` :math:`\kappa`. Rule ``generalization_gap``: when
  ``eval/loss − mean train CE of the interval`` > ``controller.gap_threshold``, multiply
  :math:`c_{kd}` by ``controller.gap_factor`` (soft targets regularise; Hinton et al. 2015,
  arXiv:1503.02531), clipped to ``[1/max_scale, max_scale]``.
* **Clip mode.** ``optax.clip_by_global_norm`` is replaced by ``distill.clip_by_mode`` (global
  mode = the same maths); per-layer clipping when the largest layer-group gradient norm
  exceeds ``controller.clip_spread`` × their mean (``distill.ClipRule`` on ``clip/spread``).
* **Per-layer learning rates.** The learning-rate scale is replaced by
  ``distill.per_layer_learning_rates`` over the groups ``embed``, ``block<i>``, ``head``,
  ``objective`` (each on the config's schedule); a group whose mean relative update
  ‖Δθ_g‖/‖θ_g‖ stays below ``controller.stall_ratio`` for ``controller.stall_patience``
  evaluations restarts on a cosine decay from 0.3·η over a quarter of the run.
* **Stage transitions** when ``eval/loss``, ``eval/kd`` and ``eval/accuracy`` have stayed
  within ``controller.rtol`` of their mean for ``controller.window`` evaluations; each stage
  multiplies the non-CE terms by ``stage_decay``, up to ``controller.num_stages``.

Gradient accumulation (``distill.accumulate_gradients``) is not used: with a fixed
``num_steps`` budget, k > 1 would cut the number of student updates by k. The controller's
state is checkpointed with the student; its decisions go to ``controller_audit.jsonl`` (one
JSON line per decision, with ``step``).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax

import distill
from experiments import optim

CORE_METRICS = ("eval/loss", "eval/kd", "eval/accuracy")  # the controller's stage metrics
AUDIT_LOG = "controller_audit.jsonl"


def layer_group(path) -> str:
  """The layer group of a parameter path in ``{"student": ..., "objective": ...}``:
  ``embed`` (token and position tables), ``block<i>``, ``head`` (final norm and output
  projection), ``objective`` (projections, kernels, fusion)."""
  keys = [str(getattr(e, "key", getattr(e, "idx", e))) for e in path]
  if keys[0] != "student":
    return "objective"
  if keys[1] in ("embed", "pos"):
    return "embed"
  if keys[1] == "blocks":
    return f"block{keys[2]}"
  return "head"


def layer_labels(tree):
  """``tree`` with every leaf replaced by its :func:`layer_group` (optax label convention)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: layer_group(path), tree)


def make_adaptive_optimizer(config, schedule, groups) -> optax.GradientTransformationExtraArgs:
  r"""The config's optimizer with the controller's switches:
  ``chain(clip_by_mode(grad_clip), preconditioner, per_layer_learning_rates)``.

  ``preconditioner`` is ``experiments.optim``'s (Adam/AdamW moments, decoupled weight decay),
  so with the decisions at their initial values (global clipping, scales 1, no restart) this
  is the update of ``optim.make_optimizer``: :math:`-\eta_t\,\mathrm{precond}(\mathrm{clip}(g))`.
  A restarted group follows a cosine decay from :math:`0.3\eta` to the schedule's end value
  over a quarter of the run.
  """
  o = config.optimizer
  raw = config.to_dict()
  raw["optimizer"]["grad_clip"] = 0.0
  preconditioner = optim.make_optimizer(ml_collections.ConfigDict(raw), schedule).preconditioner
  peak = float(o.learning_rate)
  restart = optax.cosine_decay_schedule(
      0.3 * peak, max(config.num_steps // 4, 1),
      alpha=min(1.0, float(config.schedule.end_fraction) / 0.3))
  lrs = distill.per_layer_learning_rates(
      {g: schedule for g in groups}, layer_labels,
      restart_schedules={g: restart for g in groups})
  parts = [distill.clip_by_mode(o.grad_clip, layer_labels=layer_labels)] if o.grad_clip > 0 else []
  return optax.chain(*parts, preconditioner, lrs)


def make_controller(config, terms, groups) -> tuple[distill.Controller, list[str]]:
  """``(controller, rule_names)``: ``distill.adaptive_controller`` with this runner's rules
  (see the module docstring). Loss weights start at 1: they scale the fusion's inputs."""
  c = config.distill.controller
  rules, names = [], []
  if "kd" in terms:
    rules.append(distill.ReweightRule("controller/generalization_gap", c.gap_threshold,
                                      {"kd": c.gap_factor}))
    names.append("generalization_gap")
  clip_rule = (distill.ClipRule(per_layer_above=c.clip_spread)
               if config.optimizer.grad_clip > 0 else None)
  controller = distill.adaptive_controller(
      loss_weights={t: 1.0 for t in terms}, core_metrics=CORE_METRICS, window=c.window,
      rtol=c.rtol, min_stable=len(CORE_METRICS), num_stages=c.num_stages,
      reweight_rules=rules, weight_bounds=(1.0 / c.max_scale, c.max_scale),
      clip_rule=clip_rule, lr_groups=groups,
      stall_rule=distill.StallRule(c.stall_ratio, c.stall_patience))
  return controller, names


def controller_decisions(state, terms, stage_decay: float) -> dict[str, Any]:
  r"""The step's ``decisions`` from a (host) controller state, as NumPy values.

  ``loss_scales[i]`` = :math:`c_i\,\kappa^{s}` for the non-CE terms and :math:`c_{ce}` for CE
  (stage :math:`s`, ``stage_decay`` :math:`\kappa`).
  """
  stage = int(np.asarray(state.stage))
  decay = np.float32(stage_decay) ** stage
  scales = {t: np.float32(np.asarray(state.loss_weights[t], np.float32)
                          * (np.float32(1.0) if t == "ce" else decay)) for t in terms}
  return {"loss_scales": scales,
          "clip_mode": np.asarray(state.clip_mode, np.int32),
          "lr_scales": {g: np.asarray(v, np.float32) for g, v in state.lr_scales.items()},
          "lr_restarts": {g: np.asarray(v, np.int32) for g, v in state.lr_restarts.items()}}


def interval_keys(metrics: dict) -> list[str]:
  """The step metrics the controller averages over its interval."""
  return [k for k in metrics if k in ("distill/ce", "clip/spread")
          or k.startswith("update_ratio/")]


def controller_inputs(controller, ev: dict, interval: dict) -> dict[str, np.float32]:
  """The controller's metrics: the eval metrics ``ev`` at this step and the interval means
  (``interval = {"count": n, "sums": {name: sum}}``); ``controller/generalization_gap`` =
  ``eval/loss`` − mean train CE."""
  n = interval["count"]
  means = {k: v / n for k, v in interval["sums"].items()}
  out = {k: float(ev[k]) for k in CORE_METRICS}
  out["controller/generalization_gap"] = float(ev["eval/loss"]) - means["distill/ce"]
  out.update({k: v for k, v in means.items() if k != "distill/ce"})
  return {k: np.float32(out[k]) for k in controller.metric_names}
