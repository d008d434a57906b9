"""hessian_eigenvalues (Lanczos, full reorthogonalisation) against dense ``eigh`` of the Hessian.

References: ``jnp.linalg.eigh(jax.hessian(flat_loss))`` in float64 for a tanh MLP and a tiny
attention model, and NumPy quadratics with known spectra. Tolerances follow STYLE.md: 1e-5
relative in float64 with the *default* ``num_iters``, 1e-4 relative for top-1 in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from curvature import _lanczos
from curvature._lanczos import hessian_eigenvalues


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _mlp(seed, dtype, sizes=(8, 24, 24, 4), n=64):
  """A tanh MLP with MSE loss: 916 parameters (the same numbers in every dtype)."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), dtype)
  params = [{"w": arr(a, b, scale=1 / np.sqrt(a)), "b": arr(b, scale=0.1)}
            for a, b in zip(sizes[:-1], sizes[1:])]
  x, y = arr(n, sizes[0]), arr(n, sizes[-1])

  def loss(p, x, y):
    h = x
    for i, layer in enumerate(p):
      h = h @ layer["w"] + layer["b"]
      if i < len(p) - 1:
        h = jnp.tanh(h)
    return 0.5 * jnp.mean((h - y) ** 2)

  return loss, params, (x, y)


def _attention(seed, dtype, vocab=11, d=8, seq=6, batch=8):
  """Embedding + one causal self-attention + MLP + unembedding, next-token CE: 736 params."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape, fan=1.0: jnp.asarray(rng.normal(size=shape) / np.sqrt(fan), dtype)
  params = {"embed": arr(vocab, d), "pos": arr(seq, d), "qkv": arr(3, d, d, fan=d),
            "out": arr(d, d, fan=d), "w1": arr(d, 2 * d, fan=d), "w2": arr(2 * d, d, fan=2 * d),
            "unembed": arr(d, vocab, fan=d)}
  tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, seq + 1)))

  def loss(p, tokens):
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    h = p["embed"][inp] + p["pos"]
    q, k, v = (h @ p["qkv"][i] for i in range(3))
    logits = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(d)
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    h = h + (att @ v) @ p["out"]
    h = h + jnp.tanh(h @ p["w1"]) @ p["w2"]
    logp = jax.nn.log_softmax(h @ p["unembed"])
    return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], -1))

  return loss, params, (tokens,)


_MODELS = {"mlp": _mlp, "attention": _attention}


@functools.lru_cache(maxsize=None)
def _dense(model):
  """Exact float64 Hessian of a model, plus its loss / params / data (x64 on)."""
  with jax.enable_x64(True):
    loss, params, data = _MODELS[model](0, jnp.float64)
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), *data)))(flat))
  return h, np.linalg.eigvalsh(h)[::-1]


def _rel_err(got, want):
  return np.max(np.abs(np.asarray(got) - want) / np.abs(want))


@pytest.mark.parametrize("model", ["mlp", "attention"])
def test_top5_default_iters_float64(x64, model):
  h, eigs = _dense(model)
  loss, params, data = _MODELS[model](0, jnp.float64)
  assert h.shape[0] <= 3000
  f = jax.jit(lambda p, data: hessian_eigenvalues(lambda q: loss(q, *data), p, k=5))
  out = f(params, data)
  assert out.eigenvalues.dtype == jnp.float64
  # Stopped on the residual test before the 55-vector cap (44 and 28 steps here).
  assert 5 <= int(out.num_iters) < _lanczos.default_num_iters(5, h.shape[0]) == 55
  assert bool(out.converged) and np.all(np.asarray(out.residuals) <= 1e-6)
  assert _rel_err(out.eigenvalues, eigs[:5]) <= 1e-5
  assert np.all(np.diff(np.asarray(out.eigenvalues)) <= 0)


def test_top1_float32_default_iters():
  _, eigs = _dense("mlp")
  loss, params, data = _mlp(0, jnp.float32)
  out = jax.jit(lambda p, data: hessian_eigenvalues(lambda q: loss(q, *data), p))(params, data)
  assert out.eigenvalues.dtype == jnp.float32 and out.eigenvalues.shape == (1,)
  assert _rel_err(out.eigenvalues, eigs[:1]) <= 1e-4


def test_eigenvectors_and_residuals(x64):
  h, eigs = _dense("mlp")
  loss, params, data = _mlp(0, jnp.float64)
  f = jax.jit(lambda p, data: hessian_eigenvalues(
      lambda q: loss(q, *data), p, k=3, return_eigenvectors=True))
  out = f(params, data)
  vecs = jax.vmap(lambda v: ravel_pytree(v)[0])(out.eigenvectors)        # [3, P]
  assert jax.tree.structure(jax.tree.map(lambda x: x[0], out.eigenvectors)) == \
      jax.tree.structure(params)
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-10)
  lam = np.asarray(out.eigenvalues)
  true_res = np.linalg.norm(vecs @ h - lam[:, None] * vecs, axis=1) / np.max(np.abs(eigs))
  assert np.all(true_res <= 1e-5)
  # The reported residual |beta_m s_mi| / max|theta| is the true residual.
  np.testing.assert_allclose(np.asarray(out.residuals), true_res, rtol=1e-3, atol=1e-12)


def _quadratic(eigs, seed, split):
  """½ xᵀAx on a pytree of two leaves, A = Q diag(eigs) Qᵀ with a random orthogonal Q."""
  rng = np.random.default_rng(seed)
  n = len(eigs)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = jnp.asarray((q * eigs) @ q.T)
  params = {"m": jnp.asarray(rng.normal(size=split)),
            "v": jnp.asarray(rng.normal(size=n - int(np.prod(split))))}

  def loss(p):
    x = jnp.concatenate([p["m"].ravel(), p["v"]])
    return 0.5 * x @ a @ x

  return loss, params


@pytest.mark.parametrize("bulk", ["spread", "linear"])
def test_clustered_spectrum(x64, bulk):
  # Eigenvalues 1e-4 apart (relative) at the top: ten of them above a bulk spread over
  # [-2, 9], or a whole spectrum in steps of 1e-3. One 55-step cycle is not enough here
  # (top-5 errors of 1e-3..5e-2); the defaults restart until the residuals pass 1e-6.
  top = 10.0 - 1e-3 * np.arange(10)
  eigs = (np.concatenate([top, np.linspace(-2.0, 9.0, 390)]) if bulk == "spread"
          else 10.0 - 1e-3 * np.arange(300))
  loss, params = _quadratic(eigs, seed=0, split=(10, 10))
  f = lambda p, **kw: hessian_eigenvalues(loss, p, k=5, **kw)
  out = jax.jit(f)(params)
  assert bool(out.converged)
  assert _rel_err(out.eigenvalues, top[:5]) <= 1e-5
  if bulk == "spread":
    # Without restarts the same basis size reports its failure instead of hiding it.
    single = jax.jit(functools.partial(f, max_restarts=0))(params)
    assert int(single.num_iters) == 55 and not bool(single.converged)
    assert np.max(np.asarray(single.residuals)) > 1e-6


# A spectrum with a clear top: 12, 10, 9 above a bulk spread over [-1, 8]; the first 3
# eigenvalues and the stopping point are known in advance of any Lanczos run.
_SEPARATED = np.concatenate([[12.0, 10.0, 9.0], np.linspace(-1.0, 8.0, 197)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_stops_at_first_converged_check(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    loss, params = _quadratic(_SEPARATED, seed=4, split=(8, 10))
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    run = lambda **kw: jax.jit(lambda p: hessian_eigenvalues(loss, p, k=3, **kw))(params)
    out = run()
    stop = int(out.num_iters)
    tol = _lanczos.default_tol(dtype)
    # Early stop: fewer steps than the 45-vector cap, at a check (every c steps).
    c = _lanczos.DEFAULT_CHECK_EVERY
    assert stop < _lanczos.default_num_iters(3, 200) == 45 and stop % c == 0
    assert bool(out.converged) and np.all(np.asarray(out.residuals) <= tol)
    # The first such check: one check earlier, with the basis capped there and no restart,
    # the same run (same start vector) reports its residuals above tol.
    before = run(num_iters=stop - c, max_restarts=0)
    assert int(before.num_iters) == stop - c and not bool(before.converged)
    assert np.max(np.asarray(before.residuals)) > tol
    # Against the known spectrum: within the default accuracy (1e-5 float64, 1e-4 float32).
    assert _rel_err(out.eigenvalues, _SEPARATED[:3]) <= (1e-5 if dtype == jnp.float64 else 1e-4)
    # Checking after every step stops no later and less than c steps earlier.
    every = run(check_every=1)
    assert stop - c < int(every.num_iters) <= stop and bool(every.converged)


def test_converged_flag_is_honest(x64):
  loss, params = _quadratic(_SEPARATED, seed=5, split=(8, 10))
  run = lambda **kw: jax.jit(lambda p: hessian_eigenvalues(loss, p, **kw))(params)
  # tol below float64's epsilon, where reported residuals are floored: unreachable. The
  # whole budget is spent (40 steps, then 2 restarts of 40 - p + 1 = 21 steps: p = 20 Ritz
  # vectors kept, one of them expanded again) and the flag says so.
  out = run(k=1, tol=1e-30, max_restarts=2)
  assert not bool(out.converged) and int(out.num_iters) == 40 + 2 * 21
  assert float(out.residuals[0]) >= np.finfo(np.float64).eps
  # A budget too small for the default tol: 8 steps and one restart of 5 (k=1: p = 4).
  out = run(k=1, num_iters=8, max_restarts=1, return_eigenvectors=True)
  assert int(out.num_iters) == 13 and not bool(out.converged)
  assert float(out.residuals[0]) > 1e-6
  # The reported residual is the true ||H y - θ y|| / |θ| of the returned unit Ritz vector,
  # and bounds the error against the known eigenvalue (Kahan: |θ - λ| <= ||H y - θ y||).
  unflat = lambda z: {"m": jnp.asarray(z[:80].reshape(8, 10)), "v": jnp.asarray(z[80:])}
  flat = lambda t: np.concatenate([np.asarray(t["m"]).ravel(), np.asarray(t["v"])])
  y = flat(jax.tree.map(lambda e: e[0], out.eigenvectors))
  hy = flat(jax.grad(loss)(unflat(y)))                       # H y for the quadratic
  theta = float(out.eigenvalues[0])
  true_res = np.linalg.norm(hy - theta * y) / abs(theta)
  np.testing.assert_allclose(float(out.residuals[0]), true_res, rtol=1e-6)
  assert abs(theta - 12.0) <= true_res * abs(theta)
  # Top-3 from 6 steps, no restart.
  out = run(k=3, num_iters=6, max_restarts=0)
  assert int(out.num_iters) == 6 and not bool(out.converged)
  assert np.max(np.asarray(out.residuals)) > 1e-6


def test_dimension_below_num_iters_and_breakdown(x64):
  # dim 6 < default 40 steps: clipped to 6, exact.
  eigs = np.array([3.0, 2.0, 1.0, 0.5, -1.0, -2.0])
  loss, params = _quadratic(eigs, seed=1, split=(2,))
  out = jax.jit(lambda p: hessian_eigenvalues(loss, p, k=6, num_iters=100))(params)
  assert int(out.num_iters) == 6
  np.testing.assert_allclose(np.asarray(out.eigenvalues), eigs, rtol=1e-12, atol=1e-12)
  # Three distinct eigenvalues with multiplicity: the Krylov space is invariant after 3
  # steps (beta = 0); restarts must give no NaN and recover the multiplicities.
  eigs = np.repeat([5.0, 2.0, 0.0], [8, 20, 22])
  loss, params = _quadratic(eigs, seed=2, split=(5, 4))
  out = jax.jit(lambda p: hessian_eigenvalues(loss, p, k=8))(params)
  assert np.all(np.isfinite(np.asarray(out.eigenvalues)))
  np.testing.assert_allclose(np.asarray(out.eigenvalues), 5.0, rtol=1e-10)
  # A multiple of the identity breaks down at every step.
  loss, params = _quadratic(np.full(30, 1.5), seed=3, split=(3, 3))
  out = jax.jit(lambda p: hessian_eigenvalues(loss, p, k=4))(params)
  np.testing.assert_allclose(np.asarray(out.eigenvalues), 1.5, rtol=1e-12)
  assert np.all(np.asarray(out.residuals) <= 1e-12)


@pytest.mark.parametrize("ravel", [True, False])
def test_lanczos_tridiag_orthonormal_basis(x64, monkeypatch, ravel):
  # Both layouts of the basis: one ravelled [m, P] array (one device) and a pytree of
  # [m, *leaf_shape] leaves (several devices), returned as the pytree either way.
  monkeypatch.setattr(_lanczos, "_can_ravel", lambda like: ravel)
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 40))
  a = jnp.asarray(a + a.T)
  v0 = {"a": jnp.asarray(rng.normal(size=(4, 5))), "b": jnp.asarray(rng.normal(size=20))}
  flat = lambda t: jnp.concatenate([t["a"].ravel(), t["b"]])
  unflat = lambda x: {"a": x[:20].reshape(4, 5), "b": x[20:]}
  dec = jax.jit(lambda v: _lanczos.lanczos_tridiag(lambda u: unflat(a @ flat(u)), v, 25))(v0)
  q = np.concatenate([np.asarray(dec.basis["a"]).reshape(25, 20), np.asarray(dec.basis["b"])], 1)
  np.testing.assert_allclose(q @ q.T, np.eye(25), atol=1e-12)
  t = np.diag(dec.alphas) + np.diag(dec.betas[:-1], 1) + np.diag(dec.betas[:-1], -1)
  np.testing.assert_allclose(q @ np.asarray(a) @ q.T, t, atol=1e-10)


@pytest.mark.parametrize("ravel", [True, False])
def test_ravelled_and_pytree_bases_against_dense(x64, monkeypatch, ravel):
  # One device: the parameters are ravelled into one [m, P] basis; several: the basis is a
  # pytree of [m, *leaf_shape] leaves laid out like them. The compiled program shows which
  # one ran (a buffer f64[45, 916] of the whole basis, or f64[45, 24, 24] of the hidden
  # weight's leaf), and each is checked against the dense Hessian on its own.
  h, eigs = _dense("mlp")
  loss, params, data = _mlp(0, jnp.float64)
  monkeypatch.setattr(_lanczos, "_can_ravel", lambda like: ravel)
  compiled = jax.jit(lambda p, data: hessian_eigenvalues(
      lambda q: loss(q, *data), p, k=3, return_eigenvectors=True)).lower(params, data).compile()
  m, dim = _lanczos.default_num_iters(3, h.shape[0]), h.shape[0]
  hlo = compiled.as_text()
  assert (f"f64[{m},{dim}]" in hlo) == ravel and (f"f64[{m},24,24]" in hlo) == (not ravel)
  out = compiled(params, data)
  assert bool(out.converged) and np.all(np.asarray(out.residuals) <= 1e-6)
  assert _rel_err(out.eigenvalues, eigs[:3]) <= 1e-5
  # The Ritz vectors come back as a pytree with a leading axis of 3 on either path, unit
  # vectors whose true residual ||H y - theta y|| / max|lambda| is the reported one: they
  # agree to the round-off of the dense product, ~dim * eps * ||H|| / max|lambda| < 1e-12.
  assert jax.tree.map(jnp.shape, out.eigenvectors) == jax.tree.map(
      lambda x: (3,) + x.shape, params)
  vecs = jax.vmap(lambda v: ravel_pytree(v)[0])(out.eigenvectors)
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-12)
  lam = np.asarray(out.eigenvalues)
  true_res = np.linalg.norm(vecs @ h - lam[:, None] * vecs, axis=1) / np.max(np.abs(eigs))
  np.testing.assert_allclose(np.asarray(out.residuals), true_res, rtol=1e-3, atol=1e-12)


def test_nonfinite_gives_nan_not_hang():
  params = {"w": jnp.ones(5)}
  out = jax.jit(lambda p: hessian_eigenvalues(
      lambda q: jnp.sum(q["w"] ** 2) * jnp.nan, p, k=2))(params)
  assert np.all(np.isnan(np.asarray(out.eigenvalues)))


def test_seed_and_default_key_deterministic():
  loss, params = (lambda p: jnp.sum(jnp.cos(p["w"]) * p["w"] ** 2)), {"w": jnp.linspace(0, 1, 30)}
  f = jax.jit(lambda p, key: hessian_eigenvalues(loss, p, k=2, key=key))
  a = jax.jit(lambda p: hessian_eigenvalues(loss, p, k=2))(params)
  b = f(params, jax.random.PRNGKey(0))
  c = f(params, jax.random.PRNGKey(7))
  # Two compiled programs (key folded in as a constant vs passed in) with the same start
  # vector: they may round differently, so no bit-equality. Each Ritz value lies within
  # residual·max|θ| of an eigenvalue (Kahan's bound for symmetric matrices), so two runs that
  # converge to the same eigenvalues agree to the sum of their residual bounds.
  scale = np.abs(np.asarray(a.eigenvalues)).max()
  bound = (np.asarray(a.residuals) + np.asarray(b.residuals)) * scale
  np.testing.assert_array_less(np.abs(np.asarray(a.eigenvalues) - np.asarray(b.eigenvalues)),
                               bound + np.finfo(np.float32).eps * scale)
  np.testing.assert_allclose(np.asarray(a.eigenvalues), np.asarray(c.eigenvalues), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "`k`"), ({"k": 2.0}, "`k`"), ({"k": 31}, "`k`"),
    ({"num_iters": 0}, "`num_iters`"), ({"k": 3, "num_iters": 2}, "`num_iters`"),
    ({"check_every": 0}, "`check_every`"), ({"check_every": 2.0}, "`check_every`"),
])
def test_bad_arguments(kwargs, match):
  params = {"w": jnp.ones(30)}
  with pytest.raises(ValueError, match=match):
    hessian_eigenvalues(lambda p: jnp.sum(p["w"] ** 2), params, **kwargs)


def test_non_scalar_loss():
  with pytest.raises(TypeError, match="loss_fn"):
    hessian_eigenvalues(lambda p: p["w"] ** 2, {"w": jnp.ones(3)})
