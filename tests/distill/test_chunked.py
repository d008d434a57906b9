"""The chunked token loss equals the unchunked form (value and gradients) and never holds logits.

Reference: ``chunked_token_loss(..., chunk_size=None)``, which builds the full logits
``hidden @ kernel + bias`` and calls the same per-position function; that function itself is
checked against NumPy in test_divergences.py. Tolerance 1e-5 (float32, summation order).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import _divergences as dv
from distill._chunked import chunked_token_entropy
from distill._chunked import chunked_token_loss
from distill._weights import token_entropy

B, T, HS, HT, V = 2, 7, 8, 6, 13


def _setup(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)
  return dict(
      hs=arr(B, T, HS), ks=arr(HS, V, scale=0.7), bs=arr(V, scale=0.3),
      ht=arr(B, T, HT), kt=arr(HT, V, scale=0.7), bt=arr(V, scale=0.3),
      labels=jnp.asarray(rng.integers(0, V, size=(B, T))),
      mask=jnp.asarray(np.arange(T)[None, :] < np.array([[5], [7]])),
      weights=jnp.asarray(rng.uniform(0.2, 3.0, size=(B, T)), jnp.float32))


def _loss_fn(x, loss, chunk_size, grad_mode, use_mask, use_weights, use_bias, reduction="mean",
             **kw):
  def f(hs, ks, bs, w, ht, kt):
    return chunked_token_loss(
        hs, ks, ht, kt, loss=loss, student_bias=bs if use_bias else None,
        teacher_bias=x["bt"] if use_bias else None, labels=x["labels"],
        mask=x["mask"] if use_mask else None, weights=w if use_weights else None,
        temperature=kw.get("temperature", 2.0), beta=kw.get("beta", 0.5),
        alpha=kw.get("alpha"), reduction=reduction, chunk_size=chunk_size, grad_mode=grad_mode)
  return f


def _value_and_grads(x, f, argnums=(0, 1, 2, 3)):
  return jax.jit(jax.value_and_grad(f, argnums=argnums))(x["hs"], x["ks"], x["bs"],
                                                          x["weights"], x["ht"], x["kt"])


def _assert_close(a, b, tol=1e-5):
  va, ga = a
  vb, gb = b
  np.testing.assert_allclose(va, vb, rtol=tol, atol=tol)
  for x, y in zip(ga, gb):
    scale = max(1.0, float(jnp.max(jnp.abs(y))))
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale)


@functools.lru_cache(maxsize=None)
def _reference(loss, seed, use_mask, use_weights, use_bias, **kw):
  x = _setup(seed)
  return _value_and_grads(x, _loss_fn(x, loss, None, "fused", use_mask, use_weights, use_bias,
                                      **kw))


@pytest.mark.parametrize("loss, grad_mode",
                         [(loss, "fused") for loss in dv.TOKEN_LOSSES]
                         + [(loss, "remat") for loss in ("forward_kl", "generalized_jsd",
                                                         "hinton")])
def test_chunked_equals_unchunked_all_losses(loss, grad_mode):
  x = _setup(1)
  # chunk 4 does not divide B·T = 14: the last chunk is padded.
  got = _value_and_grads(x, _loss_fn(x, loss, 4, grad_mode, True, True, True))
  _assert_close(got, _reference(loss, 1, True, True, True))


@pytest.mark.parametrize("chunk_size", [1, 3, 14, 64])
@pytest.mark.parametrize("use_mask, use_weights, use_bias",
                         [(False, False, False), (True, True, True)])
def test_chunk_sizes_masks_weights(chunk_size, use_mask, use_weights, use_bias):
  x = _setup(2)
  got = _value_and_grads(x, _loss_fn(x, "generalized_jsd", chunk_size, "fused", use_mask,
                                     use_weights, use_bias, beta=0.3))
  _assert_close(got, _reference("generalized_jsd", 2, use_mask, use_weights, use_bias, beta=0.3))


@pytest.mark.parametrize("reduction", ["mean", "token_mean", "sum"])
@pytest.mark.parametrize("grad_mode", ["fused", "remat"])
def test_reductions(reduction, grad_mode):
  x = _setup(3)
  f = lambda cs: _loss_fn(x, "skew_kl", cs, grad_mode, True, True, False, reduction=reduction,
                          alpha=0.2)
  _assert_close(_value_and_grads(x, f(5)), _value_and_grads(x, f(None)))


def test_remat_reduction_none_and_teacher_gradients():
  x = _setup(4)
  f = lambda cs: _loss_fn(x, "reverse_kl", cs, "remat", True, True, True)
  _assert_close(_value_and_grads(x, f(3), argnums=(0, 1, 2, 3, 4, 5)),
                _value_and_grads(x, f(None), argnums=(0, 1, 2, 3, 4, 5)))
  none = lambda cs: chunked_token_loss(x["hs"], x["ks"], x["ht"], x["kt"], loss="reverse_kl",
                                       mask=x["mask"], weights=x["weights"], reduction="none",
                                       chunk_size=cs, grad_mode="remat")
  np.testing.assert_allclose(none(3), none(None), rtol=1e-5, atol=1e-6)
  assert none(3).shape == (B, T)


def test_fused_teacher_is_a_constant():
  x = _setup(5)
  f = _loss_fn(x, "forward_kl", 4, "fused", False, False, False)
  _, grads = _value_and_grads(x, f, argnums=(4, 5))
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_fused_equals_remat_with_bf16_inputs():
  x = _setup(6, jnp.bfloat16)
  f = lambda mode, cs: _loss_fn(x, "generalized_jsd", cs, mode, True, True, True)
  ref = _value_and_grads(x, f("fused", None))
  assert ref[0].dtype == jnp.float32
  assert ref[1][0].dtype == jnp.bfloat16
  for mode in ("fused", "remat"):
    got = _value_and_grads(x, f(mode, 4))
    assert float(got[0]) >= 0
    # Gradients come back in bf16 (the inputs' dtype): compare at bf16 resolution.
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(b))))


def test_masked_positions_change_nothing():
  x = _setup(7)
  f = _loss_fn(x, "hinton", 4, "fused", True, True, True, alpha=0.3)
  v0, g0 = _value_and_grads(x, f)
  bad = ~np.asarray(x["mask"])
  y = dict(x)
  y["hs"] = jnp.where(bad[..., None], jnp.nan, x["hs"])
  y["ht"] = jnp.where(bad[..., None], 1e30, x["ht"])
  y["labels"] = jnp.where(bad, 10 ** 6, x["labels"])
  v1, g1 = _value_and_grads(y, _loss_fn(y, "hinton", 4, "fused", True, True, True, alpha=0.3))
  assert float(v0) == float(v1)
  for a, b in zip(g0, g1):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.asarray(g1[0])[bad] == 0)


def test_memory_flat_in_sequence_length_and_below_naive():
  # Compile only: XLA's memory analysis of value-and-grad at V = 8192.
  def peak(t, chunk_size):
    hs = jax.ShapeDtypeStruct((t, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((64, 8192), jnp.float32)

    def step(hs, ks, ht, kt):
      return jax.value_and_grad(lambda h, k: chunked_token_loss(
          h, k, ht, kt, chunk_size=chunk_size), argnums=(0, 1))(hs, ks)
    m = jax.jit(step).lower(hs, k, hs, k).compile().memory_analysis()
    return m.temp_size_in_bytes

  chunked = [peak(t, 128) for t in (1024, 4096)]
  naive = peak(4096, None)
  logits = 4096 * 8192 * 4
  assert chunked[1] <= 1.05 * chunked[0]           # flat in T
  assert chunked[1] < logits / 4                   # never a full [T, V] logits array
  assert naive > 2 * logits                        # the naive form holds several
  assert chunked[1] < 0.2 * naive


def test_chunked_entropy():
  x = _setup(8)
  ref = token_entropy(x["ht"] @ x["kt"] + x["bt"], temperature=1.5)
  for cs in (None, 3, 100):
    got = chunked_token_entropy(x["ht"], x["kt"], x["bt"], temperature=1.5, chunk_size=cs)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_no_recompilation_on_second_call():
  x = _setup(9)
  traces = []

  @jax.jit
  def f(hs, ks, ht, kt):
    traces.append(1)
    return jax.grad(lambda h: chunked_token_loss(h, ks, ht, kt, chunk_size=4))(hs)
  f(x["hs"], x["ks"], x["ht"], x["kt"])
  f(x["hs"] + 1, x["ks"], x["ht"], x["kt"])
  assert len(traces) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_size=0), "`chunk_size`"),
    (dict(chunk_size=2.5), "`chunk_size`"),
    (dict(chunk_size=True), "`chunk_size`"),
    (dict(grad_mode="checkpoint"), "`grad_mode`"),
    (dict(reduction="none"), "`reduction`"),
    (dict(loss="kl"), "`loss`"),
    (dict(loss="hinton"), "`labels`"),
    (dict(temperature=0.0), "`temperature`"),
    (dict(beta=1.5, loss="generalized_jsd"), "`beta`"),
    (dict(alpha=-0.5, loss="skew_kl"), "`alpha`"),
    (dict(weights=jnp.ones((B, T + 1))), "`weights`"),
    (dict(mask=jnp.ones((T, B), bool)), "`mask`"),
    (dict(student_bias=jnp.ones(V + 1)), "`student_bias`"),
    (dict(teacher_bias=jnp.ones((1, V))), "`teacher_bias`"),
    (dict(student_kernel=jnp.ones((HS + 1, V))), "`student_kernel`"),
    (dict(teacher_kernel=jnp.ones((HT, V + 1))), "`teacher_kernel`"),
    (dict(teacher_hidden=jnp.ones((B, T + 1, HT))), "`teacher_hidden`"),
    (dict(student_hidden=jnp.ones((HS,))), "`student_hidden`"),
])
def test_bad_input_names_the_argument(kwargs, match):
  x = _setup(10)
  args = dict(student_hidden=x["hs"], student_kernel=x["ks"], teacher_hidden=x["ht"],
              teacher_kernel=x["kt"], chunk_size=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    chunked_token_loss(**args)


def test_traced_temperature_needs_remat():
  x = _setup(11)
  f = lambda t, mode: chunked_token_loss(x["hs"], x["ks"], x["ht"], x["kt"], temperature=t,
                                         chunk_size=4, grad_mode=mode)
  with pytest.raises(ValueError, match="`temperature`"):
    jax.jit(lambda t: f(t, "fused"))(2.0)
  np.testing.assert_allclose(jax.jit(lambda t: f(t, "remat"))(2.0), f(2.0, "fused"), rtol=1e-6)
