"""Loss fusion: fixed weights vs NumPy, Kendall's analytic optimum, the gate learning on a toy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from distill import _fusion as fusion


@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_weights_equal_numpy_weighted_sum(seed):
  rng = np.random.default_rng(seed)
  names = ("kd", "ce", "feat")
  w = dict(zip(names, rng.uniform(0, 2, 3).tolist()))
  terms = {n: jnp.asarray(rng.uniform(0, 5), jnp.float32) for n in names}
  total, weights = jax.jit(fusion.FixedFusion(w).__call__)(terms)
  expected = sum(np.float32(w[n]) * np.float32(terms[n]) for n in names)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(fusion.weighted_sum(terms, w)[0], expected, rtol=1e-6)
  assert {n: float(v) for n, v in weights.items()} == pytest.approx(w, rel=1e-6)


def test_terms_must_match_names():
  f = fusion.FixedFusion({"a": 1.0, "b": 2.0})
  with pytest.raises(KeyError, match="missing"):
    f({"a": jnp.float32(1.0)})


def test_uncertainty_weighting_reaches_log_of_losses():
  names = ("a", "b", "c")
  losses = {"a": 0.3, "b": 2.0, "c": 7.5}
  terms = {n: jnp.float32(v) for n, v in losses.items()}
  f = fusion.UncertaintyFusion(names)
  opt = nnx.Optimizer(f, optax.adam(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(f, opt):
    (total, _), g = nnx.value_and_grad(lambda f: f(terms), has_aux=True)(f)
    opt.update(f, g)
    return total

  for _ in range(300):
    step(f, opt)
  # Analytic optimum of exp(-s) L + s: s* = log L, weights exp(-s*) = 1/L.
  np.testing.assert_allclose(f.log_vars[...], np.log([0.3, 2.0, 7.5]), atol=1e-3)
  total, weights = f(terms)
  np.testing.assert_allclose(total, 3 + np.log([0.3, 2.0, 7.5]).sum(), atol=1e-5)
  np.testing.assert_allclose(weights["c"], 1 / 7.5, rtol=1e-2)


def test_gate_starts_uniform_and_sums_to_one():
  g = fusion.GatedFusion(("x", "y", "z"), 4, min_weight=0.05, rngs=nnx.Rngs(0))
  feats = jax.random.normal(jax.random.key(1), (6, 4))
  w = g.gate(feats)
  assert w.shape == (6, 3)
  np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)
  g.out.bias[...] = jnp.asarray([3.0, -1.0, 0.0])
  g.out.kernel[...] = jax.random.normal(jax.random.key(2), g.out.kernel.shape)
  w = g.gate(feats)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  assert float(w.min()) >= 0.05 - 1e-7


def test_gate_learns_which_term_is_better_in_which_context():
  """Feature +1: term "a" is the smaller loss; feature -1: term "b" is. Trained jointly
  with a student parameter, the gate moves weight to the better term in each context."""
  gate = fusion.GatedFusion(("a", "b"), 1, hidden=8, rngs=nnx.Rngs(0))

  class Model(nnx.Module):
    def __init__(self):
      self.theta = nnx.Param(jnp.float32(0.0))
      self.fusion = gate

  model = Model()
  opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  x = jnp.asarray([[1.0], [-1.0]] * 8)
  sign = x[:, 0]

  @nnx.jit
  def step(model, opt):
    def loss(model):
      th = model.theta[...]
      # Per-example losses: "a" small where sign > 0, "b" small where sign < 0.
      a = (th - 1.0) ** 2 + jnp.where(sign > 0, 0.1, 2.0)
      b = (th - 1.0) ** 2 + jnp.where(sign > 0, 2.0, 0.1)
      return model.fusion({"a": a, "b": b}, x)
    (total, w), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    opt.update(model, grads)
    return total, w

  total0, w0 = step(model, opt)
  np.testing.assert_allclose(w0["a"], 0.5, rtol=1e-6)
  for _ in range(60):
    total, w = step(model, opt)
  wa = np.asarray(gate.gate(jnp.asarray([[1.0], [-1.0]]))[:, 0])
  assert wa[0] > 0.9 and wa[1] < 0.1, wa
  assert float(total) < float(total0)
  assert abs(float(model.theta[...]) - 1.0) < 0.2   # the student trained too


def test_gate_entropy_bonus_and_bad_arguments():
  with pytest.raises(ValueError, match="min_weight"):
    fusion.GatedFusion(("a", "b"), 2, min_weight=0.5, rngs=nnx.Rngs(0))
  g = fusion.GatedFusion(("a", "b"), 2, entropy_weight=0.1, rngs=nnx.Rngs(0))
  total, _ = g({"a": jnp.float32(1.0), "b": jnp.float32(3.0)}, jnp.zeros(2))
  np.testing.assert_allclose(total, 2.0 - 0.1 * np.log(2), rtol=1e-6)
  with pytest.raises(ValueError, match="last axis"):
    g({"a": jnp.float32(1.0), "b": jnp.float32(3.0)}, jnp.zeros(3))


def test_nan_term_propagates():
  g = fusion.GatedFusion(("a", "b"), 2, rngs=nnx.Rngs(0))
  total, w = g({"a": jnp.float32(jnp.nan), "b": jnp.float32(1.0)}, jnp.zeros(2))
  assert np.isnan(total) and np.isfinite(w["a"])


def test_runtime_features_against_numpy():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 5, 7)).astype(np.float32)
  t = rng.normal(size=(2, 5, 7)).astype(np.float32)
  y = rng.integers(0, 7, (2, 5))
  mask = np.ones((2, 5), np.float32)
  mask[1, 3:] = 0
  types = rng.integers(0, 2, (2, 5))
  f = jax.jit(fusion.runtime_features, static_argnames="num_token_types")(
      s, y, mask=mask, teacher_logits=t, token_types=types, num_token_types=2)
  names = fusion.runtime_feature_names(teacher=True, num_token_types=2)
  assert f.shape == (2, len(names))

  def logsm(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ls, lt = logsm(s.astype(np.float64)), logsm(t.astype(np.float64))
  for b in range(2):
    m = mask[b] > 0
    nll = -ls[b][np.arange(5), y[b]][m].mean()
    hs = -(np.exp(ls[b]) * ls[b]).sum(-1)[m].mean() / np.log(7)
    ht = -(np.exp(lt[b]) * lt[b]).sum(-1)[m].mean() / np.log(7)
    kl = (np.exp(lt[b]) * (lt[b] - ls[b])).sum(-1)[m].mean()
    frac1 = (types[b][m] == 1).mean()
    np.testing.assert_allclose(
        f[b], [nll, hs, m.mean(), ht, kl, 1 - frac1, frac1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_runtime_features_ignore_labels_of_minus_100(with_mask):
  # Regression: labels of -100 (the "ignore" convention) gave NaN features,
  # also where the mask excluded those positions; hinton_loss on the same input is finite.
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 6, 5)).astype(np.float32)
  t = rng.normal(size=(2, 6, 5)).astype(np.float32)
  y = rng.integers(0, 5, (2, 6))
  ignored = np.zeros((2, 6), bool)
  ignored[0, 4:] = ignored[1, :2] = True
  y_ignore = np.where(ignored, -100, y)
  mask = (~ignored).astype(np.float32)
  got = fusion.runtime_features(s, y_ignore, mask=mask if with_mask else None, teacher_logits=t)
  want = fusion.runtime_features(s, y, mask=mask, teacher_logits=t)  # the same positions out
  assert np.all(np.isfinite(np.asarray(got)))
  # Same operations on the same valid values (a masked-out position contributes an exact 0):
  # equal up to a few float32 roundings of the masked means.
  np.testing.assert_allclose(got, want, rtol=8 * np.finfo(np.float32).eps, atol=0)
