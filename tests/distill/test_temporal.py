"""Temporal losses against float64 NumPy references.

References: the smoothness penalty and path replay as explicit loops over (b, t); the
attention-evolution loss with ``numpy.linalg.norm(ord='nuc')`` on each hand-stacked
[window, T] matrix of rows t, t-1, t-2, t-3.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import _temporal as T


def _ctx(dtype):
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _np_smoothness(h, coef, mask):
  num = den = 0.0
  b, t, _ = h.shape
  for n in range(b):
    for i in range(1, t):
      m = mask[n, i] * mask[n, i - 1]
      num += coef[i - 1] * m * np.sum((h[n, i] - h[n, i - 1]) ** 2)
      den += m
  return num / den


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("growth", ["linear", "constant", "array"])
def test_smoothness_matches_numpy(dtype, growth):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 7, 5))
  mask = np.ones((2, 7))
  mask[0, 5:] = 0
  coef = {"linear": np.arange(1, 7) / 6, "constant": np.ones(6),
          "array": rng.uniform(size=6)}[growth]
  with _ctx(dtype):
    arg = jnp.asarray(coef) if growth == "array" else growth
    hj = jnp.asarray(h, dtype)
    out = jax.jit(lambda x, m: T.smoothness_penalty(x, growth=arg, mask=m))(hj, jnp.asarray(mask))
    expected = _np_smoothness(np.asarray(hj, np.float64), coef, mask)
  assert out.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
  np.testing.assert_allclose(float(out), expected, rtol=1e-10 if dtype == "float64" else 1e-5)


def test_smoothness_coefficient_grows_with_position():
  h = jnp.zeros((1, 5, 2))
  early = T.smoothness_penalty(h.at[0, 1, 0].set(1.0))   # a jump at step 1
  late = T.smoothness_penalty(h.at[0, 4, 0].set(1.0))    # the same jump at the last step
  np.testing.assert_allclose([float(early), float(late)],
                             [(1 / 4 + 2 / 4) / 4, (4 / 4) / 4], rtol=1e-6)


def _np_evolution_loss(s, t, window, heads, mask):
  if heads == "mean":
    s, t = s.mean(1, keepdims=True), t.mean(1, keepdims=True)
  b, h, n, _ = s.shape
  total, count = 0.0, 0
  for i in range(b):
    for j in range(h):
      for q in range(window - 1, n):
        if not all(mask[i, q - k] for k in range(window)):
          continue
        es = np.stack([s[i, j, q - k] for k in range(window)])
        et = np.stack([t[i, j, q - k] for k in range(window)])
        total += np.linalg.norm(es - et, ord="nuc")
        count += 1
  return total / count


def _attention(rng, b, h, n):
  logits = rng.normal(size=(b, h, n, n)) * 2
  logits = np.where(np.tril(np.ones((n, n))) > 0, logits, -np.inf)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("heads, counts", [("mean", (2, 4)), ("none", (3, 3))])
def test_attention_evolution_matches_numpy_nuclear_norm(dtype, heads, counts):
  rng = np.random.default_rng(counts[0])
  s, t = _attention(rng, 2, counts[0], 9), _attention(rng, 2, counts[1], 9)
  mask = np.ones((2, 9))
  mask[1, 7:] = 0
  mask[0, 2] = 0
  expected = _np_evolution_loss(s, t, 4, heads, mask)
  with _ctx(dtype):
    fn = jax.jit(lambda a, b, m: T.attention_evolution_loss(a, b, window=4, heads=heads, mask=m))
    out = fn(jnp.asarray(s, dtype), jnp.asarray(t, dtype), jnp.asarray(mask, dtype))
  assert out.dtype == dtype
  np.testing.assert_allclose(float(out), expected, rtol=1e-10 if dtype == "float64" else 1e-5)


def test_attention_evolution_stacks_previous_steps():
  a = jnp.arange(2 * 1 * 5 * 5, dtype=jnp.float32).reshape(2, 1, 5, 5)
  e = T.attention_evolution(a, 4)
  assert e.shape == (2, 5, 1, 4, 5)
  np.testing.assert_array_equal(np.asarray(e[1, 4, 0]), np.asarray(a[1, 0, 4:0:-1]))
  np.testing.assert_array_equal(np.asarray(e[0, 1, 0, 2:]), 0.0)     # before the first step


def test_attention_evolution_zero_at_equality_with_finite_gradient():
  rng = np.random.default_rng(5)
  a = jnp.asarray(_attention(rng, 1, 2, 6), jnp.float32)
  loss = lambda s: T.attention_evolution_loss(s, a, heads="none")
  assert float(loss(a)) == 0.0
  g = jax.jit(jax.grad(loss))(a)
  assert np.all(np.isfinite(np.asarray(g)))
  b16 = T.attention_evolution_loss(a.astype(jnp.bfloat16), jnp.flip(a, 1).astype(jnp.bfloat16))
  assert b16.dtype == jnp.float32 and float(b16) >= 0


def _np_path(s, t, decay, mask):
  b, n, _ = s.shape
  num = den = 0.0
  for i in range(b):
    for q in range(1, n):
      w = decay ** (n - 1 - q) * mask[i, q] * mask[i, q - 1]
      d = (s[i, q] - s[i, q - 1]) - (t[i, q] - t[i, q - 1])
      num += w * np.sum(d ** 2)
      den += w
  return num / den


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_path_replay_matches_numpy(dtype):
  rng = np.random.default_rng(7)
  s, t = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 6, 4))
  mask = np.ones((2, 6))
  mask[1, 0] = 0
  expected = _np_path(s, t, 0.8, mask)
  with _ctx(dtype):
    out = jax.jit(lambda a, b, m: T.path_replay_loss(a, b, decay=0.8, mask=m))(
        jnp.asarray(s, dtype), jnp.asarray(t, dtype), jnp.asarray(mask, dtype))
  assert out.dtype == dtype
  np.testing.assert_allclose(float(out), expected, rtol=1e-10 if dtype == "float64" else 1e-5)
  # invariant to a constant offset between the trajectories
  offset = T.path_replay_loss(jnp.asarray(t, jnp.float32), jnp.asarray(t + 3.0, jnp.float32))
  assert abs(float(offset)) < 1e-9


@pytest.mark.parametrize("call, name", [
    (lambda: T.smoothness_penalty(jnp.ones((2, 3))), "hidden"),
    (lambda: T.smoothness_penalty(jnp.ones((2, 3, 4)), growth="quadratic"), "growth"),
    (lambda: T.smoothness_penalty(jnp.ones((2, 3, 4)), growth=jnp.ones(3)), "growth"),
    (lambda: T.smoothness_penalty(jnp.ones((2, 3, 4)), mask=jnp.ones((3, 2))), "mask"),
    (lambda: T.attention_evolution_loss(jnp.ones((1, 2, 5, 5)), jnp.ones((1, 2, 5, 5)),
                                        window=6), "window"),
    (lambda: T.attention_evolution_loss(jnp.ones((1, 2, 5, 5)), jnp.ones((1, 3, 5, 5)),
                                        heads="none"), "heads"),
    (lambda: T.attention_evolution_loss(jnp.ones((1, 2, 5, 5)), jnp.ones((1, 2, 4, 4))),
     "student_attention"),
    (lambda: T.attention_evolution_loss(jnp.ones((2, 5, 5)), jnp.ones((1, 2, 5, 5))),
     "student_attention"),
    (lambda: T.path_replay_loss(jnp.ones((1, 3, 4)), jnp.ones((1, 3, 5))), "student_hidden"),
    (lambda: T.path_replay_loss(jnp.ones((1, 3, 4)), jnp.ones((1, 3, 4)), decay=0.0), "decay"),
])
def test_bad_arguments_name_themselves(call, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    call()
