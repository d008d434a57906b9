"""critical_sharpness, relative forms, hvp and directional sharpness against exact references.

References: on the quadratic L(θ) = ½θᵀAθ the loss along θ − ηd rises exactly when
η > η* = 2 dᵀAθ / dᵀAd (so λ_c = dᵀAd / dᵀAθ, the directional sharpness), computed here in
NumPy; HVPs and directional sharpness against the dense ``jax.hessian``.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature


def _dtype_ctx(dtype):
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _spd(rng, n, dtype, eigs=None):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eigs = np.geomspace(0.1, 10.0, n) if eigs is None else np.asarray(eigs)
  return (q * eigs) @ q.T, eigs


def _tol_bound(k):
  # η* ∈ [lower, upper] with 1 − lower/upper ≤ 2^−k; reporting the midpoint gives
  # |λ_c/λ* − 1| ≤ (upper − lower) / (2 lower) ≤ 2^−k / (2 (1 − 2^−k)).
  return 2.0 ** -k / (2 * (1 - 2.0 ** -k))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [3, 17])
def test_quadratic_gradient_direction(dtype, seed, n):
  rng = np.random.default_rng(seed)
  a, eigs = _spd(rng, n, dtype)
  theta = rng.normal(size=n)
  g = a @ theta
  expected = (g @ a @ g) / (g @ g)           # λ_dir along d = g
  eta_star = 2.0 / expected
  with _dtype_ctx(dtype):
    a_j = jnp.asarray(a, dtype)
    # params as a pytree of two leaves, to exercise the tree code.
    params = {"x": jnp.asarray(theta[:1], dtype), "y": jnp.asarray(theta[1:], dtype)}
    direction = {"x": jnp.asarray(g[:1], dtype), "y": jnp.asarray(g[1:], dtype)}

    def loss(p):
      v = jnp.concatenate([p["x"], p["y"]])
      return 0.5 * v @ a_j @ v

    out = jax.jit(lambda p, d: curvature.critical_sharpness(loss, p, d))(params, direction)
  assert int(out.status) == curvature.STATUS_OK
  assert float(out.lower) <= eta_star * (1 + 1e-5) and float(out.upper) >= eta_star * (1 - 1e-5)
  assert 1 - float(out.lower) / float(out.upper) <= 2.0 ** -4
  np.testing.assert_allclose(float(out.sharpness), expected, rtol=_tol_bound(4))
  # λ_dir along the gradient is a weighted mean of eigenvalues: never above λ_max.
  assert float(out.sharpness) <= eigs.max() * (1 + _tol_bound(4))
  assert out.sharpness.dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_tolerance_follows_tol_power(k):
  rng = np.random.default_rng(3)
  a, _ = _spd(rng, 6, "float64")
  theta = rng.normal(size=6)
  g = a @ theta
  expected = (g @ a @ g) / (g @ g)
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    out = curvature.critical_sharpness(loss, jnp.asarray(theta), jnp.asarray(g), tol_power=k)
  assert 1 - float(out.lower) / float(out.upper) <= 2.0 ** -k
  np.testing.assert_allclose(float(out.sharpness), expected, rtol=_tol_bound(k))


def test_top_eigenvector_gives_lambda_max():
  rng = np.random.default_rng(4)
  a, eigs = _spd(rng, 8, "float64")
  w, v = np.linalg.eigh(a)
  theta = 0.7 * v[:, -1]                       # θ along the top eigenvector
  g = a @ theta                                # = λ_max θ
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    out = curvature.critical_sharpness(loss, jnp.asarray(theta), jnp.asarray(g), tol_power=10)
  np.testing.assert_allclose(float(out.sharpness), w[-1], rtol=_tol_bound(10))


@pytest.mark.parametrize("guess_factor", [1e-3, 0.5, 1.0, 3.0, 1e3])
def test_warm_start_same_answer_any_guess(guess_factor):
  a = jnp.diag(jnp.array([4.0, 1.0, 0.5]))
  loss = lambda p: 0.5 * p @ a @ p
  theta = jnp.array([1.0, -2.0, 3.0])
  g = a @ theta
  eta_star = float(2 * (g @ g) / (g @ a @ g))
  out = curvature.critical_sharpness(loss, theta, g, step_guess=guess_factor * eta_star,
                                     loss0=loss(theta))
  assert float(out.lower) <= eta_star <= float(out.upper)
  assert int(out.num_evals) <= 40
  if guess_factor == 1.0:
    # Bracket [η*, 2η*] or [η*/2, η*] at once, then four bisections at most.
    assert int(out.num_evals) <= 6


def test_evaluation_count_reuses_loss0():
  a = jnp.diag(jnp.array([4.0, 1.0]))
  loss = lambda p: 0.5 * p @ a @ p
  theta = jnp.array([1.0, 1.0])
  g = a @ theta
  with_l0 = curvature.critical_sharpness(loss, theta, g, loss0=loss(theta))
  without = curvature.critical_sharpness(loss, theta, g)
  assert int(without.num_evals) == int(with_l0.num_evals) + 1
  # Exact on purpose: L(θ) = 2.5 and every product of this integer quadratic is exactly
  # representable, so the two programs see the same L0 bit for bit.
  np.testing.assert_array_equal(with_l0.sharpness, without.sharpness)


def test_counts_every_forward_pass():
  calls = []
  a = jnp.diag(jnp.array([3.0, 1.0]))

  def loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * p @ a @ p

  theta = jnp.array([1.0, 2.0])
  out = jax.jit(lambda t, d: curvature.critical_sharpness(loss, t, d))(theta, a @ theta)
  jax.effects_barrier()
  assert len(calls) == int(out.num_evals)


def test_ascent_direction_flags_and_stops_at_cap():
  a = jnp.eye(3)
  loss = lambda p: 0.5 * p @ a @ p
  theta = jnp.ones(3)
  out = jax.jit(lambda t, d: curvature.critical_sharpness(loss, t, d, max_evals=25))(
      theta, -theta)
  assert int(out.status) == curvature.STATUS_NOT_DESCENT
  assert float(out.sharpness) == 0.0 and np.isinf(float(out.step_size))
  assert int(out.num_evals) == 25


def test_loss_that_never_rises():
  loss = lambda p: -jnp.sum(jnp.tanh(p))       # bounded, decreasing along +1 forever
  theta = jnp.zeros(2)
  out = curvature.critical_sharpness(loss, theta, -jnp.ones(2), max_evals=30)
  assert int(out.status) == curvature.STATUS_NO_RISE
  assert float(out.sharpness) == 0.0 and int(out.num_evals) == 30


def test_nan_losses_are_flagged_not_hidden():
  theta = jnp.ones(2)
  out = curvature.critical_sharpness(lambda p: jnp.sum(p) * jnp.nan, theta, theta)
  assert int(out.status) == curvature.STATUS_NONFINITE and np.isnan(float(out.sharpness))
  assert int(out.num_evals) == 1
  # NaN appearing only at large steps (log of a negative number).
  loss = lambda p: jnp.sum(jnp.log(p))
  out = jax.jit(lambda t: curvature.critical_sharpness(loss, t, -jnp.ones(2) * 0 + 1.0))(theta)
  assert int(out.status) == curvature.STATUS_NONFINITE and np.isnan(float(out.sharpness))


def test_inf_trial_loss_counts_as_rise():
  # Finite until the step crosses 1.5, +inf beyond: η_c = 1.5 even though L never rises
  # smoothly.
  loss = lambda p: jnp.where(p[0] < -0.5, jnp.inf, p[0])
  theta = jnp.array([1.0])
  out = curvature.critical_sharpness(loss, theta, jnp.array([1.0]), tol_power=8)
  assert int(out.status) == curvature.STATUS_OK
  assert float(out.lower) <= 1.5 <= float(out.upper)


def test_bad_input_errors_name_the_argument():
  theta = {"w": jnp.ones(3)}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.raises(TypeError, match="loss_fn"):
    curvature.critical_sharpness(lambda p: p["w"] ** 2, theta, theta)
  with pytest.raises(ValueError, match="direction"):
    curvature.critical_sharpness(loss, theta, {"v": jnp.ones(3)})
  with pytest.raises(ValueError, match="direction"):
    curvature.critical_sharpness(loss, theta, {"w": jnp.ones(4)})
  with pytest.raises(ValueError, match="tol_power"):
    curvature.critical_sharpness(loss, theta, theta, tol_power=0)
  with pytest.raises(ValueError, match="max_evals"):
    curvature.critical_sharpness(loss, theta, theta, max_evals=1)
  with pytest.raises(ValueError, match="step_guess"):
    curvature.critical_sharpness(loss, theta, theta, step_guess=-1.0)
  with pytest.raises(ValueError, match="growth"):
    curvature.critical_sharpness(loss, theta, theta, growth=1.0)
  with pytest.raises(ValueError, match="method"):
    curvature.critical_sharpness(loss, theta, theta, method="golden")


def test_bf16_params_compare_losses_in_float32():
  a = jnp.diag(jnp.array([4.0, 1.0]))
  loss = lambda p: 0.5 * p.astype(jnp.float32) @ a @ p.astype(jnp.float32)
  theta = jnp.array([1.0, 1.0], jnp.bfloat16)
  out = curvature.critical_sharpness(loss, theta, (a @ theta.astype(jnp.float32)).astype(
      jnp.bfloat16))
  assert out.loss0.dtype == jnp.float32
  # gᵀAg/gᵀg = 65/17; tolerance: the search's 3.3 % plus bf16 rounding of θ − ηd (2^-8
  # relative per coordinate, which moves the crossing point of L by about 1 %).
  np.testing.assert_allclose(float(out.sharpness), 65 / 17, rtol=_tol_bound(4) + 0.015)


def _quad_task(rng, n):
  a, _ = _spd(rng, n, "float64")
  return a


def test_relative_matrix_against_formula():
  rng = np.random.default_rng(5)
  n = 6
  mats = [_quad_task(rng, n) for _ in range(2)]
  centres = [rng.normal(size=n) for _ in range(2)]
  theta = rng.normal(size=n)

  def np_loss_grad(i, t):
    return mats[i] @ (t - centres[i])

  with jax.enable_x64(True):
    fns = [lambda p, i=i: 0.5 * (p - centres[i]) @ jnp.asarray(mats[i]) @ (p - centres[i])
           for i in range(2)]
    dirs = [jnp.asarray(np_loss_grad(j, theta)) for j in range(2)]
    out = jax.jit(lambda t, ds: curvature.relative_sharpness_matrix(fns, t, ds, tol_power=8))(
        jnp.asarray(theta), dirs)
    out = jax.tree.map(np.asarray, out)
  assert out.sharpness.shape == (2, 2)
  for i in range(2):
    for j in range(2):
      d = np_loss_grad(j, theta)
      slope = d @ np_loss_grad(i, theta)       # dᵀ∇L_i: > 0 iff d descends L_i
      curv = d @ mats[i] @ d
      if slope > 0:
        assert int(out.status[i, j]) == curvature.STATUS_OK
        np.testing.assert_allclose(float(out.sharpness[i, j]), curv / slope,
                                   rtol=_tol_bound(8))
      else:
        assert int(out.status[i, j]) == curvature.STATUS_NOT_DESCENT
        assert float(out.sharpness[i, j]) == 0.0
  with jax.enable_x64(True):
    single = curvature.relative_critical_sharpness(fns[0], jnp.asarray(theta), dirs[1],
                                                   tol_power=8)
    # The matrix is a vmapped program, the single call another one: they may round the
    # trial-step arithmetic differently (float64, a few dozen operations per trial), so they
    # agree to rounding, not bit for bit.
    np.testing.assert_allclose(np.asarray(single.sharpness), out.sharpness[0, 1],
                               rtol=64 * np.finfo(np.float64).eps)


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def _mlp_setup(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {"w1": jax.random.normal(k[0], (4, 6), jnp.float64) * 0.7,
            "b1": jax.random.normal(k[1], (6,), jnp.float64) * 0.1,
            "w2": jax.random.normal(k[2], (6, 2), jnp.float64) * 0.7}
  x = jax.random.normal(k[3], (16, 4), jnp.float64)
  y = jax.random.normal(k[4], (16, 2), jnp.float64)
  return params, x, y


def _dense(params, x, y):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  f = lambda v: _mlp_loss(unravel(v), x, y)
  return flat, unravel, np.asarray(jax.hessian(f)(flat)), np.asarray(jax.grad(f)(flat))


def test_hvp_and_directional_sharpness_against_dense_hessian():
  import jax.flatten_util  # noqa: F401
  with jax.enable_x64(True):
    params, x, y = _mlp_setup()
    flat, unravel, h, g = _dense(params, x, y)
    loss = lambda p: _mlp_loss(p, x, y)
    v = np.random.default_rng(0).normal(size=flat.size)
    hv = jax.jit(lambda p, v: curvature.hvp(loss, p, v))(params, unravel(jnp.asarray(v)))
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv)[0], h @ v, rtol=1e-10,
                               atol=1e-12)
    ds = curvature.directional_sharpness(loss, params, unravel(jnp.asarray(g)))
    np.testing.assert_allclose(float(ds), (g @ h @ g) / (g @ g), rtol=1e-10)
    # Critical sharpness along the gradient of a non-quadratic loss: close to λ_dir for a
    # small step, and never above the dense λ_max by more than the search tolerance.
    cs = curvature.critical_sharpness(loss, params, unravel(jnp.asarray(g)), tol_power=10)
    assert float(cs.sharpness) <= np.linalg.eigvalsh(h).max() * (1 + _tol_bound(10)) * 1.5
  with pytest.raises(ValueError, match="v"):
    curvature.hvp(lambda p: jnp.sum(p["a"]), {"a": jnp.ones(2)}, {"b": jnp.ones(2)})


def test_directional_sharpness_zero_slope_is_nan():
  loss = lambda p: 0.5 * jnp.sum(p ** 2)
  out = curvature.directional_sharpness(loss, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
  assert np.isnan(float(out))


@pytest.mark.parametrize("seed", range(6))
def test_interpolating_search_keeps_the_guarantee_with_fewer_evaluations(seed):
  """Same bracket guarantee as the paper's bisection; about four trials on a quadratic."""
  rng = np.random.default_rng(10 + seed)
  a, _ = _spd(rng, 12, "float64")
  theta = rng.normal(size=12)
  g = a @ theta
  eta_star = 2.0 * (g @ g) / (g @ a @ g)
  guess = eta_star * np.exp(rng.normal(0, 1.0))   # a warm start off by a factor e^N(0,1)
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    out = {m: jax.tree.map(np.asarray, curvature.critical_sharpness(
        loss, jnp.asarray(theta), jnp.asarray(g), loss0=loss(jnp.asarray(theta)),
        step_guess=guess, method=m)) for m in ("bisect", "interpolate")}
  for m, r in out.items():
    assert int(r.status) == curvature.STATUS_OK, m
    assert r.lower <= eta_star <= r.upper, m
    assert 1 - r.lower / r.upper <= 2.0 ** -4, m
  assert out["interpolate"].num_evals <= out["bisect"].num_evals
  assert out["interpolate"].num_evals <= 4 + int(np.ceil(abs(np.log2(guess / eta_star))))


