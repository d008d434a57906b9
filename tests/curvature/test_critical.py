"""critical_sharpness, relative forms, hvp and directional sharpness against exact references.

References: on the quadratic L(θ) = ½θᵀAθ the loss along θ − ηd rises exactly when
η > η* = 2 dᵀAθ / dᵀAd (so λ_c = dᵀAd / dᵀAθ, the directional sharpness), computed here in
NumPy; HVPs and directional sharpness against the dense ``jax.hessian``.
"""

import contextlib

import jax
import jax.flatten_util
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


def _tol_bound(k, dtype="float64"):
  # η* ∈ [lower, upper] with 1 − lower/upper ≤ t = 2^−k; reporting the midpoint m gives
  # |λ_c/λ* − 1| = |η* − m|/m ≤ (upper − lower)/(upper + lower) ≤ t/(2 − t) (1/31 at k = 4),
  # plus the rounding of the bracket ends and of 2/m: a few ulps of the dtype.
  return 2.0 ** -k / (2 - 2.0 ** -k) + 8 * np.finfo(dtype).eps


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
  np.testing.assert_allclose(float(out.sharpness), expected, rtol=_tol_bound(4, dtype))
  # λ_dir along the gradient is a weighted mean of eigenvalues: never above λ_max.
  assert float(out.sharpness) <= eigs.max() * (1 + _tol_bound(4, dtype))
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
    # The jvp for the slope, a trial on η*, one at the edge of the closing window.
    assert int(out.num_evals) <= 3


def test_evaluation_count_reuses_loss0():
  a = jnp.diag(jnp.array([4.0, 1.0]))
  loss = lambda p: 0.5 * p @ a @ p
  theta = jnp.array([1.0, 1.0])
  g = a @ theta
  with_l0 = curvature.critical_sharpness(loss, theta, g, grad=g, loss0=loss(theta))
  without = curvature.critical_sharpness(loss, theta, g, grad=g)
  assert int(without.num_evals) == int(with_l0.num_evals) + 1
  # Without the gradient one jvp gives the slope and L(θ) together: one evaluation either way.
  jvp_only = curvature.critical_sharpness(loss, theta, g)
  assert int(jvp_only.num_evals) == int(without.num_evals)
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
  for method in ("interpolate", "bisect"):   # the jvp for the slope counts as one evaluation
    calls.clear()
    out = jax.jit(lambda t, d: curvature.critical_sharpness(loss, t, d, method=method))(
        theta, a @ theta)
    jax.effects_barrier()
    assert len(calls) == int(out.num_evals) >= 3


def test_ascent_direction_is_flagged_before_any_trial():
  a = jnp.eye(3)
  loss = lambda p: 0.5 * p @ a @ p
  theta = jnp.ones(3)
  for method in ("interpolate", "bisect"):
    search = lambda t, d, g: curvature.critical_sharpness(loss, t, d, grad=g, max_evals=25,
                                                          method=method)
    out = jax.jit(search)(theta, -theta, theta)
    assert int(out.status) == curvature.STATUS_NOT_DESCENT
    assert float(out.sharpness) == 0.0 and np.isinf(float(out.step_size))
    assert int(out.num_evals) == 1 and float(out.slope) == -3.0   # L(θ) alone, no trial


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
  with pytest.raises(ValueError, match="bracket"):
    curvature.critical_sharpness(loss, theta, theta, bracket="concave")
  with pytest.raises(ValueError, match="grad"):
    curvature.critical_sharpness(loss, theta, theta, grad={"v": jnp.ones(3)})


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
    grads = [jnp.asarray(np_loss_grad(i, theta)) for i in range(2)]
    outs = [jax.jit(lambda t, ds, gs: curvature.relative_sharpness_matrix(
        fns, t, ds, grads=gs, tol_power=8))(jnp.asarray(theta), dirs, gs)
            for gs in (None, grads)]     # slopes from jvps, then from the gradients
  for out in outs:
    out = jax.tree.map(np.asarray, out)
    assert out.sharpness.shape == (2, 2)
    for i in range(2):
      for j in range(2):
        d = np_loss_grad(j, theta)
        slope = d @ np_loss_grad(i, theta)       # dᵀ∇L_i: > 0 iff d descends L_i
        curv = d @ mats[i] @ d
        np.testing.assert_allclose(out.slope[i, j], slope, rtol=1e-12)
        if slope > 0:
          assert int(out.status[i, j]) == curvature.STATUS_OK
          np.testing.assert_allclose(float(out.sharpness[i, j]), curv / slope,
                                     rtol=_tol_bound(8))
        else:
          assert int(out.status[i, j]) == curvature.STATUS_NOT_DESCENT
          assert float(out.sharpness[i, j]) == 0.0
  out = jax.tree.map(np.asarray, outs[0])
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


