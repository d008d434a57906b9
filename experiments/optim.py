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

Schedule = Callable[[jax.Array], jax.Array]


def _warmup(peak: float, warmup_steps: int, step: jax.Array) -> jax.Array:
  # Starts at η/W, not 0: a zero learning rate wastes a step and makes 2/η infinite.
  if warmup_steps <= 0:
    return jnp.asarray(peak, jnp.float32)
  return peak * jnp.minimum(1.0, (step + 1.0) / warmup_steps)


def make_schedule(config) -> Schedule:
  """The learning-rate schedule ``step -> η(step)`` named by ``config.schedule.name``.

  * ``constant``: η.
  * ``warmup_cosine``: linear warmup over ``warmup_steps`` to η, then cosine decay to
    ``end_fraction·η`` at ``num_steps``.
  * ``warmup_stable_decay`` (WSD): linear warmup, flat at η, then a linear or cosine decay to
    ``end_fraction·η`` over the last ``decay_fraction`` of the run.
  """
  peak = float(config.optimizer.learning_rate)
  s = config.schedule
  total = int(config.num_steps)
  warm = int(s.warmup_steps)
  end = peak * float(s.end_fraction)

  if s.name == "constant":
    return lambda step: _warmup(peak, warm, jnp.asarray(step, jnp.float32))

  if s.name == "warmup_cosine":
    def cosine(step):
      step = jnp.asarray(step, jnp.float32)
      frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
      decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
      return jnp.where(step < warm, _warmup(peak, warm, step), decayed)
    return cosine

  if s.name == "warmup_stable_decay":
    decay_start = total - max(1, int(round(float(s.decay_fraction) * total)))
    decay_start = max(decay_start, warm)
    shape = s.decay_shape

    def wsd(step):
      step = jnp.asarray(step, jnp.float32)
      frac = jnp.clip((step - decay_start) / max(total - decay_start, 1), 0.0, 1.0)
      if shape == "linear":
        decayed = peak + (end - peak) * frac
      else:
        decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
      return jnp.where(step < warm, _warmup(peak, warm, step), decayed)
    return wsd

  raise ValueError(f"schedule.name={s.name!r} is not one of "
                   "['constant', 'warmup_cosine', 'warmup_stable_decay'].")


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
