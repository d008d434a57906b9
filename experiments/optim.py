"""Learning-rate schedules and optax chains with the critical-sharpness probe in place.

Every optimizer is built as three parts,

    optax.chain(preconditioner, critical_sharpness_probe, scale_by_learning_rate(schedule))

where ``preconditioner`` maps a gradient to the unit-learning-rate update Δθ (identity for SGD,
``trace`` for heavy-ball momentum, ``scale_by_adam`` [+ decoupled weight decay] for Adam/AdamW).
The probe therefore measures λ_c along Δθ, so the real step θ − η_tΔθ raises the batch loss
exactly when λ_c > 2/η_t. ``preconditioner`` alone gives the "virtual" unit-LR update of any
gradient (used for the per-task directions of the relative-sharpness matrix).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import curvature
from experiments import config_lib

Schedule = Callable[[jax.Array], jax.Array]


def _warmup(peak: float, warmup_steps: int) -> Schedule:
  # Starts at η/W, not 0: a zero learning rate wastes a step and makes 2/η infinite. (optax's
  # linear_schedule from 0 would start at 0, hence this piece of our own.)
  return lambda step: peak * jnp.minimum(1.0, (step + 1.0) / warmup_steps)


def _cosine(peak: float, end: float, steps: int) -> Schedule:
  """``end + (peak - end)·½(1 + cos(π·min(t, T)/T))`` with ``T = steps``."""
  return optax.cosine_decay_schedule(peak, steps, alpha=end / peak if peak else 0.0)


def make_schedule(config) -> Schedule:
  """The learning-rate schedule ``step -> η(step)`` named by ``config.schedule.name``.

  With W = ``warmup_steps``, every schedule starts with the linear warmup
  ``η·min(1, (t+1)/W)`` (none when W = 0) and continues, via ``optax.join_schedules``, with:

  * ``constant``: η.
  * ``warmup_cosine``: cosine decay from η at step W to ``end_fraction·η`` at ``num_steps``.
  * ``warmup_stable_decay`` (WSD): flat at η, then a linear or cosine decay to
    ``end_fraction·η`` over the last ``decay_fraction`` of the run.
  * ``two_stage`` (pre-training then mid-training, as OLMo-2: Walsh et al. 2025, arXiv
    2501.00656, whose checkpoints Kalra et al. 2026, arXiv 2601.16979, Fig. 4, measure): stage
    1 a cosine decay from η at step W to ``stage1_end_fraction·η`` at the stage-2 start S; stage 2
    a linear (or cosine, ``decay_shape``) decay from there to ``end_fraction·η`` at
    ``num_steps``. S = ``config_lib.decay_start``: the last ``decay_fraction`` of the run, the
    step ``data.switch_step`` must name when the data changes with it.

  The step is taken as float32 and η(t) is a float32 scalar.
  """
  peak = float(config.optimizer.learning_rate)
  s = config.schedule
  total = int(config.num_steps)
  warm = max(int(s.warmup_steps), 0)
  end = peak * float(s.end_fraction)

  if s.name == "constant":
    pieces, boundaries = [optax.constant_schedule(peak)], []
  elif s.name == "warmup_cosine":
    pieces, boundaries = [_cosine(peak, end, max(total - warm, 1))], []
  elif s.name in ("warmup_stable_decay", "two_stage"):
    start = config_lib.decay_start(config)
    steps = max(total - start, 1)
    # WSD decays from the peak; two_stage's stage 2 from where stage 1's cosine ended.
    top = peak if s.name == "warmup_stable_decay" else peak * float(s.stage1_end_fraction)
    decay = (optax.linear_schedule(top, end, steps) if s.decay_shape == "linear"
             else _cosine(top, end, steps))
    first = (optax.constant_schedule(peak) if s.name == "warmup_stable_decay"
             else _cosine(peak, top, max(start - warm, 1)))
    pieces, boundaries = [first, decay], [start - warm]
  else:
    raise ValueError(f"schedule.name={s.name!r} is not one of {list(config_lib.SCHEDULES)}.")
  if warm:
    pieces, boundaries = [_warmup(peak, warm)] + pieces, [0] + boundaries
    boundaries = [b + warm for b in boundaries]
  schedule = optax.join_schedules(pieces, boundaries)
  return lambda step: jnp.asarray(schedule(jnp.asarray(step, jnp.float32)), jnp.float32)


def _matrices_only(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


class Optimizer(NamedTuple):
  """An optax chain with its parts named.

  Attributes:
    tx: the full chain ``(preconditioner, probe, scale_by_learning_rate)``; its state is a
      3-tuple in that order.
    preconditioner: gradient → unit-LR update Δθ (the first part of ``tx``).
    schedule: ``step -> η``.
  """
  tx: optax.GradientTransformationExtraArgs
  preconditioner: optax.GradientTransformation
  schedule: Schedule


def make_optimizer(config, schedule: Schedule) -> Optimizer:
  """Build the optimizer named by ``config.optimizer.name`` with the λ_c probe before the LR."""
  o = config.optimizer
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  if o.name == "sgd":
    pass
  elif o.name == "momentum":
    parts.append(optax.trace(decay=o.momentum, nesterov=False))
  elif o.name in ("adam", "adamw"):
    parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
    if o.name == "adamw" and o.weight_decay > 0:
      parts.append(optax.add_decayed_weights(o.weight_decay, mask=_matrices_only))
  else:
    raise ValueError(f"optimizer.name={o.name!r} is not one of "
                     "['sgd', 'momentum', 'adam', 'adamw'].")
  preconditioner = optax.chain(*parts) if parts else optax.identity()
  p = config.probe
  if p.critical:
    probe = curvature.critical_sharpness_probe(
        learning_rate=schedule, every=p.every, step_guess=p.step_guess,
        tol_power=p.tol_power, max_evals=p.max_evals, directional=p.directional)
  else:
    probe = optax.identity()
  tx = optax.chain(preconditioner, probe, optax.scale_by_learning_rate(schedule))
  return Optimizer(tx, preconditioner, schedule)


def stability_threshold(config) -> tuple[str, float]:
  """The edge-of-stability threshold of the optimizer as ``(formula, c)`` with threshold c/η.

  GD: 2/η. Heavy-ball β: (2+2β)/η. Adam β1 (for the preconditioned sharpness λ^PH):
  (2+2β1)/((1−β1)η) — 38/η at β1 = 0.9 (Cohen et al. 2021, 2022).
  """
  o = config.optimizer
  if o.name == "momentum":
    return "(2+2β)/η", 2.0 + 2.0 * o.momentum
  if o.name in ("adam", "adamw"):
    return "(2+2β₁)/((1−β₁)η)", (2.0 + 2.0 * o.b1) / (1.0 - o.b1)
  return "2/η", 2.0