def _brackets(r, eta_star, tol_power=4):
  # The model's root is η* itself on a quadratic, so a trial can land on η* to rounding, where
  # the sign of L − L0 is rounding's (float64: |L − L0| ≈ Δθᵀg·η*·δ at η*(1 + δ) is below an
  # ulp of L0 only for δ ≲ 1e-15); 1e-12 of slack on each end covers it.
  assert r.lower <= eta_star * (1 + 1e-12) and r.upper >= eta_star * (1 - 1e-12)
  assert 1 - r.lower / r.upper <= 2.0 ** -tol_power


@pytest.mark.parametrize("seed", range(6))
def test_interpolating_search_keeps_the_guarantee_with_fewer_evaluations(seed):
  """Same bracket guarantee as the paper's bisection, in at most three trials on a quadratic."""
  rng = np.random.default_rng(10 + seed)
  a, _ = _spd(rng, 12, "float64")
  theta = rng.normal(size=12)
  g = a @ theta
  eta_star = 2.0 * (g @ g) / (g @ a @ g)
  guess = eta_star * np.exp(rng.normal(0, 1.0))   # a warm start off by a factor e^N(0,1)
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    t, gj = jnp.asarray(theta), jnp.asarray(g)
    out = {m: jax.tree.map(np.asarray, curvature.critical_sharpness(
        loss, t, gj, grad=gj, loss0=loss(t), step_guess=guess, method=m))
           for m in ("bisect", "interpolate")}
  for m, r in out.items():
    assert int(r.status) == curvature.STATUS_OK, m
    _brackets(r, eta_star)
  assert out["interpolate"].num_evals <= out["bisect"].num_evals
  # On a quadratic the slope and one trial fix the parabola, whose root is η*: the second
  # trial is η* or the edge of the closing window, the third (if needed) closes the bracket.
  assert out["interpolate"].num_evals <= 3


def test_interpolating_search_on_a_non_quadratic_line():
  # Losses along the line whose crossing point is known in closed form (θ = 0, d = −1, so
  # L(θ − ηd) − L(θ) = f(η)): a quartic, −η + η⁴ (η* = 1), whose curvature grows with η; and
  # −η + 4(√(1 + η²) − 1) (η* = 8/15), whose curvature falls with η, like a loss that turns
  # linear far out: a parabola through one far trial lands on the same side again, the path
  # that trusts the model for two one-sided trials in a row.
  lines = ((lambda p: jnp.sum(-p + p ** 4), 1.0),
           (lambda p: jnp.sum(-p + 4.0 * (jnp.sqrt(1.0 + p ** 2) - 1.0)), 8.0 / 15.0))
  for loss, eta_star in lines:
    for guess in (0.02, 0.1, 0.9, 1.0, 1.5, 3.0, 50.0):
      for method in ("bisect", "interpolate"):
        out = curvature.critical_sharpness(loss, jnp.zeros(1), -jnp.ones(1),
                                           step_guess=guess, method=method, tol_power=6)
        assert int(out.status) == curvature.STATUS_OK, (eta_star, guess, method)
        # float32 trial steps: the ends may sit a few ulps of η* on the wrong side.
        slack = 8 * float(jnp.finfo(jnp.float32).eps) * eta_star
        assert float(out.lower) <= eta_star + slack and float(out.upper) >= eta_star - slack
        assert 1 - float(out.lower) / float(out.upper) <= 2.0 ** -6


