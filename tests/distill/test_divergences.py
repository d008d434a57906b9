"""Token divergences against NumPy float64 references and their identities.

References: each divergence written directly in NumPy float64 from its definition (mixtures
formed as plain convex combinations of probabilities); identities KL(p‖p) = 0, the JSD(β)
special cases and limits, JSD symmetry at β = 0.5, the T² scaling of the soft-target
gradient; central finite differences in float64.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import distill
from distill import _divergences as dv

LOSSES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
          "soft_target_kl", "hinton")


# ----------------------------------------------------------------------------- NumPy reference


def np_softmax(z, t):
  z = z / t
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def np_pointwise(loss, s, t, labels=None, temperature=1.0, beta=0.5, alpha=None):
  ps, pt = np_softmax(s, temperature), np_softmax(t, temperature)
  if loss == "forward_kl":
    return np_kl(pt, ps)
  if loss == "reverse_kl":
    return np_kl(ps, pt)
  if loss == "generalized_jsd":
    if beta == 0:
      return np_kl(pt, ps)
    if beta == 1:
      return np_kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)
  if loss == "skew_kl":
    a = 0.1 if alpha is None else alpha
    return np_kl(pt, a * pt + (1 - a) * ps)
  if loss == "skew_reverse_kl":
    a = 0.1 if alpha is None else alpha
    return np_kl(ps, (1 - a) * pt + a * ps)
  if loss == "soft_target_kl":
    return temperature ** 2 * np_kl(pt, ps)
  if loss == "hinton":
    a = 0.5 if alpha is None else alpha
    ce = -np.log(np.take_along_axis(np_softmax(s, 1.0), labels[..., None], -1)[..., 0])
    return a * ce + (1 - a) * temperature ** 2 * np_kl(pt, ps)
  raise ValueError(loss)


def np_reduce(values, mask, weights, reduction):
  w = np.ones(values.shape) if weights is None else np.asarray(weights, np.float64)
  m = np.ones(values.shape) if mask is None else np.asarray(mask, np.float64)
  num = values * w * m
  if reduction == "none":
    return num
  if reduction == "sum":
    return num.sum()
  if reduction == "mean":
    return num.sum() / (w * m).sum()
  return num.sum() / m.sum()


def _inputs(rng, shape, scale=2.0):
  s = rng.normal(size=shape) * scale
  t = rng.normal(size=shape) * scale
  labels = rng.integers(0, shape[-1], size=shape[:-1])
  mask = rng.random(shape[:-1]) < 0.7
  mask.reshape(-1)[0] = True
  weights = rng.uniform(0.2, 3.0, size=shape[:-1])
  return s, t, labels, mask, weights


def _call(loss, s, t, labels=None, **kw):
  return dv.token_loss(loss, s, t, labels=labels if loss == "hinton" else None, **kw)


# ----------------------------------------------------------------------------- vs NumPy


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape, temperature", [((11,), 0.5), ((3, 4, 17), 1.0),
                                                ((2, 17), 3.0)])
def test_matches_numpy_float64(loss, shape, temperature):
  rng = np.random.default_rng(hash((loss, shape, temperature)) % 2 ** 32)
  s, t, labels, mask, weights = _inputs(rng, shape)
  ref = np_pointwise(loss, s, t, labels, temperature)
  with jax.enable_x64(True):
    f = jax.jit(lambda s, t, l: _call(loss, s, t, l, temperature=temperature, reduction="none"))
    got = np.asarray(f(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels)))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("loss", ["forward_kl", "generalized_jsd", "hinton"])
@pytest.mark.parametrize("reduction", dv.REDUCTIONS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_weighted_reductions_match_numpy(loss, reduction, use_mask):
  rng = np.random.default_rng(3)
  s, t, labels, mask, weights = _inputs(rng, (4, 6, 9))
  mask = mask if use_mask else None
  ref = np_reduce(np_pointwise(loss, s, t, labels, 2.0), mask, weights, reduction)
  with jax.enable_x64(True):
    got = jax.jit(lambda s, t, l, m, w: _call(loss, s, t, l, temperature=2.0, mask=m, weights=w,
                                              reduction=reduction))(s, t, labels, mask, weights)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7, 1.0])
def test_params_match_numpy(beta, alpha):
  rng = np.random.default_rng(4)
  s, t, _, _, _ = _inputs(rng, (5, 13))
  with jax.enable_x64(True):
    got = {
        "generalized_jsd": dv.generalized_jsd(s, t, beta=beta, reduction="none"),
        "skew_kl": dv.skew_kl(s, t, alpha=alpha, reduction="none"),
        "skew_reverse_kl": dv.skew_reverse_kl(s, t, alpha=alpha, reduction="none"),
    }
  for name, val in got.items():
    ref = np_pointwise(name, s, t, beta=beta, alpha=alpha)
    np.testing.assert_allclose(np.asarray(val), ref, rtol=1e-6, atol=1e-12, err_msg=name)


def test_float32_inputs_close_to_float64_reference():
  rng = np.random.default_rng(5)
  s, t, labels, _, _ = _inputs(rng, (8, 50))
  for loss in LOSSES:
    got = _call(loss, jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), labels,
                reduction="none")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np_pointwise(loss, s, t, labels), rtol=1e-4,
                               atol=1e-6, err_msg=loss)


# ----------------------------------------------------------------------------- identities


def test_kl_of_a_distribution_with_itself_is_zero():
  rng = np.random.default_rng(6)
  z = jnp.asarray(rng.normal(size=(4, 7, 31)) * 3, jnp.float32)
  for loss in ("forward_kl", "reverse_kl", "soft_target_kl"):
    assert np.all(np.asarray(_call(loss, z, z, reduction="none")) == 0.0), loss
  for loss in ("generalized_jsd", "skew_kl", "skew_reverse_kl"):
    np.testing.assert_allclose(np.asarray(_call(loss, z, z, reduction="none")), 0.0, atol=1e-6)


def test_jsd_ends_are_the_kls_exactly():
  rng = np.random.default_rng(7)
  s, t, _, _, _ = _inputs(rng, (6, 19))
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  fwd, rev = dv.forward_kl(s, t, reduction="none"), dv.reverse_kl(s, t, reduction="none")
  np.testing.assert_array_equal(dv.generalized_jsd(s, t, beta=0.0, reduction="none"), fwd)
  np.testing.assert_array_equal(dv.generalized_jsd(s, t, beta=1.0, reduction="none"), rev)
  # Traced β takes the lax.switch path: same special cases.
  f = jax.jit(lambda b: dv.generalized_jsd(s, t, beta=b, reduction="none"))
  # (compiled as one program, so XLA may fuse differently from the eager reference: 1e-6)
  np.testing.assert_allclose(f(jnp.float32(0.0)), fwd, rtol=1e-6)
  np.testing.assert_allclose(f(jnp.float32(1.0)), rev, rtol=1e-6)
  np.testing.assert_allclose(f(jnp.float32(0.3)),
                             dv.generalized_jsd(s, t, beta=0.3, reduction="none"), rtol=1e-6)


def test_jsd_approaches_the_kls_continuously():
  # JSD_β = β KL(P‖M) + (1−β) KL(S‖M) with KL(S‖M) = O(β²): JSD_β / β → KL(P‖S) as β → 0,
  # with error O(β); symmetrically JSD_β / (1−β) → KL(S‖P) as β → 1. JSD_β itself → 0.
  rng = np.random.default_rng(8)
  s, t, _, _, _ = _inputs(rng, (5, 23), scale=1.0)
  with jax.enable_x64(True):
    fwd = np.asarray(dv.forward_kl(s, t, reduction="none"))
    rev = np.asarray(dv.reverse_kl(s, t, reduction="none"))
    errs0, errs1 = [], []
    for eps in (1e-2, 1e-3, 1e-4):
      jsd0 = np.asarray(dv.generalized_jsd(s, t, beta=eps, reduction="none"))
      jsd1 = np.asarray(dv.generalized_jsd(s, t, beta=1 - eps, reduction="none"))
      errs0.append(float(np.max(np.abs(jsd0 / eps - fwd) / fwd)))
      errs1.append(float(np.max(np.abs(jsd1 / eps - rev) / rev)))
      assert np.all(jsd0 <= 1.01 * eps * fwd)
  for errs in (errs0, errs1):
    assert errs[-1] < 1e-2
    assert errs[0] > errs[1] > errs[2]          # monotone, roughly ∝ ε
    assert 5 < errs[0] / errs[1] < 20


def test_jsd_symmetric_at_half():
  rng = np.random.default_rng(9)
  s, t, _, _, _ = _inputs(rng, (3, 5, 41))
  a = dv.generalized_jsd(s, t, beta=0.5, reduction="none")
  b = dv.generalized_jsd(t, s, beta=0.5, reduction="none")
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(a) <= np.log(2) + 1e-6)


def test_skew_ends():
  rng = np.random.default_rng(10)
  s, t, _, _, _ = _inputs(rng, (6, 19))
  np.testing.assert_array_equal(dv.skew_kl(s, t, alpha=0.0, reduction="none"),
                                dv.forward_kl(s, t, reduction="none"))
  np.testing.assert_array_equal(dv.skew_reverse_kl(s, t, alpha=0.0, reduction="none"),
                                dv.reverse_kl(s, t, reduction="none"))
  assert np.all(np.asarray(dv.skew_kl(s, t, alpha=1.0, reduction="none")) == 0)
  assert np.all(np.asarray(dv.skew_reverse_kl(s, t, alpha=1.0, reduction="none")) == 0)


def test_soft_target_t_squared_factor_and_gradient_scale():
  rng = np.random.default_rng(11)
  n, v = 16, 64
  zs = rng.normal(size=(n, v)) * 2
  zt = rng.normal(size=(n, v)) * 2
  with jax.enable_x64(True):
    def grad(fn, temperature):
      return np.asarray(jax.grad(lambda z: fn(z, zt, temperature=temperature))(zs))

    # The factor is exactly T².
    for temperature in (1.0, 4.0):
      np.testing.assert_allclose(grad(dv.soft_target_kl, temperature),
                                 temperature ** 2 * grad(dv.forward_kl, temperature),
                                 rtol=1e-10)
      np.testing.assert_allclose(dv.soft_target_kl(zs, zt, temperature=temperature),
                                 temperature ** 2 * dv.forward_kl(zs, zt,
                                                                  temperature=temperature),
                                 rtol=1e-12)
    # With it, the gradient scale is independent of T for large T, tending to
    # (z_s − z_t − mean) / (V n); without it, it falls as 1/T².
    norms = {t: np.linalg.norm(grad(dv.soft_target_kl, t)) for t in (10.0, 20.0, 40.0)}
    bare = {t: np.linalg.norm(grad(dv.forward_kl, t)) for t in (10.0, 20.0)}
    assert abs(norms[20.0] / norms[40.0] - 1) < 0.01
    assert abs(bare[10.0] / bare[20.0] - 4) < 0.1
    d = zs - zt
    limit = (d - d.mean(-1, keepdims=True)) / (v * n)
    np.testing.assert_allclose(grad(dv.soft_target_kl, 40.0), limit, rtol=0.05,
                               atol=0.05 * np.abs(limit).max())


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss", LOSSES)
def test_finite_difference_gradients_float64(loss):
  rng = np.random.default_rng(12)
  s, t, labels, mask, weights = _inputs(rng, (2, 2, 5), scale=1.0)
  with jax.enable_x64(True):
    def f(s, t, w):
      return _call(loss, s, t, jnp.asarray(labels), temperature=1.7, mask=mask, weights=w)
    check_grads(jax.jit(f), (jnp.asarray(s), jnp.asarray(t), jnp.asarray(weights)), order=1,
                modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)


def test_jsd_gradient_at_traced_beta():
  rng = np.random.default_rng(13)
  s, t, _, _, _ = _inputs(rng, (4, 9), scale=1.0)
  with jax.enable_x64(True):
    check_grads(lambda s: dv.generalized_jsd(s, t, beta=jnp.asarray(0.3, jnp.float64)),
                (jnp.asarray(s),), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_inputs_give_nonnegative_float32_divergences(loss):
  rng = np.random.default_rng(14)
  base = rng.normal(size=(4, 16, 257)) * 4
  labels = jnp.asarray(rng.integers(0, 257, size=(4, 16)))
  pairs = [(base, base),                                  # identical
           (base, base + rng.normal(size=base.shape) * 1e-2),  # nearly identical
           (base, rng.normal(size=base.shape) * 8)]       # far apart, peaked
  for s, t in pairs:
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    for beta in (0.1, 0.5, 0.9):
      val = dv.token_loss(loss, s16, t16, labels=labels if loss == "hinton" else None,
                          beta=beta, reduction="none")
      assert val.dtype == jnp.float32
      assert np.all(np.asarray(val) >= 0)
      # float32 internally: equal to the float32 computation on the same (bf16-rounded) values.
      ref = dv.token_loss(loss, s16.astype(jnp.float32), t16.astype(jnp.float32),
                          labels=labels if loss == "hinton" else None, beta=beta,
                          reduction="none")
      np.testing.assert_array_equal(val, ref)


def test_excluded_vocabulary_entries():
  # -inf logits in both models (e.g. a padded vocabulary) contribute nothing, no NaN.
  rng = np.random.default_rng(15)
  s, t, labels, _, _ = _inputs(rng, (3, 10))
  s[:, -2:] = -np.inf
  t[:, -2:] = -np.inf
  for loss in LOSSES:
    f = lambda s: _call(loss, s, jnp.asarray(t), jnp.asarray(labels))
    val, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(s))
    ref = np.mean(np_pointwise(loss, s[:, :-2], t[:, :-2], labels))
    np.testing.assert_allclose(val, ref, rtol=1e-5, err_msg=loss)
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("loss", ["forward_kl", "generalized_jsd", "skew_reverse_kl", "hinton"])
def test_masked_positions_change_nothing(loss):
  rng = np.random.default_rng(16)
  s, t, labels, mask, weights = _inputs(rng, (3, 5, 11))

  # One compiled program for both calls (labels an argument, not a folded constant), so the
  # masked and unmasked inputs can be compared bit for bit.
  f = lambda s, t, w, lab: _call(loss, s, t, lab, mask=mask, weights=w, temperature=2.0)
  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  def value_and_grads(s, t, labels):
    return step(s, t, jnp.asarray(weights), labels)

  v0, g0 = value_and_grads(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels))
  s2, t2, l2 = s.copy(), t.copy(), labels.copy()
  s2[~mask] = np.nan
  t2[~mask] = 1e30
  l2[~mask] = 10 ** 6
  v1, g1 = value_and_grads(jnp.asarray(s2), jnp.asarray(t2), jnp.asarray(l2))
  assert float(v0) == float(v1)
  for a, b in zip(g0, g1):
    np.testing.assert_array_equal(a, b)
  for g in g1[:2]:
    assert np.all(np.asarray(g)[~mask] == 0)
  assert np.all(np.asarray(g1[2])[~mask] == 0)


def test_all_masked_gives_zero_not_nan():
  z = jnp.ones((2, 3, 5))
  mask = jnp.zeros((2, 3), bool)
  for reduction in ("mean", "token_mean", "sum"):
    val, g = jax.value_and_grad(lambda s: dv.forward_kl(s, z * 2, mask=mask,
                                                         reduction=reduction))(z)
    assert float(val) == 0.0
    assert np.all(np.asarray(g) == 0)


def test_nan_at_unmasked_position_propagates():
  z = np.zeros((2, 5))
  z[1, 2] = np.nan
  assert np.isnan(float(dv.forward_kl(jnp.asarray(z), jnp.ones((2, 5)))))
  # zero weight does not sanitise, a mask does
  assert np.isnan(float(dv.forward_kl(jnp.asarray(z), jnp.ones((2, 5)),
                                      weights=jnp.asarray([1.0, 0.0]))))
  assert not np.isnan(float(dv.forward_kl(jnp.asarray(z), jnp.ones((2, 5)),
                                          mask=jnp.asarray([True, False]))))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda s, t: dv.forward_kl(s, t[..., :-1]), "`teacher_logits` shape"),
    (lambda s, t: dv.forward_kl(s, t[:1]), "`teacher_logits` shape"),
    (lambda s, t: dv.forward_kl(s, t, temperature=0.0), "`temperature`"),
    (lambda s, t: dv.forward_kl(s, t, temperature=-1.0), "`temperature`"),
    (lambda s, t: dv.soft_target_kl(s, t, temperature=float("nan")), "`temperature`"),
    (lambda s, t: dv.soft_target_kl(s, t, temperature=float("inf")), "`temperature`"),
    (lambda s, t: dv.generalized_jsd(s, t, beta=-0.1), "`beta`"),
    (lambda s, t: dv.generalized_jsd(s, t, beta=1.5), "`beta`"),
    (lambda s, t: dv.skew_kl(s, t, alpha=2.0), "`alpha`"),
    (lambda s, t: dv.skew_reverse_kl(s, t, alpha=-1), "`alpha`"),
    (lambda s, t: dv.hinton_loss(s, t, labels=jnp.zeros((2, 3), int), alpha=1.2), "`alpha`"),
    (lambda s, t: dv.forward_kl(s, t, weights=jnp.ones((2, 4))), "`weights`"),
    (lambda s, t: dv.forward_kl(s, t, weights=jnp.ones((2, 3, 5))), "`weights`"),
    (lambda s, t: dv.forward_kl(s, t, weights=jnp.ones((2, 3), int)), "`weights`"),
    (lambda s, t: dv.forward_kl(s, t, mask=jnp.ones((3, 2), bool)), "`mask`"),
    (lambda s, t: dv.hinton_loss(s, t, labels=jnp.zeros((2, 4), int)), "`labels`"),
    (lambda s, t: dv.hinton_loss(s, t, labels=jnp.zeros((2, 3))), "`labels`"),
    (lambda s, t: dv.hinton_loss(s, t, labels=None), "`labels`"),
    (lambda s, t: dv.token_loss("hinton", s, t), "`labels`"),
    (lambda s, t: dv.token_loss("kl", s, t), "`loss`"),
    (lambda s, t: dv.forward_kl(s, t, reduction="batchmean"), "`reduction`"),
    (lambda s, t: dv.forward_kl(jnp.float32(1.0), jnp.float32(1.0)), "`student_logits`"),
])
def test_bad_input_names_the_argument(call, match):
  s = jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match=match):
    call(s, s)


def test_traced_temperature_and_no_recompilation():
  rng = np.random.default_rng(17)
  s, t, _, _, _ = _inputs(rng, (4, 9))
  traces = []

  @jax.jit
  def f(s, t, temperature):
    traces.append(1)
    return dv.soft_target_kl(s, t, temperature=temperature)
  a = f(s, t, 2.0)
  b = f(s + 1e-3, t, 3.0)
  assert len(traces) == 1
  np.testing.assert_allclose(a, dv.soft_target_kl(s, t, temperature=2.0), rtol=1e-6)
  np.testing.assert_allclose(b, dv.soft_target_kl(s + 1e-3, t, temperature=3.0), rtol=1e-6)


# ----------------------------------------------------------------------------- one naming rule


def test_token_and_feature_losses_take_mask_weights_and_labels_alike():
  """``mask`` (padding) and ``weights`` (float per position) are keyword arguments of every
  token and feature loss; ``labels`` is keyword-only in hinton_loss, token_loss and
  chunked_token_loss (three different positional layouts, so one keyword)."""
  losses = [distill.forward_kl, distill.reverse_kl, distill.generalized_jsd, distill.skew_kl,
            distill.skew_reverse_kl, distill.soft_target_kl, distill.hinton_loss,
            distill.token_loss, distill.chunked_token_loss, distill.cosine_angular_loss,
            distill.reconstruction_l1]
  for f in losses:
    params = inspect.signature(f).parameters
    for name in ("mask", "weights"):
      assert params[name].kind == inspect.Parameter.KEYWORD_ONLY, (f.__name__, name)
  for f in (distill.hinton_loss, distill.token_loss, distill.chunked_token_loss):
    assert inspect.signature(f).parameters["labels"].kind == inspect.Parameter.KEYWORD_ONLY


def _np_cosine_angular(s, t, angular_weight):
  s_hat = s / np.linalg.norm(s, axis=-1, keepdims=True)
  t_hat = t / np.linalg.norm(t, axis=-1, keepdims=True)
  theta = np.arccos(np.clip(np.sum(s_hat * t_hat, -1), -1.0, 1.0))
  return 1.0 - np.cos(theta) + angular_weight * theta ** 2


@pytest.mark.parametrize("kind", ["cosine", "l1"])
def test_feature_losses_mask_drops_nan_positions_and_weights_weigh(kind):
  """Feature losses follow the token losses: a masked position adds nothing to the value or
  the gradient even when it is NaN, and ``weights`` give Σ w m d / Σ w m. (Before, ``mask``
  was a weight, so NaN·0 made the loss NaN, and there was no ``weights``.)"""
  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 6))
  mask = rng.uniform(size=(2, 5)) > 0.3
  w = rng.uniform(0.2, 3.0, size=(2, 5))
  s_nan = np.where(mask[..., None], s, np.nan)
  if kind == "cosine":
    f = lambda a, b: distill.cosine_angular_loss(a, b, angular_weight=0.5,
                                                 mask=jnp.asarray(mask), weights=jnp.asarray(w))
    d = _np_cosine_angular(s, t, 0.5)
  else:
    f = lambda a, b: distill.reconstruction_l1(a, b, mask=jnp.asarray(mask),
                                               weights=jnp.asarray(w))
    d = np.mean(np.abs(s - t), -1)
  expected = np.sum(w * mask * d) / np.sum(w * mask)
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(s_nan, jnp.float32),
                                              jnp.asarray(t, jnp.float32))
  # float32 against float64: a few roundings per position over D = 6 and 10 positions, and
  # arccos vs the atan2 form near well-separated angles: 1e-5 relative covers them.
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[~mask] == 0)
