r"""Loss fusion: combining K named loss terms into one scalar objective.

Three fusions share one interface: a Flax NNX module (or a plain callable) called as
``fusion(terms, features=None) -> (total, weights)`` with ``terms`` a dict ``{name: loss}``
holding exactly the fusion's names, ``total`` a float32 scalar to minimise and ``weights`` a
dict ``{name: weight}`` to log.

* :class:`FixedFusion` / :func:`weighted_sum` — the baseline :math:`\sum_i w_i L_i`.
* :class:`UncertaintyFusion` — homoscedastic uncertainty weighting (Kendall, Gal & Cipolla
  2018, "Multi-Task Learning Using Uncertainty to Weigh Losses", arXiv 1705.07115),
  :math:`\sum_i e^{-s_i} L_i + s_i` with learnable log-variances :math:`s_i`.
* :class:`GatedFusion` — a learnable gate (a mixture-of-experts style gating network, Jacobs
  et al. 1991, "Adaptive Mixtures of Local Experts"): a small MLP maps runtime features
  (per-step perplexity, token type, context entropy, ...; see :func:`runtime_features`) to
  softmax weights over the terms, :math:`\sum_i g_i(x) L_i`, trained jointly with the student.

Training a learnable fusion jointly with the student: the fusion's ``nnx.Param`` s are
ordinary parameters. Put the student and the fusion in one container module and hand the
container to one optimizer, so a single gradient of the fused total trains both::

    class Distilled(nnx.Module):
      def __init__(self, student, fusion):
        self.student, self.fusion = student, fusion

    model = Distilled(student, GatedFusion(("kd", "ce"), num_features=4, rngs=nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
      def loss_fn(model):
        terms, features = compute_terms(model.student, batch)  # dict of scalars, [F]
        total, weights = model.fusion(terms, features)
        return total, weights
      (total, weights), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      optimizer.update(model, grads)
      return total, weights

To give the fusion its own learning rate (gates usually want a larger one and no weight
decay), label the parameters by their top-level attribute and use ``optax.multi_transform``::

    tx = optax.multi_transform(
        {"student": optax.adamw(3e-4), "fusion": optax.adam(1e-2)},
        lambda state: jax.tree_util.tree_map_with_path(
            lambda path, _: "fusion" if path[0].key == "fusion" else "student", state))

Caveat on the gate: minimising :math:`\sum_i g_i L_i` over the gate alone moves weight onto
whichever term is currently smallest (that is the point: the gate learns *which* term to
trust in which context), so a term can be starved. ``min_weight`` (a floor on every weight)
and ``entropy_weight`` (a bonus for spread-out weights) are the two brakes; uncertainty
weighting has its own brake, the :math:`+s_i` term.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Terms = Mapping[str, jax.Array]


class LossFusion(Protocol):
  """What every fusion is: ``fusion(terms, features=None) -> (total, weights)``."""

  names: tuple[str, ...]

  def __call__(self, terms: Terms, features: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    ...


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
  names = tuple(names)
  if not names or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`names` must be a non-empty sequence of str, got {names!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"`names` must be distinct, got {names!r}")
  return names


def _stack_terms(names: tuple[str, ...], terms: Terms) -> list[jax.Array]:
  if set(terms) != set(names):
    raise KeyError(f"`terms` must hold exactly the names {list(names)}, got {sorted(terms)}; "
                   f"missing {sorted(set(names) - set(terms))}, "
                   f"unexpected {sorted(set(terms) - set(names))}.")
  return [jnp.asarray(terms[n], jnp.float32) for n in names]


def weighted_sum(terms: Terms, weights: Mapping[str, float | jax.Array]
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Fixed-weight fusion :math:`\sum_i w_i L_i`, in float32.

  Args:
    terms: ``{name: scalar loss}``.
    weights: ``{name: w_i}`` with the same names.

  Returns:
    ``(total, weights)`` with the weights as float32 arrays.

  NaN: a NaN term (with a non-zero weight) makes the total NaN; nothing is masked.
  """
  names = _check_names(tuple(weights))
  values = _stack_terms(names, terms)
  w = {n: jnp.asarray(weights[n], jnp.float32) for n in names}
  total = sum(w[n] * jnp.mean(v) for n, v in zip(names, values))
  return jnp.asarray(total, jnp.float32), w


class FixedFusion(nnx.Module):
  r"""Baseline: constant weights, :math:`L = \sum_i w_i L_i` (no parameters).

  Terms may be scalars or arrays (their mean is taken). ``features`` is accepted and ignored,
  so a fixed fusion drops in wherever a learnable one goes.
  """

  def __init__(self, weights: Mapping[str, float]):
    self.names = _check_names(tuple(weights))
    self.values = tuple(float(weights[n]) for n in self.names)

  def __call__(self, terms: Terms, features: jax.Array | None = None):
    del features
    return weighted_sum(terms, dict(zip(self.names, self.values)))


