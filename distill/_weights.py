r"""Per-position importance weights for token losses: semantic anchors weigh more.

Each predicted position is weighed by how much a wrong prediction there would change the
meaning: content words (entities, verbs, logical connectives — "semantic anchors") weigh more
than function words, with continuous weights in [0.2, 3.0] that move smoothly, not by a
threshold, from confident low-impact positions to uncertain high-impact ones. Such a score can
come from a POS / dependency / semantic-role parser; here the generator is a pluggable function
of a per-position score in [0, 1]:

.. math:: w_i = w_{\min} + (w_{\max} - w_{\min})\,\tilde\sigma(s_i),\qquad
   \tilde\sigma(s) = \frac{\sigma(k(s-c)) - \sigma(-kc)}{\sigma(k(1-c)) - \sigma(-kc)},

a logistic of sharpness :math:`k` centred at :math:`c`, rescaled so that :math:`s = 0` maps to
:math:`w_{\min}` and :math:`s = 1` to :math:`w_{\max}` exactly; smooth and increasing.

The built-in score needs no parser. It mixes two per-position signals in [0, 1]:

* teacher uncertainty, :math:`u_i = H(P_i)/\log V` (normalised entropy of the teacher's
  distribution): the "low-confidence" end;
* rarity of the target token, :math:`r_i = -\log \hat f(y_i) / \log(N + V)` with the add-one
  frequency :math:`\hat f(v) = (c_v + 1)/(N + V)` from corpus counts :math:`c` (``token_counts``):
  function words are the most frequent tokens of any corpus, so they get the lowest rarity
  (the IDF heuristic, Spärck Jones 1972);

:math:`s_i = \lambda u_i + (1-\lambda) r_i` with :math:`\lambda` = ``entropy_mix`` (only the
available signals are used). A user's tagger plugs in as a :data:`Scorer`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from distill import _divergences as dv

Scorer = Callable[[jax.Array, Optional[jax.Array]], jax.Array]
"""Hook for a user's tagger: ``scorer(token_ids, mask) -> scores``.