def test_interpolating_search_on_a_non_quadratic_line():
  # Loss along the line: a quartic whose crossing point is known in closed form.
  # L(θ − η) − L(θ) = −η + η⁴ (θ = 0, d = 1, L(x) = x + x⁴) → η* = 1.
  loss = lambda p: jnp.sum(-p + p ** 4)
  for guess in (0.1, 0.9, 1.0, 3.0, 50.0):
    for method in ("bisect", "interpolate"):
      out = curvature.critical_sharpness(loss, jnp.zeros(1), -jnp.ones(1),
                                         step_guess=guess, method=method, tol_power=6)
      assert int(out.status) == curvature.STATUS_OK
      assert float(out.lower) <= 1.0 + 1e-6 and float(out.upper) >= 1.0 - 1e-6
      assert 1 - float(out.lower) / float(out.upper) <= 2.0 ** -6


@pytest.mark.parametrize("seed", range(4))
def test_known_slope_saves_a_trial_and_keeps_the_guarantee(seed):
  rng = np.random.default_rng(20 + seed)
  a, _ = _spd(rng, 10, "float64")
  theta = rng.normal(size=10)
  g = a @ theta
  eta_star = 2.0 * (g @ g) / (g @ a @ g)
  guess = eta_star * np.exp(rng.normal(0, 0.5))
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    t = jnp.asarray(theta)
    kw = dict(loss0=loss(t), step_guess=guess, method="interpolate")
    without = jax.tree.map(np.asarray, curvature.critical_sharpness(loss, t, jnp.asarray(g), **kw))
    # slope = dL(θ − ηg)/dη at 0 = −gᵀg (NumPy), and a deliberately wrong slope.
    right = jax.tree.map(np.asarray, curvature.critical_sharpness(
        loss, t, jnp.asarray(g), slope=-(g @ g), **kw))
    wrong = jax.tree.map(np.asarray, curvature.critical_sharpness(
        loss, t, jnp.asarray(g), slope=-5.0 * (g @ g), **kw))
  for r in (without, right, wrong):
    assert int(r.status) == curvature.STATUS_OK
    assert r.lower <= eta_star <= r.upper and 1 - r.lower / r.upper <= 2.0 ** -4
  assert right.num_evals <= 3 and right.num_evals <= without.num_evals