class UncertaintyFusion(nnx.Module):
  r"""Uncertainty weighting (Kendall et al. 2018): :math:`L = \sum_i e^{-s_i} L_i + s_i`.

  :math:`s_i = \log\sigma_i^2` is a learnable log-variance per term (an ``nnx.Param`` of
  shape [K], initialised to ``init_log_var``). For fixed :math:`L_i > 0` the objective is
  minimised at :math:`s_i = \log L_i`, where every weighted term equals 1: noisy or large
  terms are down-weighted, and the :math:`+s_i` term stops all weights from collapsing to 0.
  Kendall et al.'s regression form is :math:`\tfrac12 e^{-s_i}L_i + \tfrac12 s_i`, the same
  objective up to a factor ½ and the same optimum; this is the form most code uses.

  The returned ``weights`` are the precisions :math:`e^{-s_i}` (not normalised).

  NaN: a NaN term makes the total and the gradient of its :math:`s_i` NaN (nothing masked).
  A term ≤ 0 has no finite optimum (:math:`s_i \to -\infty`): use it only on positive losses.
  """

  def __init__(self, names: Sequence[str], *, init_log_var: float = 0.0):
    self.names = _check_names(names)
    self.log_vars = nnx.Param(jnp.full((len(self.names),), init_log_var, jnp.float32))

  def __call__(self, terms: Terms, features: jax.Array | None = None):
    del features
    values = jnp.stack([jnp.mean(v) for v in _stack_terms(self.names, terms)])
    s = self.log_vars[...].astype(jnp.float32)
    total = jnp.sum(jnp.exp(-s) * values + s)
    return total, {n: jnp.exp(-s[i]) for i, n in enumerate(self.names)}


class GatedFusion(nnx.Module):
  r"""Learnable gate: softmax weights over K terms from runtime features.

  .. math::
     z = W_2\,\tanh(W_1 x + b_1) + b_2,\qquad
     g(x) = m + (1 - K m)\,\mathrm{softmax}(z / \tau),\qquad
     L = \operatorname{mean}_{batch}\Big[\sum_i g_i(x) L_i\Big] - \lambda\,\operatorname{mean}H(g)

  with :math:`m` = ``min_weight``, :math:`\tau` = ``temperature``, :math:`\lambda` =
  ``entropy_weight`` and :math:`H` the entropy of the weights. The output layer starts at
  zero, so the gate starts uniform (:math:`g_i = 1/K`) and :math:`\sum_i g_i = 1` always.

  ``features`` has shape [..., F]: one vector per step ([F]), per sequence ([B, F]) or per
  position ([B, T, F]); the weights then have shape [..., K], and each term must broadcast
  against ``features.shape[:-1]`` (a scalar per step, or per-example / per-position losses).
  Features are passed through ``stop_gradient``: the student is trained on the fused loss, not
  to move the gate's inputs. Keep features O(1) (log-perplexity rather than perplexity;
  :func:`runtime_features` does).

  NaN: non-finite features give NaN weights and a NaN total; a NaN term makes the total NaN.
  Nothing is masked: a NaN is a bug upstream, and hiding it would train the gate on it.

  Args:
    names: the K term names (the order of the gate's outputs).
    num_features: F.
    hidden: width of the hidden layer.
    min_weight: floor :math:`m` on every weight, ``0 <= m < 1/K``.
    temperature: softmax temperature :math:`\tau > 0`.
    entropy_weight: :math:`\lambda \ge 0`.
    rngs: ``nnx.Rngs`` for the first layer's initialisation.
  """

  def __init__(self, names: Sequence[str], num_features: int, *, hidden: int = 32,
               min_weight: float = 0.0, temperature: float = 1.0,
               entropy_weight: float = 0.0, rngs: nnx.Rngs):
    self.names = _check_names(names)
    k = len(self.names)
    if not (isinstance(num_features, int) and num_features >= 1):
      raise ValueError(f"`num_features` must be an int >= 1, got {num_features!r}")
    if not 0.0 <= min_weight < 1.0 / k:
      raise ValueError(f"`min_weight` must be in [0, 1/K) = [0, {1.0 / k:.4g}), "
                       f"got {min_weight!r}")
    if not temperature > 0:
      raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    if not entropy_weight >= 0:
      raise ValueError(f"`entropy_weight` must be >= 0, got {entropy_weight!r}")
    self.num_features = num_features
    self.min_weight = float(min_weight)
    self.temperature = float(temperature)
    self.entropy_weight = float(entropy_weight)
    self.hidden = nnx.Linear(num_features, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, k, kernel_init=nnx.initializers.zeros,
                          bias_init=nnx.initializers.zeros, rngs=rngs)

  def gate(self, features: jax.Array) -> jax.Array:
    """The weights, shape ``features.shape[:-1] + (K,)``; they sum to 1 on the last axis."""
    x = jax.lax.stop_gradient(jnp.asarray(features, jnp.float32))
    if x.ndim == 0 or x.shape[-1] != self.num_features:
      raise ValueError(f"`features` must have last axis {self.num_features}, "
                       f"got shape {x.shape}")
    z = self.out(jnp.tanh(self.hidden(x))) / self.temperature
    k = len(self.names)
    return self.min_weight + (1.0 - k * self.min_weight) * jax.nn.softmax(z, axis=-1)

  def __call__(self, terms: Terms, features: jax.Array | None = None):
    if features is None:
      raise TypeError("GatedFusion needs `features` (shape [..., num_features]).")
    g = self.gate(features)
    values = _stack_terms(self.names, terms)
    batch = g.shape[:-1]
    try:
      stacked = jnp.stack([jnp.broadcast_to(v, batch) for v in values], axis=-1)
    except ValueError as e:
      raise ValueError(f"every term must broadcast to features.shape[:-1] = {batch}; got "
                       f"{[tuple(v.shape) for v in values]}") from e
    total = jnp.mean(jnp.sum(g * stacked, axis=-1))
    if self.entropy_weight:
      entropy = -jnp.sum(g * jnp.log(jnp.maximum(g, 1e-12)), axis=-1)
      total = total - self.entropy_weight * jnp.mean(entropy)
    return total, {n: g[..., i] for i, n in enumerate(self.names)}