``token_ids``: ``[B, T]`` integer ids of the *predicted* tokens (the labels: the loss at
position i is about token :math:`y_i`); ``mask``: ``[B, T]`` bool or None. Returns ``[B, T]``
floats in [0, 1]: 0 for a function word, 1 for a semantic anchor (values outside are clipped).
It is called inside :func:`importance_weights`, so it must be traceable when that is jitted;
a host-side parser (spaCy, Stanza, ...) either runs in the data pipeline and its scores go to
:func:`weights_from_scores` directly, or is wrapped in ``jax.pure_callback``. A tagger that
scores each vocabulary entry once becomes a Scorer with :func:`lookup_scorer`.
"""


def token_entropy(logits, *, temperature=1.0) -> jax.Array:
  r"""Shannon entropy :math:`-\sum_v p_v \log p_v` of ``softmax(logits / T)``, in nats.

  ``[..., V] -> [...]``, float32 or wider. NaN logits give NaN; ``-inf`` logits (excluded
  entries) contribute 0.
  """
  dv._check_temperature(temperature)
  dtype = dv.compute_dtype(logits)
  logp = jax.nn.log_softmax(logits.astype(dtype) / jnp.asarray(temperature, dtype), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def token_counts(token_ids, vocab_size: int) -> jax.Array:
  """Occurrences of each id of ``[0, vocab_size)`` in ``token_ids`` (any shape): ``[V]`` float32."""
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f"`vocab_size` must be an int >= 1, got {vocab_size!r}")
  ids = jnp.asarray(token_ids).reshape(-1)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"`token_ids` must be integer, got dtype {ids.dtype}")
  return jnp.zeros(vocab_size, jnp.float32).at[ids].add(1.0, mode="drop")


def smooth_unit_map(scores, *, center=0.5, sharpness=6.0) -> jax.Array:
  r"""The rescaled logistic :math:`\tilde\sigma` of the module docstring: [0, 1] onto [0, 1]."""
  s = jnp.clip(scores, 0.0, 1.0)
  lo = jax.nn.sigmoid(-sharpness * center)
  hi = jax.nn.sigmoid(sharpness * (1.0 - center))
  return (jax.nn.sigmoid(sharpness * (s - center)) - lo) / (hi - lo)


def weights_from_scores(scores, *, mask=None, min_weight=0.2, max_weight=3.0, center=0.5,
                        sharpness=6.0) -> jax.Array:
  r"""Maps ``[...]`` scores in [0, 1] to weights in ``[min_weight, max_weight]``, smoothly.

  .. math:: w = w_{\min} + (w_{\max} - w_{\min})\,\tilde\sigma(s)

  (module docstring); scores are clipped to [0, 1] first. Masked positions get weight 0.
  NaN scores give NaN weights (a NaN from the scorer is not hidden).

  Args:
    scores: ``[...]`` float scores, 0 = function word, 1 = semantic anchor.
    mask: optional ``[...]`` padding mask.
    min_weight, max_weight: the range (default [0.2, 3.0]).
    center: score :math:`c` at the logistic's midpoint, in (0, 1).
    sharpness: :math:`k > 0`; large k approaches a threshold at c, small k a straight line.
  """
  if not 0 <= min_weight <= max_weight:
    raise ValueError(f"`min_weight` and `max_weight` must satisfy 0 <= min_weight <= "
                     f"max_weight, got {min_weight!r}, {max_weight!r}")
  if not 0 < center < 1:
    raise ValueError(f"`center` must be in (0, 1), got {center!r}")
  if not sharpness > 0:
    raise ValueError(f"`sharpness` must be > 0, got {sharpness!r}")
  scores = jnp.asarray(scores)
  if mask is not None and tuple(jnp.shape(mask)) != tuple(scores.shape):
    raise ValueError(f"`mask` must have the shape of `scores` {tuple(scores.shape)}, got "
                     f"{tuple(jnp.shape(mask))}")
  dtype = dv.compute_dtype(scores)
  w = min_weight + (max_weight - min_weight) * smooth_unit_map(scores.astype(dtype),
                                                               center=center,
                                                               sharpness=sharpness)
  if mask is not None:
    w = jnp.where(jnp.asarray(mask).astype(bool), w, jnp.zeros((), dtype))
  return w


def default_importance_scores(*, token_ids=None, teacher_entropy=None, vocab_size=None,
                              token_counts=None, entropy_mix=0.5) -> jax.Array:
  r"""The built-in score :math:`s_i = \lambda u_i + (1-\lambda) r_i` in [0, 1] (module doc).

  Args:
    token_ids: ``[...]`` predicted token ids :math:`y_i` (the labels); needed for rarity.
    teacher_entropy: ``[...]`` teacher entropy in nats (:func:`token_entropy`, or
      :func:`distill.chunked_token_entropy` from the teacher's hidden states).
    vocab_size: V, to normalise the entropy by :math:`\log V` and the counts.
    token_counts: ``[V]`` corpus counts (:func:`token_counts`); with ``token_ids`` gives rarity.
    entropy_mix: :math:`\lambda` in [0, 1] when both signals are given.

  Returns:
    ``[...]`` float32 scores. With only one signal, that signal; with neither, an error.
  """
  dv._check_unit("entropy_mix", entropy_mix)
  if vocab_size is None or not isinstance(vocab_size, int) or vocab_size < 2:
    raise ValueError(f"`vocab_size` must be an int >= 2, got {vocab_size!r}")
  parts = []
  if teacher_entropy is not None:
    u = jnp.asarray(teacher_entropy).astype(jnp.float32) / math.log(vocab_size)
    parts.append(("entropy", jnp.clip(u, 0.0, 1.0)))
  if token_counts is not None:
    if token_ids is None:
      raise ValueError("`token_ids` is required with `token_counts`")
    if tuple(jnp.shape(token_counts)) != (vocab_size,):
      raise ValueError(f"`token_counts` must have shape ({vocab_size},), got "
                       f"{tuple(jnp.shape(token_counts))}")
    c = jnp.asarray(token_counts).astype(jnp.float32)
    total = jnp.sum(c) + vocab_size
    rarity = -jnp.log((c + 1.0) / total) / jnp.log(total)
    parts.append(("rarity", jnp.take(rarity, jnp.asarray(token_ids), mode="clip")))
  if not parts:
    raise ValueError("give `teacher_entropy` and/or `token_ids` with `token_counts`")
  if teacher_entropy is not None and token_counts is not None \
      and jnp.shape(teacher_entropy) != jnp.shape(token_ids):
    raise ValueError(f"`teacher_entropy` shape {jnp.shape(teacher_entropy)} must equal "
                     f"`token_ids` shape {jnp.shape(token_ids)}")
  if len(parts) == 1:
    return parts[0][1]
  return entropy_mix * parts[0][1] + (1.0 - entropy_mix) * parts[1][1]


def lookup_scorer(table) -> Scorer:
  """A :data:`Scorer` from a ``[V]`` table of per-vocabulary scores in [0, 1].

  For a tagger run once over the vocabulary (e.g. 0 for tokens a POS tagger calls DET / ADP /
  AUX / PRON / CCONJ, 1 for NOUN / PROPN / VERB / NUM, 0.5 otherwise).
  """
  table = jnp.asarray(table, jnp.float32)
  if table.ndim != 1:
    raise ValueError(f"`table` must be [V], got shape {tuple(table.shape)}")

  def scorer(token_ids, mask=None):
    del mask
    return jnp.take(table, jnp.asarray(token_ids), mode="clip")
  return scorer


def importance_weights(token_ids=None, *, teacher_entropy=None, vocab_size=None,
                       token_counts=None, scorer: Scorer | None = None, entropy_mix=0.5,
                       mask=None, min_weight=0.2, max_weight=3.0, center=0.5, sharpness=6.0
                       ) -> jax.Array:
  r"""Per-position importance weights in ``[min_weight, max_weight]`` for any token loss.

  ``scorer(token_ids, mask)`` when given (the hook for a user's tagger, :data:`Scorer`),
  otherwise :func:`default_importance_scores`; then :func:`weights_from_scores`. The result is
  a constant (``stop_gradient``): pass it as ``weights=`` to a loss of
  :data:`distill.TOKEN_LOSSES` or to :func:`distill.chunked_token_loss`.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 10))                      # uniform teacher: entropy log 10
    >>> w = importance_weights(teacher_entropy=token_entropy(logits), vocab_size=10)
    >>> bool(jnp.allclose(w, 3.0))
    True

  Returns:
    ``[...]`` float32 weights, 0 at masked positions. NaN scores give NaN weights.
  """
  if scorer is not None:
    if token_ids is None:
      raise ValueError("`token_ids` is required with `scorer`")
    scores = scorer(jnp.asarray(token_ids), mask)
    if tuple(jnp.shape(scores)) != tuple(jnp.shape(token_ids)):
      raise ValueError(f"`scorer` must return the shape of `token_ids` "
                       f"{tuple(jnp.shape(token_ids))}, got {tuple(jnp.shape(scores))}")
  else:
    scores = default_importance_scores(token_ids=token_ids, teacher_entropy=teacher_entropy,
                                       vocab_size=vocab_size, token_counts=token_counts,
                                       entropy_mix=entropy_mix)
  w = weights_from_scores(scores, mask=mask, min_weight=min_weight, max_weight=max_weight,
                          center=center, sharpness=sharpness)
  return jax.lax.stop_gradient(w)
