"""Importance weights: range, smoothness, monotonicity, the default score and the tagger hook.

References: NumPy entropy and bincount; the rescaled logistic written out in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import _divergences as dv
from distill import _weights as wt


def np_map(s, lo=0.2, hi=3.0, c=0.5, k=6.0):
  sig = lambda x: 1 / (1 + np.exp(-x))
  u = (sig(k * (np.clip(s, 0, 1) - c)) - sig(-k * c)) / (sig(k * (1 - c)) - sig(-k * c))
  return lo + (hi - lo) * u


@pytest.mark.parametrize("center, sharpness", [(0.5, 6.0), (0.3, 2.0), (0.7, 12.0)])
def test_weights_from_scores_range_endpoints_monotone_smooth(center, sharpness):
  s = np.linspace(0, 1, 1001)
  w = np.asarray(jax.jit(lambda s: wt.weights_from_scores(s, center=center,
                                                           sharpness=sharpness))(s))
  np.testing.assert_allclose(w, np_map(s, c=center, k=sharpness), rtol=1e-6, atol=1e-6)  # f32
  np.testing.assert_allclose([w[0], w[-1]], [0.2, 3.0], rtol=1e-6)
  assert np.all(w >= 0.2 - 1e-6) and np.all(w <= 3.0 + 1e-6)
  assert np.all(np.diff(w) > 0)
  # Smooth: a Lipschitz bound from the logistic's slope, no jumps anywhere.
  span = 1 / (1 + np.exp(-sharpness * (1 - center))) - 1 / (1 + np.exp(sharpness * center))
  lip = (3.0 - 0.2) * sharpness / 4 / span             # max slope of the rescaled logistic
  assert np.max(np.abs(np.diff(w))) <= lip * 1e-3 * 1.001
  # Out-of-range scores are clipped.
  np.testing.assert_allclose(wt.weights_from_scores(jnp.asarray([-3.0, 7.0])), [0.2, 3.0],
                             rtol=1e-6)


def test_mask_gives_zero_weight():
  s = jnp.full((2, 3), 0.5)
  mask = jnp.asarray([[True, False, True], [False, True, True]])
  w = wt.weights_from_scores(s, mask=mask)
  assert np.all(np.asarray(w)[~np.asarray(mask)] == 0)
  assert np.all(np.asarray(w)[np.asarray(mask)] > 0.2)


def test_token_entropy_and_counts_match_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 4, 17)) * 2
  p = np.exp(z / 1.5) / np.exp(z / 1.5).sum(-1, keepdims=True)
  with jax.enable_x64(True):
    np.testing.assert_allclose(wt.token_entropy(z, temperature=1.5),
                               -(p * np.log(p)).sum(-1), rtol=1e-10)
  ids = rng.integers(0, 50, size=(7, 9))
  np.testing.assert_array_equal(wt.token_counts(ids, 50), np.bincount(ids.ravel(), minlength=50))


def test_default_scores_entropy_and_rarity():
  v = 10
  uniform = jnp.zeros((1, 2, v))                       # entropy log V -> score 1
  peaked = jnp.zeros((1, 2, v)).at[..., 0].set(50.0)   # entropy ~ 0 -> score 0
  w_u = wt.importance_weights(teacher_entropy=wt.token_entropy(uniform), vocab_size=v)
  w_p = wt.importance_weights(teacher_entropy=wt.token_entropy(peaked), vocab_size=v)
  np.testing.assert_allclose(w_u, 3.0, rtol=1e-5)
  np.testing.assert_allclose(w_p, 0.2, rtol=1e-3)

  # A frequent token (a function word) gets a lower weight than a rare one (an anchor)
  # at the same teacher entropy; rarity follows the add-one IDF of the module docstring.
  corpus = np.array([0] * 900 + [1] * 90 + [2] * 9 + [3])
  counts = wt.token_counts(corpus, v)
  ids = jnp.asarray([[0, 1, 2, 3, 9]])
  ent = jnp.full((1, 5), 0.5 * np.log(v))
  scores = wt.default_importance_scores(token_ids=ids, teacher_entropy=ent, vocab_size=v,
                                        token_counts=counts, entropy_mix=0.25)
  c = np.bincount(corpus, minlength=v) + 1.0
  rarity = -np.log(c / c.sum()) / np.log(c.sum())
  np.testing.assert_allclose(scores[0], 0.25 * 0.5 + 0.75 * rarity[[0, 1, 2, 3, 9]], rtol=1e-5)
  w = np.asarray(wt.importance_weights(ids, teacher_entropy=ent, vocab_size=v,
                                       token_counts=counts))[0]
  assert np.all(np.diff(w) >= 0) and w[0] < w[-1]
  assert np.all((w >= 0.2) & (w <= 3.0))


def test_tagger_hook():
  # A tagger run once over the vocabulary: ids 0-2 function words, 3-5 anchors.
  table = jnp.asarray([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
  ids = jnp.asarray([[0, 3, 6, 1, 4]])
  w = np.asarray(wt.importance_weights(ids, scorer=wt.lookup_scorer(table)))[0]
  np.testing.assert_allclose(w, [0.2, 3.0, 1.6, 0.2, 3.0], rtol=1e-6)

  # Any traceable callable works, jitted, and sees the mask.
  seen = {}

  def scorer(token_ids, mask):
    seen["mask"] = mask is not None
    return (token_ids % 2).astype(jnp.float32)
  mask = jnp.asarray([[True, True, True, True, False]])
  w = jax.jit(lambda i, m: wt.importance_weights(i, scorer=scorer, mask=m))(ids, mask)
  np.testing.assert_allclose(w, [[0.2, 3.0, 0.2, 3.0, 0.0]], rtol=1e-6)
  assert seen["mask"]

  with pytest.raises(ValueError, match="`scorer`"):
    wt.importance_weights(ids, scorer=lambda i, m: jnp.zeros(3))


def test_weights_are_constants_and_feed_the_losses():
  rng = np.random.default_rng(1)
  t = jnp.asarray(rng.normal(size=(2, 5, 11)) * 2, jnp.float32)
  s = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)

  def loss(t):
    w = wt.importance_weights(teacher_entropy=wt.token_entropy(t), vocab_size=11)
    return dv.forward_kl(s, jax.lax.stop_gradient(t), weights=w)
  g = jax.grad(lambda t: jnp.sum(wt.importance_weights(teacher_entropy=wt.token_entropy(t),
                                                       vocab_size=11)))(t)
  assert np.all(np.asarray(g) == 0)
  w = wt.importance_weights(teacher_entropy=wt.token_entropy(t), vocab_size=11)
  d = np.asarray(dv.forward_kl(s, t, reduction="none"))
  np.testing.assert_allclose(loss(t), (d * w).sum() / np.asarray(w).sum(), rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: wt.weights_from_scores(jnp.ones(3), min_weight=3.0, max_weight=0.2), "`min_weight`"),
    (lambda: wt.weights_from_scores(jnp.ones(3), center=1.0), "`center`"),
    (lambda: wt.weights_from_scores(jnp.ones(3), sharpness=0.0), "`sharpness`"),
    (lambda: wt.weights_from_scores(jnp.ones(3), mask=jnp.ones(4, bool)), "`mask`"),
    (lambda: wt.importance_weights(teacher_entropy=jnp.ones(3)), "`vocab_size`"),
    (lambda: wt.importance_weights(vocab_size=5), "`teacher_entropy`"),
    (lambda: wt.importance_weights(token_counts=jnp.ones(5), vocab_size=5), "`token_ids`"),
    (lambda: wt.importance_weights(jnp.zeros(3, int), token_counts=jnp.ones(4), vocab_size=5),
     "`token_counts`"),
    (lambda: wt.importance_weights(jnp.zeros(3, int), teacher_entropy=jnp.ones(4),
                                   token_counts=jnp.ones(5), vocab_size=5), "`teacher_entropy`"),
    (lambda: wt.importance_weights(teacher_entropy=jnp.ones(3), vocab_size=5, entropy_mix=2.0),
     "`entropy_mix`"),
    (lambda: wt.importance_weights(scorer=lambda i, m: i), "`token_ids`"),
    (lambda: wt.token_counts(jnp.zeros(3), 5), "`token_ids`"),
    (lambda: wt.token_counts(jnp.zeros(3, int), 0), "`vocab_size`"),
    (lambda: wt.lookup_scorer(jnp.ones((2, 2))), "`table`"),
    (lambda: wt.token_entropy(jnp.ones(3), temperature=-1.0), "`temperature`"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