def fuse(fusion: LossFusion, terms: Terms, features: jax.Array | None = None
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Calls any fusion: ``(total, weights) = fusion(terms, features)``."""
  return fusion(terms, features)


def runtime_feature_names(*, teacher: bool = False, num_token_types: int = 0) -> tuple[str, ...]:
  """The names of :func:`runtime_features`' columns, in order."""
  names = ["log_perplexity", "student_entropy", "valid_fraction"]
  if teacher:
    names += ["teacher_entropy", "teacher_student_kl"]
  names += [f"token_type_{i}" for i in range(num_token_types)]
  return tuple(names)


def runtime_features(student_logits: jax.Array, labels: jax.Array, *,
                     mask: jax.Array | None = None, teacher_logits: jax.Array | None = None,
                     token_types: jax.Array | None = None, num_token_types: int = 0
                     ) -> jax.Array:
  r"""Per-sequence runtime features for :class:`GatedFusion`, shape [B, F], float32.

  Columns (see :func:`runtime_feature_names`), each a masked mean over positions:
  log-perplexity :math:`\overline{-\log p_s(y_t)}`; student entropy (context entropy)
  :math:`\overline{H(p_s)}`; the fraction of valid positions; with ``teacher_logits``, the
  teacher's entropy and :math:`\overline{KL(p_t\|p_s)}`; with ``token_types`` (int [B, T] in
  ``[0, num_token_types)``, e.g. from a tagger or a vocabulary lookup), the share of each
  type. Entropies are divided by :math:`\log V` so they lie in [0, 1]. The result carries no
  gradient. Take ``.mean(0)`` for one feature vector per step.

  Positions whose label lies outside ``[0, V)`` (the ``-100`` "ignore" convention) count as
  masked. NaN: a sequence with no valid position gets 0 for the means (not NaN); NaN logits at a
  valid position give NaN.
  """
  s = jax.lax.stop_gradient(jnp.asarray(student_logits, jnp.float32))
  b, t, v = s.shape
  labels = jnp.asarray(labels)
  valid = (labels >= 0) & (labels < v)
  m = jnp.ones((b, t), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  m = jnp.where(valid, m, 0.0)
  labels = jnp.where(valid, labels, 0)
  count = jnp.sum(m, axis=1)
  denom = jnp.maximum(count, 1.0)

  def mmean(x):  # where, not x·m: a value at a masked position (NaN, inf) must not leak
    return jnp.sum(jnp.where(m > 0, x * m, 0.0), axis=1) / denom

  logp = jax.nn.log_softmax(s, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  log_v = jnp.log(jnp.float32(v))
  cols = [mmean(nll), mmean(-jnp.sum(jnp.exp(logp) * logp, -1)) / log_v, count / t]
  if teacher_logits is not None:
    logq = jax.nn.log_softmax(
        jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)), axis=-1)
    q = jnp.exp(logq)
    cols += [mmean(-jnp.sum(q * logq, -1)) / log_v, mmean(jnp.sum(q * (logq - logp), -1))]
  if num_token_types:
    if token_types is None:
      raise ValueError("`num_token_types` > 0 needs `token_types` (int [B, T]).")
    onehot = jax.nn.one_hot(token_types, num_token_types, dtype=jnp.float32)
    cols += list(jnp.moveaxis(jnp.sum(onehot * m[..., None], 1) / denom[:, None], -1, 0))
  return jnp.stack(cols, axis=-1)
