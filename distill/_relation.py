"""MiniLM v2 self-attention relation distillation (query–query, key–key, value–value).

Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
Pretrained Transformers", Findings of ACL, arXiv 2012.15828, §3.1 eq. 3–5.

Each of Q, K, V (``[B, T, D]``) is split into :math:`A_r` *relation heads* of size
:math:`d_r = D/A_r` — independent of the model's attention heads — and turned into
row-stochastic :math:`T\times T` relation matrices. They have the same shape for any width D,
so teacher and student of different widths (and head counts) are compared with no projection.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from distill._features import compute_dtype

_HIGHEST = jax.lax.Precision.HIGHEST

RELATIONS = ("qq", "kk", "vv", "qk", "qv", "kq", "kv", "vq", "vk")
"""Relation pairs: the first letter is the left factor, the second the right one (MiniLMv2
uses "qq", "kk", "vv")."""
MINILM_RELATIONS = ("qq", "kk", "vv")


def split_qkv(qkv: jax.Array) -> dict[str, jax.Array]:
  """``{"q", "k", "v"}`` from a fused projection output ``[..., 3·D]`` (Q, K, V concatenated,
  as in ``experiments.models.CausalSelfAttention``; read it with
  ``collect_intermediates(model, tokens, slices=("qkv",))``)."""
  qkv = jnp.asarray(qkv)
  if qkv.ndim < 1 or qkv.shape[-1] % 3:
    raise ValueError(f"`qkv` must have a last axis divisible by 3, got shape {qkv.shape}")
  q, k, v = jnp.split(qkv, 3, axis=-1)
  return {"q": q, "k": k, "v": v}


def _heads(x: jax.Array, num_heads: int, name: str) -> jax.Array:
  d = x.shape[-1]
  if d % num_heads:
    raise ValueError(f"`num_relation_heads`={num_heads} must divide the width of `{name}` "
                     f"({d})")
  return jnp.moveaxis(x.reshape(*x.shape[:-1], num_heads, d // num_heads), -2, -3)


def relation_log_probs(left: jax.Array, right: jax.Array, num_relation_heads: int, *,
                       key_mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
  r"""Log relation matrices :math:`\log\operatorname{softmax}(X_a Y_a^\top/\sqrt{d_r})`.

  ``left`` and ``right`` are ``[B, T, D]``; the result is ``[B, A_r, T, T]`` (rows: positions of
  ``left``; normalised over positions of ``right``). Keys with ``key_mask`` 0 and, with
  ``causal``, keys after the query get probability 0 (log = the dtype's minimum, not −∞, so
  that differences stay finite). float32 or wider.
  """
  dtype = compute_dtype(left, right)
  xl = _heads(left.astype(dtype), num_relation_heads, "left")
  xr = _heads(right.astype(dtype), num_relation_heads, "right")
  logits = jnp.einsum("...atd,...asd->...ats", xl, xr, precision=_HIGHEST)
  logits = logits / math.sqrt(xl.shape[-1])
  t = logits.shape[-1]
  keep = jnp.ones(logits.shape, bool)
  if key_mask is not None:
    keep = keep & (jnp.asarray(key_mask) > 0)[..., None, None, :]
  if causal:
    keep = keep & jnp.tril(jnp.ones((logits.shape[-2], t), bool))
  logits = jnp.where(keep, logits, jnp.finfo(dtype).min)
  return jax.nn.log_softmax(logits, axis=-1)


def relation_kl(student_left: jax.Array, student_right: jax.Array, teacher_left: jax.Array,
                teacher_right: jax.Array, *, num_relation_heads: int,
                mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
  r"""Mean row KL between teacher and student relation matrices of one relation pair.

  .. math::
     \ell = \frac{1}{A_r\,|\mathcal T|}\sum_{a=1}^{A_r}\sum_{t\in\mathcal T}
       \mathrm{KL}\big(R^T_{a,t}\,\big\|\,R^S_{a,t}\big),\qquad
     R_{a} = \operatorname{softmax}\big(X_a Y_a^\top/\sqrt{d_r}\big),

  averaged over the batch too, with :math:`\mathcal T` the query rows whose ``mask`` is 1 and
  :math:`d_r` each model's own head size (MiniLMv2 eq. 4). Masked key columns are excluded from
  both softmaxes.

  NaN behaviour: NaN in a feature gives NaN; a row whose keys are all masked is dropped with
  its query (it is padding).
  """
  s_lp = relation_log_probs(student_left, student_right, num_relation_heads, key_mask=mask,
                            causal=causal)
  t_lp = relation_log_probs(teacher_left, teacher_right, num_relation_heads, key_mask=mask,
                            causal=causal)
  if s_lp.shape != t_lp.shape:
    raise ValueError(f"student and teacher relations differ in shape ({s_lp.shape} vs "
                     f"{t_lp.shape}): batch and sequence axes must match")
  t_p = jnp.exp(t_lp)
  kl_rows = jnp.sum(jnp.where(t_p > 0, t_p * (t_lp - s_lp), 0.0), axis=-1)  # [B, A, T]
  dtype = kl_rows.dtype
  if mask is None:
    return jnp.mean(kl_rows)
  rows = jnp.broadcast_to((jnp.asarray(mask) > 0).astype(dtype)[..., None, :], kl_rows.shape)
  return jnp.sum(kl_rows * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def minilm_relation_loss(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                         *, num_relation_heads: int,
                         relations: Sequence[str] = MINILM_RELATIONS,
                         mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
  r"""MiniLM v2 relation distillation between one student and one teacher layer.

  .. math::
     \mathcal L = \sum_{(X,Y)\in\text{relations}} \frac{1}{A_r T}\sum_{a,t}
       \mathrm{KL}\Big(\operatorname{softmax}\tfrac{X^T_a {Y^T_a}^\top}{\sqrt{d^T_r}}
       \,\Big\|\,\operatorname{softmax}\tfrac{X^S_a {Y^S_a}^\top}{\sqrt{d^S_r}}\Big)

  with the default relations Q–Q, K–K, V–V (MiniLMv2 eq. 5, Wang et al. 2021,
  arXiv 2012.15828). The paper pairs the *last* student layer with an upper-middle teacher
  layer; :func:`distill.layer_map` or a fixed pair picks them. The relation head count
  :math:`A_r` is shared by the two models and must divide both widths; :math:`d_r` is each
  model's own ``D / A_r``, so no projection is needed between widths. The paper's models are
  bidirectional; for a causal LM, ``causal=True`` restricts every relation to keys at or
  before the query (what the model's own attention could see). Computed in float32 or wider.

  NaN behaviour: NaN in any of Q, K, V gives NaN. ``mask`` (``[B, T]``, 1 = real token)
  excludes padded keys from every softmax and padded queries from the mean.

  Args:
    student, teacher: mappings with keys ``"q"``, ``"k"``, ``"v"`` of arrays ``[B, T, D]``
      (D may differ between the two; :func:`split_qkv` makes them from a fused projection).
    num_relation_heads: :math:`A_r` (the paper uses 48 for large teachers; any divisor of both
      widths works here).
    relations: pairs from :data:`RELATIONS`.
    mask: optional ``[B, T]`` padding mask.
    causal: restrict relations to the causal triangle.

  Returns:
    Scalar loss ≥ 0 (sum over relations), 0 when student and teacher features agree.

  Example:
    >>> import jax.numpy as jnp
    >>> x = {n: jnp.ones((1, 4, 8)) * i for i, n in enumerate("qkv", 1)}
    >>> float(minilm_relation_loss(x, x, num_relation_heads=2))
    0.0
  """
  if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
    raise ValueError(f"`num_relation_heads` must be a positive int, got {num_relation_heads!r}")
  if isinstance(relations, str) or not relations:
    raise ValueError(f"`relations` must be a non-empty sequence of {RELATIONS}, got "
                     f"{relations!r}")
  bad = [r for r in relations if r not in RELATIONS]
  if bad:
    raise ValueError(f"`relations` has unknown pairs {bad}; accepted: {RELATIONS}")
  for arg, feats in (("student", student), ("teacher", teacher)):
    for letter in sorted({c for r in relations for c in r}):
      if letter not in feats:
        raise ValueError(f"`{arg}` has no {letter!r} entry (keys: {sorted(feats)})")
      if jnp.ndim(feats[letter]) != 3:
        raise ValueError(f"`{arg}[{letter!r}]` must be [B, T, D], got shape "
                         f"{jnp.shape(feats[letter])}")
  total = jnp.zeros((), jnp.float32)
  for r in relations:
    total = total + relation_kl(jnp.asarray(student[r[0]]), jnp.asarray(student[r[1]]),
                                jnp.asarray(teacher[r[0]]), jnp.asarray(teacher[r[1]]),
                                num_relation_heads=num_relation_heads, mask=mask, causal=causal)
  return total
