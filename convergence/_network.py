"""Bayesian convergence network: exact posterior over four binary nodes, conflicts, audit log.

The network has four binary nodes, 1 meaning "stable / achieved":

    structural ──► functional ──► generalisation
         │              │               │
         └──────────────┴───────────────┴──► converged

``structural`` (S): parameter and gradient statistics have settled; ``functional`` (F): the task
metrics have settled; ``generalisation`` (G): held-out / out-of-domain metrics have settled;
``converged`` (C): the run may be called converged. The chain S → F → G encodes "structural
stability is necessary but not sufficient for functional stability, which precedes
generalisation"; C depends on all three, so the default table can say "converged only when all
three hold" (a chain C | G alone is the special case of a table constant over s and f).

The joint has 16 states, so the posterior is computed exactly: the log joint table
log p(s) + log p(f|s) + log p(g|f) + log p(c|s,f,g) + Σ_nodes log λ_node(x_node) is built with
numpyro ``Bernoulli`` factors on a broadcast 2×2×2×2 grid and marginalised with ``logsumexp``
(16 states need no funsor or message passing). It is pure and jit-able.

Evidence is a *soft likelihood* per metric: a pair (log λ(x=0), log λ(x=1)) attached to one
node. Older evidence decays at a per-metric rate: the accumulated log-likelihood follows
ℓ_t = ρ_m ℓ_{t−1} + o_t with ρ_m = 2^(−1/half_life_m), i.e. an observation of age a enters
as λ^(ρ^a) (a tempered likelihood). Fast, noisy metrics (gradients) get a short half-life,
slow ones (generalisation) a long one.

Unsettled dynamics. A run whose loss shifted level, or whose η·λ_c exceeded the
stability limit, within the last ``settle_window`` steps is not converged, however settled the
windowed evidence looks (at the edge of stability the loss falls smoothly for hundreds of
steps between excursions). The context carries the two ages
(``ConflictContext.steps_since_level_shift``, ``steps_since_lr_above_limit``, e.g. from
``convergence.anomaly_detector``); while either is below ``settle_window`` the converged node
receives the observation "unsettled" with likelihood ratio λ(C=1)/λ(C=0) =
``unsettled_likelihood_ratio`` (default 1e-3: P(converged) falls to ≈ 0.01 from the default
tables' 0.95 ceiling) and the decision is "not converged" even if a conflict would freeze a
previous "converged" (``NetworkInfo.unsettled``). Unknown ages (NaN) add nothing.

The maths is pure (``posterior``, ``convergence_network(...).update``); the only side effect,
appending JSON lines to the audit log, lives in :class:`AuditLog`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

NODES = ("structural", "functional", "generalisation", "converged")
NUM_NODES = 4
# Pairs of evidence nodes whose evidence may contradict each other (indices into NODES).
CONFLICT_PAIRS = ((0, 1), (0, 2), (1, 2))

DECISION_NOT_CONVERGED = 0
DECISION_CONVERGED = 1


# ----------------------------------------------------------------------------- tables


class ConvergenceTables(NamedTuple):
  """Conditional probability tables of the network (all entries are P(node = 1 | parents)).

  A pytree of float arrays, so a user can set priors by hand, ``jax.tree.map`` over it, or
  replace it with the posterior mean of :func:`fit_tables`.

  Attributes:
    structural: shape (), P(S = 1).
    functional: shape (2,), ``functional[s]`` = P(F = 1 | S = s).
    generalisation: shape (2,), ``generalisation[f]`` = P(G = 1 | F = f).
    converged: shape (2, 2, 2), ``converged[s, f, g]`` = P(C = 1 | S = s, F = f, G = g).
  """

  structural: jax.Array
  functional: jax.Array
  generalisation: jax.Array
  converged: jax.Array


_TABLE_SHAPES = {"structural": (), "functional": (2,), "generalisation": (2,),
                 "converged": (2, 2, 2)}


def default_tables() -> ConvergenceTables:
  """Weakly informative default priors.

  S is a coin flip a priori; F is rare without S (0.1) and likely with it (0.7); G likewise
  (0.1 / 0.7); C is a soft AND of the three (0.95 when all hold, ≤ 0.05 otherwise).
  """
  conv = np.full((2, 2, 2), 0.02, np.float32)
  conv[1, 1, 0] = 0.05
  conv[1, 1, 1] = 0.95
  return ConvergenceTables(
      structural=jnp.float32(0.5),
      functional=jnp.asarray([0.1, 0.7], jnp.float32),
      generalisation=jnp.asarray([0.1, 0.7], jnp.float32),
      converged=jnp.asarray(conv))


def check_tables(tables: ConvergenceTables) -> ConvergenceTables:
  """Validates shapes and (when concrete) that entries lie in [0, 1]; returns float32 tables.

  Raises ValueError naming the table. NaN entries are rejected (a NaN table would make every
  posterior NaN).
  """
  if not isinstance(tables, ConvergenceTables):
    raise TypeError(f"`tables` must be a ConvergenceTables, got {type(tables).__name__}")
  out = {}
  for name, shape in _TABLE_SHAPES.items():
    arr = jnp.asarray(getattr(tables, name), jnp.float32)
    if arr.shape != shape:
      raise ValueError(f"`tables.{name}` must have shape {shape}, got {arr.shape}")
    if not isinstance(arr, jax.core.Tracer):
      a = np.asarray(arr)
      if not np.all((a >= 0) & (a <= 1)):
        raise ValueError(f"`tables.{name}` entries must be probabilities in [0, 1] "
                         f"(NaN not allowed), got {a}")
    out[name] = arr
  return ConvergenceTables(**out)


# ----------------------------------------------------------------------------- evidence


def soft_likelihood(strength: jax.Array, direction: jax.Array, *,
                    max_log_ratio: float = math.log(9.0)) -> jax.Array:
  """Per-metric soft likelihoods from (strength, direction) pairs, as a (M, 2) log table.

  The adapter for windowed evidence (:func:`convergence.evidence_tracker`): a metric with ``direction`` +1 supports its
  node's "stable" state, −1 its opposite, 0 nothing; ``strength`` in [0, 1] scales the log
  likelihood ratio: log λ(1) − log λ(0) = direction · strength · ``max_log_ratio`` (default
  log 9: full-strength evidence moves even odds to 9:1). Rows are centred, (−r/2, r/2).

  NaN in either input gives a (0, 0) row: no evidence.
  """
  strength = jnp.asarray(strength, jnp.float32)
  direction = jnp.asarray(direction, jnp.float32)
  r = jnp.clip(strength, 0.0, 1.0) * jnp.sign(direction) * max_log_ratio
  r = jnp.where(jnp.isfinite(r), r, 0.0)
  return jnp.stack([-0.5 * r, 0.5 * r], axis=-1)


def decay_factors(half_lives: Sequence[float]) -> jax.Array:
  """ρ_m = 2^(−1/half_life_m) per metric; ``inf`` means no decay. Raises on half-life ≤ 0 or NaN."""
  h = np.asarray(half_lives, np.float64)
  if h.ndim != 1 or np.any(~(h > 0)):
    raise ValueError(f"`half_lives` must be a 1-D sequence of positive numbers (inf allowed), "
                     f"got {half_lives!r}")
  return jnp.asarray(np.where(np.isinf(h), 1.0, 2.0 ** (-1.0 / h)), jnp.float32)


def decay_evidence(accumulated: jax.Array, observed: jax.Array, rho: jax.Array) -> jax.Array:
  """One step of evidence decay: ℓ_t = ρ ⊙ ℓ_{t−1} + o_t, per metric (rows of (M, 2) arrays).

  Closed form after T steps from zero: ℓ_T = Σ_k ρ^(T−k) o_k. A non-finite observation row
  counts as "not observed" (adds 0) while the old evidence still decays.
  """
  observed = jnp.where(jnp.isfinite(observed), observed, 0.0)
  return rho[:, None] * accumulated + observed


def node_log_likelihood(metric_log_lik: jax.Array, metric_nodes: jax.Array) -> jax.Array:
  """Sums per-metric (M, 2) log-likelihoods into per-node (4, 2) log-likelihoods.

  ``metric_nodes[m]`` is the node index of metric m. NaN rows propagate to their node.
  """
  one_hot = jax.nn.one_hot(metric_nodes, NUM_NODES, dtype=metric_log_lik.dtype)  # (M, 4)
  return one_hot.T @ metric_log_lik


# ----------------------------------------------------------------------------- posterior


class Posterior(NamedTuple):
  """Exact posterior of the network.

  Attributes:
    marginals: shape (4,), P(node = 1 | evidence) in the order of ``NODES``.
    log_evidence: log p(evidence) (log of the normaliser).
    log_joint: shape (2, 2, 2, 2), the normalised log joint posterior, axes (s, f, g, c).
  """

  marginals: jax.Array
  log_evidence: jax.Array
  log_joint: jax.Array


def joint_log_table(tables: ConvergenceTables, node_log_lik: jax.Array) -> jax.Array:
  """Unnormalised log p(s, f, g, c, evidence) as a (2, 2, 2, 2) array, axes (s, f, g, c).

  Each CPT factor is a numpyro ``Bernoulli(probs=...)`` log-density evaluated on the broadcast
  grid (numpyro clamps probabilities to [tiny, 1 − eps], so a 0 or 1 entry costs a relative
  error below 1e-7 instead of −inf). ``node_log_lik`` is (4, 2): log λ_node(0), log λ_node(1).
  NaN anywhere gives NaN entries.
  """
  s = jnp.arange(2).reshape(2, 1, 1, 1)
  f = jnp.arange(2).reshape(1, 2, 1, 1)
  g = jnp.arange(2).reshape(1, 1, 2, 1)
  c = jnp.arange(2).reshape(1, 1, 1, 2)
  lp = (dist.Bernoulli(probs=tables.structural).log_prob(s)
        + dist.Bernoulli(probs=tables.functional[s]).log_prob(f)
        + dist.Bernoulli(probs=tables.generalisation[f]).log_prob(g)
        + dist.Bernoulli(probs=tables.converged[s, f, g]).log_prob(c))
  return (lp + node_log_lik[0][s] + node_log_lik[1][f] + node_log_lik[2][g]
          + node_log_lik[3][c])


def posterior(tables: ConvergenceTables, node_log_lik: jax.Array | None = None) -> Posterior:
  """Exact posterior marginals by enumeration: P(x_i = 1 | e) = Σ_{x: x_i=1} p(x, e) / Σ_x p(x, e).

  Args:
    tables: the conditional tables (:class:`ConvergenceTables`).
    node_log_lik: (4, 2) soft log-likelihoods per node (see :func:`node_log_likelihood`);
      None means no evidence (the prior marginals).

  Returns:
    :class:`Posterior`. Jit-able. Evidence that is impossible under the tables (every joint
    state −inf) or NaN input gives NaN marginals.
  """
  if node_log_lik is None:
    node_log_lik = jnp.zeros((NUM_NODES, 2), jnp.float32)
  lj = joint_log_table(tables, node_log_lik)
  log_z = logsumexp(lj)
  norm = lj - log_z
  marg = jnp.stack([
      jnp.exp(logsumexp(norm, axis=tuple(a for a in range(4) if a != i))[1])
      for i in range(NUM_NODES)])
  # float32 rounding can put a certain marginal a few ulps above 1.
  return Posterior(marginals=jnp.clip(marg, 0.0, 1.0), log_evidence=log_z, log_joint=norm)


# ----------------------------------------------------------------------------- conflicts


class ConflictContext(NamedTuple):
  """Training context the cause rules read; every field a float scalar, NaN = unknown.

  Attributes:
    lr_sharpness: recent η·λ_c (the step raises the batch loss when it exceeds 2).
    train_loss_slope: standardised trend of the training loss (negative = improving).
    gap_slope: standardised trend of the generalisation gap, held-out minus train loss
      (positive = widening).
    grad_norm_z: robust z-score of the recent gradient norm.
    nonfinite_rate: fraction of recent steps with non-finite values or loss-scale reductions.
    data_drift: standardised drift of input / batch statistics (or of held-out loss variance
      across batches) from their long-run baseline.
    steps_since_level_shift: steps since the training loss last shifted level (0 = this
      step; inf = never; NaN = unknown). Read by the unsettled rule, not by the cause rules.
    steps_since_lr_above_limit: steps since η·λ_c was last measured above the stability
      limit (same conventions).
  """

  lr_sharpness: jax.Array
  train_loss_slope: jax.Array
  gap_slope: jax.Array
  grad_norm_z: jax.Array
  nonfinite_rate: jax.Array
  data_drift: jax.Array
  steps_since_level_shift: jax.Array = math.nan
  steps_since_lr_above_limit: jax.Array = math.nan


def unknown_context() -> ConflictContext:
  """A context with every field unknown (NaN)."""
  nan = jnp.float32(jnp.nan)
  return ConflictContext(*([nan] * len(ConflictContext._fields)))


class CauseRule(NamedTuple):
  """A candidate cause of a conflict: a name and a score (higher = more likely).

  ``score(node_llr, context)`` gets the (4,) per-node evidence log-likelihood ratios
  log λ(1) − log λ(0) and a :class:`ConflictContext`, and returns a float scalar (jnp ops only,
  it runs under jit). Scores act as log-odds: ranked, and softmax-normalised to probabilities.
  """

  name: str
  score: Callable[[jax.Array, ConflictContext], jax.Array]


def _z(x, lo=-3.0, hi=3.0):
  # Unknown context (NaN) contributes nothing; clipping keeps one feature from dominating.
  return jnp.where(jnp.isfinite(x), jnp.clip(x, lo, hi), 0.0)


def _pattern(llr, node, sign):
  # How strongly node's evidence points the given way, in [0, 3].
  return jnp.clip(sign * llr[node], 0.0, 3.0)


def _lr_too_high(llr, ctx):
  return (2.0 * _z(ctx.lr_sharpness - 2.0, -1.5, 3.0) + 0.5 * _z(ctx.grad_norm_z)
          + 0.5 * _z(ctx.train_loss_slope) + 0.3 * _pattern(llr, 0, -1.0))


def _overfitting(llr, ctx):
  return (1.5 * _z(ctx.gap_slope) + 0.75 * _z(-ctx.train_loss_slope)
          + 0.3 * _pattern(llr, 2, -1.0) + 0.2 * _pattern(llr, 1, 1.0))


def _data_problem(llr, ctx):
  return (2.0 * _z(ctx.data_drift) + 0.3 * _pattern(llr, 1, -1.0)
          + 0.2 * _pattern(llr, 0, 1.0) - 0.5)


def _precision_overflow(llr, ctx):
  rate = jnp.where(jnp.isfinite(ctx.nonfinite_rate), ctx.nonfinite_rate, 0.0)
  return 4.0 * jnp.clip(20.0 * rate, 0.0, 3.0) + 0.3 * _z(ctx.grad_norm_z) - 1.0


DEFAULT_RULES = (
    CauseRule("learning_rate_too_high", _lr_too_high),
    CauseRule("overfitting", _overfitting),
    CauseRule("data_problem", _data_problem),
    CauseRule("precision_overflow", _precision_overflow),
)


class Conflict(NamedTuple):
  """Contradictory evidence between nodes and its ranked candidate causes.

  Attributes:
    active: whether any pair in ``CONFLICT_PAIRS`` conflicts at the threshold.
    strength: (3,) per pair: min(|llr_i|, |llr_j|) when the signs differ, else 0.
    pair: index into ``CONFLICT_PAIRS`` of the strongest pair.
    cause_scores: (R,) rule scores; cause_probs: their softmax; cause_rank: indices into the
      rule library, most likely first.
  """

  active: jax.Array
  strength: jax.Array
  pair: jax.Array
  cause_scores: jax.Array
  cause_probs: jax.Array
  cause_rank: jax.Array


def detect_conflict(node_llr: jax.Array, context: ConflictContext, *,
                    threshold: float = math.log(9.0),
                    rules: Sequence[CauseRule] = DEFAULT_RULES) -> Conflict:
  """Flags evidence that pulls two nodes in opposite directions and ranks candidate causes.

  Nodes i, j conflict when their evidence log-likelihood ratios have opposite signs and both
  exceed ``threshold`` in magnitude (default log 9: each side alone would move even odds to
  9:1), e.g. "structure stable while generalisation worsens". The causes are scored by
  ``rules`` whether or not a conflict is active (so a caller can always inspect them).

  NaN in ``node_llr`` gives no conflict for the pairs it touches; NaN context fields are
  treated as unknown by the default rules.
  """
  a = jnp.stack([node_llr[i] for i, _ in CONFLICT_PAIRS])
  b = jnp.stack([node_llr[j] for _, j in CONFLICT_PAIRS])
  strength = jnp.where(a * b < 0, jnp.minimum(jnp.abs(a), jnp.abs(b)), 0.0)
  strength = jnp.where(jnp.isfinite(strength), strength, 0.0)
  scores = jnp.stack([jnp.asarray(r.score(node_llr, context), jnp.float32) for r in rules])
  return Conflict(active=jnp.max(strength) >= threshold, strength=strength,
                  pair=jnp.argmax(strength).astype(jnp.int32), cause_scores=scores,
                  cause_probs=jax.nn.softmax(scores),
                  cause_rank=jnp.argsort(-scores).astype(jnp.int32))


# ----------------------------------------------------------------------------- monitor


class NetworkInfo(NamedTuple):
  """Diagnostics of the last update (log them outside jit).

  Attributes:
    marginals: (4,) posterior P(node = 1 | decayed evidence).
    log_evidence: log p(evidence).
    node_llr: (4,) decayed evidence log-likelihood ratio per node.
    wanted: whether the posterior alone says converged (P(C=1) ≥ threshold).
    decision: the decision after freezing (``DECISION_*``).
    frozen: whether a conflict froze the decision this step (never while unsettled).
    conflict: the :class:`Conflict` of this step.
    unsettled: a loss level shift or η·λ_c above the limit lies inside the settle window:
      the converged node got the "unsettled" observation and the decision is "not converged".
  """

  marginals: jax.Array
  log_evidence: jax.Array
  node_llr: jax.Array
  wanted: jax.Array
  decision: jax.Array
  frozen: jax.Array
  conflict: Conflict
  unsettled: jax.Array


class NetworkState(NamedTuple):
  """State of the convergence monitor: tables, decayed evidence, last decision, info."""

  count: jax.Array
  tables: ConvergenceTables
  log_lik: jax.Array
  decision: jax.Array
  info: NetworkInfo


class ConvergenceNetwork(NamedTuple):
  """Pure ``init(tables=None) -> state`` and ``update(state, observed, context=None) -> state``."""

  init: Callable[..., NetworkState]
  update: Callable[..., NetworkState]
  metric_names: tuple[str, ...]
  rule_names: tuple[str, ...]


def convergence_network(
    metric_nodes: Sequence[int | str],
    half_lives: Sequence[float],
    *,
    metric_names: Sequence[str] | None = None,
    threshold: float = 0.95,
    conflict_threshold: float = math.log(9.0),
    rules: Sequence[CauseRule] = DEFAULT_RULES,
    settle_window: float = 200.0,
    unsettled_likelihood_ratio: float = 1e-3,
) -> ConvergenceNetwork:
  r"""Streaming convergence judgement: decayed soft evidence → exact posterior → decision.

  Each ``update(state, observed, context)`` takes the (M, 2) per-metric log-likelihoods of
  this step (``soft_likelihood`` builds them from strength/direction pairs; a NaN row means
  "not observed this step"), decays the accumulated evidence
  (:math:`\ell_t=\rho_m\ell_{t-1}+o_t`), computes the exact posterior (:func:`posterior`),
  checks for conflicts (:func:`detect_conflict`), and decides: converged when
  P(C = 1 | e) ≥ ``threshold``; while a conflict is active the decision is *frozen* at its
  previous value (neither promoted nor demoted) until the conflict resolves. While the
  context reports a loss level shift or η·λ_c above the limit less than ``settle_window``
  steps ago, the run is *unsettled* (module docstring): hard evidence against the converged
  node and the decision "not converged", frozen or not.

  Example::

    net = convergence_network(["structural", "functional", "generalisation"], [50, 200, 1000])
    state = net.init()
    obs = soft_likelihood(strengths, directions)          # (3, 2)
    state = jax.jit(net.update)(state, obs, context)
    state.info.marginals[3], state.info.decision

  Args:
    metric_nodes: the node of each metric, by index or by name in ``NODES``.
    half_lives: per-metric evidence half-life in steps (``inf``: never forget).
    metric_names: names for the audit log (default ``metric_<m>``).
    threshold: posterior probability of C = 1 needed to call the run converged.
    conflict_threshold: |log-likelihood ratio| both sides of a pair must exceed.
    rules: the cause library (:data:`DEFAULT_RULES`; add your own :class:`CauseRule`).
    settle_window: steps a level shift or η·λ_c > limit keeps the run unsettled: the
      evidence window, the span of samples the evidence depends on
      (``experiments.monitoring`` passes its metrics' largest long window or baseline span);
      ``inf``: forever, 0: never.
    unsettled_likelihood_ratio: λ(C=1)/λ(C=0) of the "unsettled" observation, in (0, 1].

  Returns:
    A :class:`ConvergenceNetwork` of pure, jit-able closures; tables live in the state
    (``init(tables)``), so changing them does not recompile.
  """
  nodes = []
  for n in metric_nodes:
    if isinstance(n, str):
      if n not in NODES:
        raise ValueError(f"`metric_nodes` entries must be one of {NODES} or 0..3, got {n!r}")
      n = NODES.index(n)
    if not (isinstance(n, (int, np.integer)) and 0 <= n < NUM_NODES):
      raise ValueError(f"`metric_nodes` entries must be one of {NODES} or 0..3, got {n!r}")
    nodes.append(int(n))
  if not nodes:
    raise ValueError("`metric_nodes` must name at least one metric")
  rho = decay_factors(half_lives)
  if rho.shape[0] != len(nodes):
    raise ValueError(f"`half_lives` must have one entry per metric ({len(nodes)}), "
                     f"got {rho.shape[0]}")
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"`threshold` must lie in (0, 1), got {threshold!r}")
  if metric_names is None:
    metric_names = tuple(f"metric_{m}" for m in range(len(nodes)))
  if len(metric_names) != len(nodes):
    raise ValueError(f"`metric_names` must have {len(nodes)} entries, got {len(metric_names)}")
  rules = tuple(rules)
  if not rules:
    raise ValueError("`rules` must hold at least one CauseRule")
  if not settle_window >= 0:
    raise ValueError(f"`settle_window` must be >= 0 (inf allowed), got {settle_window!r}")
  if not 0.0 < unsettled_likelihood_ratio <= 1.0:
    raise ValueError("`unsettled_likelihood_ratio` must lie in (0, 1], got "
                     f"{unsettled_likelihood_ratio!r}")
  node_idx = jnp.asarray(nodes, jnp.int32)
  num_metrics = len(nodes)
  # The "unsettled" observation on the converged node, centred like soft_likelihood's rows.
  half = 0.5 * math.log(unsettled_likelihood_ratio)
  unsettled_row = jnp.zeros((NUM_NODES, 2), jnp.float32).at[3].set(
      jnp.asarray([-half, half], jnp.float32))

  def _step(tables, log_lik, previous, context):
    ages = jnp.stack([jnp.asarray(context.steps_since_level_shift, jnp.float32),
                      jnp.asarray(context.steps_since_lr_above_limit, jnp.float32)])
    unsettled = jnp.any(ages < settle_window)  # NaN (unknown) compares False
    nll = node_log_likelihood(log_lik, node_idx)
    nll = nll + jnp.where(unsettled, unsettled_row, 0.0)
    post = posterior(tables, nll)
    llr = nll[:, 1] - nll[:, 0]
    conflict = detect_conflict(llr, context, threshold=conflict_threshold, rules=rules)
    wanted = post.marginals[3] >= threshold
    frozen = conflict.active & ~unsettled
    decision = jnp.where(unsettled, DECISION_NOT_CONVERGED,
                         jnp.where(frozen, previous, wanted.astype(jnp.int32)))
    return NetworkInfo(marginals=post.marginals, log_evidence=post.log_evidence,
                       node_llr=llr, wanted=wanted, decision=decision.astype(jnp.int32),
                       frozen=frozen, conflict=conflict, unsettled=unsettled)

  def init_fn(tables: ConvergenceTables | None = None) -> NetworkState:
    tables = check_tables(default_tables() if tables is None else tables)
    log_lik = jnp.zeros((num_metrics, 2), jnp.float32)
    prev = jnp.int32(DECISION_NOT_CONVERGED)
    # One compiled program: op by op, the posterior's few hundred small operations would each
    # be compiled on first use (~6 s on a CPU).
    info = jax.jit(_step)(tables, log_lik, prev, unknown_context())
    return NetworkState(count=jnp.int32(0), tables=tables, log_lik=log_lik, decision=prev,
                        info=info)

  def update_fn(state: NetworkState, observed: jax.Array,
                context: ConflictContext | None = None) -> NetworkState:
    observed = jnp.asarray(observed, jnp.float32)
    if observed.shape != (num_metrics, 2):
      raise ValueError(f"`observed` must have shape ({num_metrics}, 2) (log λ(0), log λ(1) per "
                       f"metric), got {observed.shape}")
    if context is None:
      context = unknown_context()
    log_lik = decay_evidence(state.log_lik, observed, rho)
    info = _step(state.tables, log_lik, state.decision, context)
    return NetworkState(count=state.count + 1, tables=state.tables, log_lik=log_lik,
                        decision=info.decision, info=info)

  return ConvergenceNetwork(init=init_fn, update=update_fn, metric_names=tuple(metric_names),
                            rule_names=tuple(r.name for r in rules))


# ----------------------------------------------------------------------------- learning


class FittedTables(NamedTuple):
  """Result of :func:`fit_tables`: posterior mean and standard deviation tables and samples."""

  mean: ConvergenceTables
  std: ConvergenceTables
  samples: ConvergenceTables


def _runs_log_lik(states: np.ndarray) -> jax.Array:
  # Hard evidence per run: observed node states become (0, −inf) / (−inf, 0) rows, missing
  # ones (−1) (0, 0); the same enumeration then marginalises the missing nodes exactly.
  obs = states[..., None] == np.arange(2)
  ll = np.where(states[..., None] < 0, 0.0, np.where(obs, 0.0, -np.inf))
  return jnp.asarray(ll, jnp.float32)


def fit_tables(node_states: Any, *, prior: ConvergenceTables | None = None,
               concentration: float = 2.0, num_warmup: int = 300, num_samples: int = 300,
               seed: int = 0) -> FittedTables:
  """Learns the conditional tables from past runs with NUTS (numpyro.infer.MCMC).

  Model: every table entry p ~ Beta(κ p₀, κ (1 − p₀)) around the prior table p₀ (clipped to
  [0.02, 0.98]) with concentration κ; each run contributes log Σ_{unobserved} p(s, f, g, c),
  computed by the same exact enumeration as :func:`posterior`, so runs with unknown node
  states (−1) are marginalised exactly rather than dropped.

  Args:
    node_states: (R, 4) integers in {0, 1, −1}: the states of (S, F, G, C) judged for each
      past run (−1 = not known). NaN is read as −1 (unknown).
    prior: prior tables p₀ (default :func:`default_tables`).
    concentration: κ, the prior's weight in pseudo-runs.
    num_warmup, num_samples, seed: MCMC settings (one chain).

  Returns:
    :class:`FittedTables`; ``mean`` can be passed to ``convergence_network(...).init``.
  """
  from numpyro.infer import MCMC, NUTS

  arr = np.asarray(node_states, np.float64)
  if arr.ndim != 2 or arr.shape[1] != NUM_NODES or arr.shape[0] == 0:
    raise ValueError(f"`node_states` must have shape (R, 4) with R ≥ 1, got {arr.shape}")
  arr = np.where(np.isnan(arr), -1, arr)
  if not np.all(np.isin(arr, (-1, 0, 1))):
    raise ValueError("`node_states` entries must be 0, 1 or -1 (unknown)")
  if concentration <= 0:
    raise ValueError(f"`concentration` must be > 0, got {concentration!r}")
  prior = check_tables(default_tables() if prior is None else prior)
  # At most 3^4 distinct judgement patterns: weight each by its count instead of one term
  # per run, so the cost of a gradient does not grow with the number of runs.
  patterns, counts = np.unique(arr.astype(np.int64), axis=0, return_counts=True)
  run_ll = _runs_log_lik(patterns)
  weights = jnp.asarray(counts, jnp.float32)

  # One flat sample site for all 13 entries keeps the traced model (and compile time) small.
  flat0, unravel = jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda p: jnp.clip(p, 0.02, 0.98), prior))

  # numpyro runs the model eagerly while initialising; one jitted likelihood keeps that from
  # compiling hundreds of single ops.
  @jax.jit
  def log_lik(flat):
    tables = unravel(flat)
    per_run = jax.vmap(lambda ll: logsumexp(joint_log_table(tables, ll)))(run_ll)
    return jnp.sum(weights * per_run)

  def model():
    flat = numpyro.sample("tables", dist.Beta(concentration * flat0,
                                              concentration * (1 - flat0)).to_event(1))
    numpyro.factor("runs", log_lik(flat))

  mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples,
              progress_bar=False)
  mcmc.run(jax.random.key(seed))
  samples = jax.vmap(unravel)(mcmc.get_samples()["tables"])
  return FittedTables(mean=jax.tree.map(lambda x: jnp.mean(x, 0), samples),
                      std=jax.tree.map(lambda x: jnp.std(x, 0), samples),
                      samples=samples)


# ----------------------------------------------------------------------------- audit log


def _jsonable(x):
  a = np.asarray(x)
  if a.dtype.kind == "f":
    # JSON has no NaN / inf: write null so every line parses with any JSON reader.
    return [None if not np.isfinite(v) else float(v) for v in a.ravel()] if a.ndim else (
        float(a) if np.isfinite(a) else None)
  if a.dtype.kind == "b":
    return a.tolist()
  if a.dtype.kind in "iu":
    return a.tolist()
  return str(x)


def decision_record(step: int, info: NetworkInfo, *,
                    observed: Any = None, context: ConflictContext | None = None,
                    metric_names: Sequence[str] = (), rule_names: Sequence[str] = (),
                    extra: dict | None = None) -> dict:
  """One audit entry (a JSON-ready dict) for a decision; pure, call it outside jit.

  Keys: ``step``, ``inputs`` (this step's per-metric log-likelihoods by name, the decayed node
  log-likelihood ratios, the context), ``posterior`` (marginals by node name, log evidence),
  ``decision`` ("converged" / "not_converged"), ``wanted``, ``frozen``, ``conflict`` (pair,
  strength, ranked causes with probabilities) and a human-readable ``reason``. Non-finite
  numbers become ``null``.
  """
  marg = np.asarray(info.marginals, np.float64)
  llr = np.asarray(info.node_llr, np.float64)
  c = info.conflict
  inputs: dict[str, Any] = {"node_llr": dict(zip(NODES, _jsonable(llr)))}
  if observed is not None:
    obs = np.asarray(observed, np.float64)
    names = list(metric_names) or [f"metric_{m}" for m in range(obs.shape[0])]
    inputs["observed_log_lik"] = {n: _jsonable(row) for n, row in zip(names, obs)}
  if context is not None:
    inputs["context"] = {k: _jsonable(v) for k, v in context._asdict().items()}
  rank = [int(i) for i in np.asarray(c.cause_rank)]
  probs = np.asarray(c.cause_probs, np.float64)
  rnames = list(rule_names) or [f"rule_{i}" for i in range(len(rank))]
  causes = [{"cause": rnames[i], "prob": _jsonable(probs[i])} for i in rank]
  pair = CONFLICT_PAIRS[int(c.pair)]
  frozen = bool(info.frozen)
  unsettled = bool(info.unsettled)
  decision = "converged" if int(info.decision) == DECISION_CONVERGED else "not_converged"
  p_c = marg[3]
  if unsettled:
    why = []
    if context is not None:
      for field, what in (("steps_since_level_shift", "loss level shift"),
                          ("steps_since_lr_above_limit", "η·λ_c above the limit")):
        age = np.asarray(getattr(context, field), np.float64)
        if np.isfinite(age):
          why.append(f"{what} {int(age)} steps ago")
    reason = (f"not converged: unsettled dynamics inside the evidence window"
              f"{' (' + '; '.join(why) + ')' if why else ''}; P(converged)={p_c:.4f}")
  elif frozen:
    a, b = NODES[pair[0]], NODES[pair[1]]
    sa = "+" if llr[pair[0]] > 0 else "-"
    sb = "+" if llr[pair[1]] > 0 else "-"
    reason = (f"frozen at {decision}: conflict {a}{sa} vs {b}{sb} "
              f"(strength {float(np.asarray(c.strength)[int(c.pair)]):.2f}); "
              f"most likely cause {causes[0]['cause']} (p={probs[rank[0]]:.2f})")
  elif decision == "converged":
    reason = f"converged: P(converged)={p_c:.4f} >= threshold"
  else:
    reason = f"not converged: P(converged)={p_c:.4f} below threshold"
  rec = {
      "step": int(step),
      "inputs": inputs,
      "posterior": {**dict(zip(NODES, _jsonable(marg))),
                    "log_evidence": _jsonable(info.log_evidence)},
      "decision": decision,
      "wanted": bool(info.wanted),
      "frozen": frozen,
      "unsettled": unsettled,
      "conflict": {"active": bool(c.active), "pair": [NODES[pair[0]], NODES[pair[1]]],
                   "strength": _jsonable(c.strength), "causes": causes},
      "reason": reason,
  }
  if extra:
    rec["extra"] = extra
  return rec


class AuditLog:
  """Appends decision records to a JSON-lines file (one object per line, flushed each time).

  The only I/O in this module. ``AuditLog(path).append(decision_record(step, info, ...))``;
  :meth:`read` parses the file back. Records are written with ``allow_nan=False``: a NaN that
  bypassed :func:`decision_record` (e.g. inside ``extra``) raises ValueError instead of
  writing a line other JSON readers reject.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    parent = os.path.dirname(self.path)
    if parent:
      os.makedirs(parent, exist_ok=True)

  def append(self, record: dict) -> None:
    line = json.dumps(record, allow_nan=False, sort_keys=False)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line + "\n")
      f.flush()

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
