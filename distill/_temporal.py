r"""Temporal distillation losses: how hidden states and attention evolve along the sequence.

Three temporal terms, read for teacher-forced training on whole sequences (one forward pass
gives every "generation step" t at once, as position t):

1. **State smoothness** — :func:`smoothness_penalty`: an L2 penalty on the student's
   step-to-step hidden-state change whose coefficient grows linearly with position.
2. **Attention evolution** — :func:`attention_evolution` and
   :func:`attention_evolution_loss`: at step t the attention rows of steps t, t−1, t−2, t−3
   are stacked into one tensor (over the batch and positions: ``[B, T, H, 4, T]``, i.e. a
   4-D tensor ``[T, H, 4, T]`` per sequence) for teacher and student, and matched by the
   nuclear norm of their difference.
3. **Semantic path replay** — :func:`path_replay_loss`, an interpretation (see below).

Attention maps come from the collected QKV projections (``distill.attention_from_qkv``) with
no model change.

On "semantic path replay". The method is specified only in words: sample finished sequences,
freeze the teacher, "start from its final hidden state and run back-propagation backwards to generate a virtual
semantic degradation path", and have the student "evolve its hidden state backwards along the
same path". Taken literally this is not well defined: it names no quantity to differentiate,
no variable the gradient is taken with respect to, and a causal decoder has no backward
dynamics for the student to follow. Gradients of an output with respect to earlier hidden
states would also need a perturbation hook (``nnx.perturb``) inside every block, i.e. a model
change. We implement the well-defined reading that keeps its intent — the teacher's hidden
state trajectory, replayed from the final state backwards, is a path the student's trajectory
must follow step by step:

.. math::
   \mathcal L_{path} = \frac{\sum_{b,t\ge1}\gamma^{\,T-1-t}\,m_{b,t}m_{b,t-1}
     \lVert \Delta^S_{b,t} - \Delta^T_{b,t}\rVert^2}
     {\sum_{b,t\ge1}\gamma^{\,T-1-t}m_{b,t}m_{b,t-1}},
   \qquad \Delta_{b,t} = h_{b,t} - h_{b,t-1},

i.e. matching the per-step increments (the path, not the positions on it) with a weight that is
largest at the final state and decays by γ per step walked back. Sampling "finished historical
samples" is a replay buffer, a data-pipeline choice left to the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill._features import compute_dtype

GROWTHS = ("linear", "constant")
HEAD_REDUCTIONS = ("mean", "none")


def _mask_or_ones(mask, shape, dtype, name="mask"):
  if mask is None:
    return jnp.ones(shape, dtype)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)} ([B, T]), got {mask.shape}")
  return mask.astype(dtype)


def _check_hidden(h, name):
  h = jnp.asarray(h)
  if h.ndim != 3:
    raise ValueError(f"`{name}` must be [B, T, D], got shape {h.shape}")
  if h.shape[1] < 2:
    raise ValueError(f"`{name}` needs at least 2 positions, got T={h.shape[1]}")
  return h


def smoothness_penalty(hidden: jax.Array, *, growth: str | jax.Array = "linear",
                       mask: jax.Array | None = None) -> jax.Array:
  r"""Position-weighted L2 penalty on hidden-state changes.

  .. math::
     \mathcal L = \frac{\sum_{b}\sum_{t=1}^{T-1} c_t\,m_{b,t}m_{b,t-1}
       \lVert h_{b,t}-h_{b,t-1}\rVert_2^2}{\sum_b\sum_{t=1}^{T-1} m_{b,t}m_{b,t-1}},\qquad
     c_t = \frac{t}{T-1}\ (\text{"linear"})\ \text{or}\ 1\ (\text{"constant"}),

  an "L2 regularisation of the change rate of adjacent hidden states, with a coefficient that
  grows linearly with generation length": :math:`c_t` rises from 1/(T−1) to 1
  at the last step, and the normalisation by the number of steps (not by Σc) keeps that
  growth. Apply it to the student's hidden states (e.g. a ``block_out`` slice).

  NaN behaviour: NaN in a hidden state gives NaN; steps touching a masked position are
  dropped; an all-masked input gives 0.

  Args:
    hidden: ``[B, T, D]``.
    growth: ``"linear"``, ``"constant"`` or an explicit ``[T-1]`` array of coefficients
      :math:`c_1,\dots,c_{T-1}`.
    mask: optional ``[B, T]`` (1 = real token).

  Returns:
    Scalar, float32 (or wider).
  """
  hidden = _check_hidden(hidden, "hidden")
  dtype = compute_dtype(hidden)
  b, t, _ = hidden.shape
  if isinstance(growth, str):
    if growth == "linear":
      coef = jnp.arange(1, t, dtype=dtype) / (t - 1)
    elif growth == "constant":
      coef = jnp.ones((t - 1,), dtype)
    else:
      raise ValueError(f"`growth` must be one of {GROWTHS} or a [T-1] array, got {growth!r}")
  else:
    coef = jnp.asarray(growth, dtype)
    if coef.shape != (t - 1,):
      raise ValueError(f"`growth` as an array must have shape ({t - 1},), got {coef.shape}")
  h = hidden.astype(dtype)
  m = _mask_or_ones(mask, (b, t), dtype)
  pair = m[:, 1:] * m[:, :-1]
  sq = jnp.sum(jnp.square(h[:, 1:] - h[:, :-1]), axis=-1)
  return jnp.sum(coef * pair * sq) / jnp.maximum(jnp.sum(pair), 1.0)


def attention_evolution(attention: jax.Array, window: int = 4) -> jax.Array:
  r"""Stack each step's attention row with those of the previous ``window − 1`` steps.

  .. math:: E_{b,h,t,k,:} = A_{b,h,t-k,:},\quad k = 0,\dots,\text{window}-1

  (zero rows where t − k < 0). ``attention`` is ``[B, H, T, Tk]`` (queries on axis 2); the
  result is ``[B, T, H, window, Tk]``: for each step t, a ``[H, window, Tk]`` block whose
  ``[window, Tk]`` slices are the attention-evolution matrices (current step first).
  """
  attention = jnp.asarray(attention)
  if attention.ndim != 4:
    raise ValueError(f"`attention` must be [B, H, T, Tk], got shape {attention.shape}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"`window` must be a positive int, got {window!r}")
  t = attention.shape[2]
  rows = []
  for k in range(window):
    shifted = jnp.pad(attention, ((0, 0), (0, 0), (k, 0), (0, 0)))[:, :, :t]
    rows.append(shifted)
  return jnp.moveaxis(jnp.stack(rows, axis=3), 2, 1)


def attention_evolution_loss(student_attention: jax.Array, teacher_attention: jax.Array, *,
                             window: int = 4, heads: str = "mean",
                             mask: jax.Array | None = None) -> jax.Array:
  r"""Nuclear-norm distance between student and teacher attention-evolution tensors.

  .. math::
     \mathcal L = \frac{1}{|\mathcal V|}\sum_{(b,h,t)\in\mathcal V}
       \big\lVert E^S_{b,h,t} - E^T_{b,h,t}\big\rVert_*,\qquad
     \lVert X\rVert_* = \textstyle\sum_i \sigma_i(X),

  with :math:`E_{b,h,t}\in\mathbb R^{w\times T_k}` the rows of steps t, …, t − w + 1
  (:func:`attention_evolution`, w = ``window``, default 4). The nuclear norm of the
  4-D tensor is taken as the sum of the nuclear norms of its step × key slices, a standard
  matricisation; it rewards matching the low-rank *pattern* of how attention moves from step
  to step rather than each entry (Candès & Recht 2009 for the nuclear norm as the convex
  surrogate of rank). :math:`\mathcal V` holds the steps t ≥ w − 1 whose w rows are all
  unmasked. Head counts may differ between models with ``heads="mean"`` (attention is averaged
  over heads first); ``heads="none"`` matches head by head and needs equal counts.

  Computed with ``jnp.linalg.svd(compute_uv=False)`` in float32 or wider; its gradient
  :math:`U V^\top` is finite also at repeated or zero singular values (e.g. when the two
  tensors are equal, where the loss is 0).

  NaN behaviour: NaN in an attention map gives NaN; no valid step (all masked) gives 0.

  Args:
    student_attention, teacher_attention: ``[B, H, T, T]`` attention weights (e.g. from
      :func:`distill.attention_from_qkv`); H may differ with ``heads="mean"``.
    window: steps per evolution matrix, ≤ T.
    heads: ``"mean"`` or ``"none"``.
    mask: optional ``[B, T]`` (1 = real token).

  Returns:
    Scalar ≥ 0.
  """
  s, t_ = jnp.asarray(student_attention), jnp.asarray(teacher_attention)
  for name, a in (("student_attention", s), ("teacher_attention", t_)):
    if a.ndim != 4:
      raise ValueError(f"`{name}` must be [B, H, T, Tk], got shape {a.shape}")
  if heads not in HEAD_REDUCTIONS:
    raise ValueError(f"`heads` must be one of {HEAD_REDUCTIONS}, got {heads!r}")
  if s.shape[0] != t_.shape[0] or s.shape[2:] != t_.shape[2:]:
    raise ValueError(f"`student_attention` {s.shape} and `teacher_attention` {t_.shape} must "
                     f"agree in batch, query and key axes")
  if heads == "none" and s.shape[1] != t_.shape[1]:
    raise ValueError(f"`heads`='none' needs equal head counts, got {s.shape[1]} and "
                     f"{t_.shape[1]}; use heads='mean'")
  b, _, t, _ = s.shape
  if not isinstance(window, int) or not 1 <= window <= t:
    raise ValueError(f"`window` must be an int in [1, T={t}], got {window!r}")
  dtype = compute_dtype(s, t_)
  s, t_ = s.astype(dtype), t_.astype(dtype)
  if heads == "mean":
    s, t_ = jnp.mean(s, axis=1, keepdims=True), jnp.mean(t_, axis=1, keepdims=True)
  diff = attention_evolution(s, window) - attention_evolution(t_, window)  # [B, T, H, w, Tk]
  nuc = jnp.sum(jnp.linalg.svd(diff, compute_uv=False), axis=-1)          # [B, T, H]
  m = _mask_or_ones(mask, (b, t), dtype)
  valid = jnp.ones((b, t), dtype)
  for k in range(window):
    valid = valid * jnp.pad(m, ((0, 0), (k, 0)))[:, :t]
  valid = jnp.broadcast_to(valid[..., None], nuc.shape)
  return jnp.sum(nuc * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def path_replay_loss(student_hidden: jax.Array, teacher_hidden: jax.Array, *,
                     decay: float = 0.9, mask: jax.Array | None = None) -> jax.Array:
  r""""Semantic path replay", read as backward-weighted trajectory matching.

  .. math::
     \mathcal L = \frac{\sum_{b,t\ge1}\gamma^{\,T-1-t}\,m_{b,t}m_{b,t-1}
       \lVert \Delta^S_{b,t} - \Delta^T_{b,t}\rVert_2^2}
       {\sum_{b,t\ge1}\gamma^{\,T-1-t}\,m_{b,t}m_{b,t-1}},\qquad
     \Delta_{b,t} = h_{b,t}-h_{b,t-1},\ \gamma = \text{decay},

  the teacher's path (its step increments) replayed from the final state backwards with a
  weight that decays by γ per step; see the module docstring for why the literal
  description is not implemented. Invariant to a constant offset between the two hidden
  states. The student's states must already be in the teacher's width (project them, e.g.
  with a ``FeatureDistiller`` projection or an ``nnx.Linear``).

  NaN behaviour: NaN in a hidden state gives NaN; masked steps are dropped; an all-masked
  input gives 0.

  Args:
    student_hidden, teacher_hidden: ``[B, T, D]`` of one shape.
    decay: γ in (0, 1]; 1 weighs every step equally.
    mask: optional ``[B, T]``.

  Returns:
    Scalar ≥ 0, float32 (or wider).
  """
  s = _check_hidden(student_hidden, "student_hidden")
  t_ = _check_hidden(teacher_hidden, "teacher_hidden")
  if s.shape != t_.shape:
    raise ValueError(f"`student_hidden` {s.shape} and `teacher_hidden` {t_.shape} must have "
                     f"one shape; project the student's width first")
  if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
    raise ValueError(f"`decay` must be in (0, 1], got {decay!r}")
  dtype = compute_dtype(s, t_)
  b, t, _ = s.shape
  s, t_ = s.astype(dtype), t_.astype(dtype)
  inc = (s[:, 1:] - s[:, :-1]) - (t_[:, 1:] - t_[:, :-1])
  sq = jnp.sum(jnp.square(inc), axis=-1)
  weight = jnp.asarray([float(decay) ** (t - 1 - k) for k in range(1, t)], dtype)
  m = _mask_or_ones(mask, (b, t), dtype)
  w = weight * m[:, 1:] * m[:, :-1]
  return jnp.sum(w * sq) / jnp.maximum(jnp.sum(w), jnp.finfo(dtype).tiny)