@pytest.mark.parametrize("seed", range(4))
def test_gradient_replaces_the_jvp_and_a_wrong_one_costs_only_evaluations(seed):
  rng = np.random.default_rng(20 + seed)
  a, _ = _spd(rng, 10, "float64")
  theta = rng.normal(size=10)
  g = a @ theta
  eta_star = 2.0 * (g @ g) / (g @ a @ g)
  guess = eta_star * np.exp(rng.normal(0, 0.5))
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    t, gj = jnp.asarray(theta), jnp.asarray(g)
    search = lambda **kw: jax.tree.map(np.asarray, curvature.critical_sharpness(
        loss, t, gj, loss0=loss(t), step_guess=guess, **kw))
    jvp, right = search(), search(grad=gj)
    wrong = search(grad=5.0 * gj)        # the right sign, five times the slope
  for r in (jvp, right, wrong):
    assert int(r.status) == curvature.STATUS_OK
    _brackets(r, eta_star)
  # slope = Δθᵀ∇L = gᵀg, from the jvp or from `grad`; the jvp is the one extra evaluation.
  np.testing.assert_allclose([jvp.slope, right.slope], g @ g, rtol=1e-12)
  assert right.num_evals == jvp.num_evals - 1 and right.num_evals <= 3


def _tree_np(t):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), t)


def _mlp32(dtype):
  """The MLP of ``_mlp_setup`` with float32 or bfloat16 parameters and data, its loss (in
  float32), and the same parameters and data widened exactly to float64 (NumPy)."""
  with jax.enable_x64(True):
    params, x, y = _mlp_setup(seed=1)
  cast = lambda t: jax.tree.map(lambda v: jnp.asarray(v, dtype), t)
  params, x, y = cast(params), cast(x), cast(y)

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean(((h @ p["w2"]).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

  return params, loss, _tree_np((params, x, y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_ascent_directions_are_not_descent(dtype):
  """Regression: along Δθ with Δθᵀg < 0 the search shrank η until the change in loss was
  rounding and returned a finite λ_c with STATUS_OK: on this MLP (9,600 parameters, batch
  512) 1 of these 16 directions in float32 (λ_c = 8.7e6) and 11 of 16 in bfloat16."""
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"w1": jax.random.normal(k[0], (64, 128)) / 4,
            "b1": jax.random.normal(k[1], (128,)) * 0.1,
            "w2": jax.random.normal(k[2], (128, 10)) / 8}
  params = jax.tree.map(lambda v: v.astype(dtype), params)
  x = jax.random.normal(k[3], (512, 64)).astype(dtype)
  y = jax.random.normal(k[4], (512, 10))
  loss = lambda p: jnp.mean(((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]).astype(jnp.float32)
                             - y) ** 2)
  g = jax.grad(loss)(params)
  rng = np.random.default_rng(0)
  dirs = []
  for _ in range(16):
    # A random direction, turned so that Δθᵀg < 0 (decided in float64 on the stored values).
    r = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), dtype), params)
    dot = sum(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64))
              for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(g)))
    dirs.append(jax.tree.map(lambda v: -np.sign(dot).astype(dtype) * v, r))
  dirs = jax.tree.map(lambda *v: jnp.stack(v), *dirs)
  # The slope from `grad`, or from the jvp; the decision precedes any trial, so one method each.
  for method, grad in (("interpolate", g), ("bisect", None)):
    out = jax.jit(jax.vmap(lambda d: curvature.critical_sharpness(
        loss, params, d, grad=grad, method=method)))(dirs)
    assert (np.asarray(out.status) == curvature.STATUS_NOT_DESCENT).all(), out.status
    assert (np.asarray(out.sharpness) == 0).all() and np.isinf(out.step_size).all()
    assert (np.asarray(out.slope) < 0).all()


@pytest.mark.parametrize("dip_over_ulp", [1.0, 4.0])
def test_a_dip_below_float32_rounding_is_unresolved(dip_over_ulp):
  """A descent direction so nearly orthogonal to the gradient that the loss's whole dip along
  it, (Δθᵀg)²/(2ΔθᵀHΔθ) for the quadratic model, is at most one float32 ulp of L(θ): the
  search cannot place η_c, and says so instead of returning rounding as λ_c."""
  params, loss, (p64, x64, y64) = _mlp32(jnp.float32)
  with jax.enable_x64(True):
    loss64 = lambda p: _mlp_loss(p, x64, y64)      # the same point and data, in float64
    gv, unravel = jax.flatten_util.ravel_pytree(jax.grad(loss64)(p64))
    l0 = float(loss64(p64))
    gv = np.asarray(gv)
    r = np.random.default_rng(3).normal(size=gv.size)
    perp = r - (r @ gv) / (gv @ gv) * gv
    perp /= np.linalg.norm(perp)
    # ΔθᵀHΔθ from one float64 Hessian-vector product (forward-over-reverse)
    hp = jax.jvp(jax.grad(loss64), (p64,), (unravel(jnp.asarray(perp)),))[1]
    curv = float(perp @ np.asarray(jax.flatten_util.ravel_pytree(hp)[0]))
  ulp = np.spacing(np.float32(l0))
  slope = np.sqrt(2 * curv * dip_over_ulp * ulp)   # dip = slope²/(2 curv) = dip_over_ulp ulps
  d = perp + slope / (gv @ gv) * gv
  # The slope is 40x the float32 rounding of Δθᵀg (|Δθ| ≈ 1): its sign is not in question.
  assert curv > 0 and slope > 30 * np.finfo(np.float32).eps * np.linalg.norm(gv)
  direction = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), unravel(jnp.asarray(d)))
  g32 = jax.grad(loss)(params)
  for method, grad in (("interpolate", g32), ("bisect", None)):
    out = curvature.critical_sharpness(loss, params, direction, grad=grad, method=method)
    assert int(out.status) == curvature.STATUS_UNRESOLVED, (method, out)
    assert np.isnan(float(out.sharpness)) and np.isnan(float(out.step_size))
    assert float(out.slope) > 0
  assert curvature.STATUS_NAMES[curvature.STATUS_UNRESOLVED] == "unresolved"
  # The same search along the gradient itself is resolved, and agrees with float64.
  with jax.enable_x64(True):
    ref = curvature.critical_sharpness(loss64, p64, unravel(jnp.asarray(gv)), tol_power=12)
  out = curvature.critical_sharpness(loss, params, g32, grad=g32)
  assert int(out.status) == curvature.STATUS_OK
  np.testing.assert_allclose(float(out.sharpness), float(ref.sharpness),
                             rtol=_tol_bound(4, "float32") + _tol_bound(12))


@pytest.mark.parametrize("seed", range(3))
def test_convex_bracket_closes_in_two_trials_from_below(seed):
  """bracket="convex": a rise just above the model's root and the chord to a trial below
  certify the bracket; on a quadratic (convex) the analytic η* is inside and within 2^-k."""
  rng = np.random.default_rng(30 + seed)
  a, _ = _spd(rng, 10, "float64")
  theta = rng.normal(size=10)
  g = a @ theta
  eta_star = 2.0 * (g @ g) / (g @ a @ g)
  with jax.enable_x64(True):
    loss = lambda p: 0.5 * p @ jnp.asarray(a) @ p
    t, gj = jnp.asarray(theta), jnp.asarray(g)
    for factor in (0.3, 0.8, 1.7):
      r = jax.tree.map(np.asarray, curvature.critical_sharpness(
          loss, t, gj, grad=gj, loss0=loss(t), step_guess=factor * eta_star, bracket="convex"))
      assert int(r.status) == curvature.STATUS_OK
      _brackets(r, eta_star)
      np.testing.assert_allclose(r.sharpness, 2 / eta_star, rtol=_tol_bound(4))
      assert r.num_evals == (2 if factor < 1 else 3)


def test_convex_bracket_on_a_line_not_convex_near_zero():
  # f(η) = L(θ − η) − L(θ) = −η − η² + 3η³ (θ = 0, d = 1): below its tangent −η near 0 (not
  # convex there, which the check on the samples sees), convex beyond η = 1/9. The crossing is
  # the root of −1 − η + 3η²: η* = (1 + √13)/6, inside the bracket from any start.
  loss = lambda p: jnp.sum(p - p ** 2 - 3 * p ** 3)
  eta_star = (1 + np.sqrt(13)) / 6
  with jax.enable_x64(True):
    for guess in (0.05, 0.3, 0.7, 2.0):
      r = curvature.critical_sharpness(loss, jnp.zeros(1), jnp.ones(1), step_guess=guess,
                                       bracket="convex")
      assert int(r.status) == curvature.STATUS_OK
      _brackets(jax.tree.map(np.asarray, r), eta_star)
