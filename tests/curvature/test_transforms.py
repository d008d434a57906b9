"""The optax probes: what they record, against direct calls and the quadratic formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature


def _quadratic(n=10, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eigs = np.linspace(0.5, 8.0, n)
  a = jnp.asarray((q * eigs) @ q.T, jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=n), jnp.float32)}

  def loss_fn(p, batch):
    return 0.5 * p["w"] @ a @ p["w"] + 0.0 * batch

  return a, eigs, params, loss_fn


def _run(tx, params, loss_fn, steps, **extra):
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, g = jax.value_and_grad(loss_fn)(params, batch)
    u, state = tx.update(g, state, params, value=loss,
                         value_fn=lambda p: loss_fn(p, batch), **extra)
    return optax.apply_updates(params, u), state, u

  history = []
  for _ in range(steps):
    before = params
    params, state, u = step(params, state, jnp.float32(0.0))
    history.append((before, state, u))
  return params, state, history


def test_probe_leaves_updates_unchanged_and_matches_direct_call():
  a, _, params, loss_fn = _quadratic()
  lr = 2.0 ** -4   # a power of two, so that Δθ = −u / lr below is exact
  plain = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))
  probed = optax.chain(optax.scale_by_adam(), curvature.critical_sharpness_probe(
      learning_rate=lr, growth=2.0), optax.scale_by_learning_rate(lr))
  p_plain, _, h_plain = _run(plain, params, loss_fn, 5)
  p_probe, _, h_probe = _run(probed, params, loss_fn, 5)
  # The two chains are two compiled programs: XLA may fuse Adam's element-wise ops (and
  # contract them into FMAs) differently, each op rounding by ≤ 1 ulp. Adam's update is ~6
  # such ops on moments carried over 5 steps, so 16 ulps of the largest update bounds the
  # difference; a probe that changed the updates at all would move them by far more.
  eps = np.finfo(np.float32).eps
  for (_, _, u1), (_, _, u2) in zip(h_plain, h_probe):
    scale = np.abs(np.asarray(u1["w"])).max()
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=0, atol=16 * eps * scale)
  moved = sum(np.abs(np.asarray(u["w"])).max() for _, _, u in h_plain)
  np.testing.assert_allclose(p_plain["w"], p_probe["w"], rtol=0,
                             atol=16 * eps * moved + eps * np.abs(np.asarray(p_plain["w"])).max())
  # The probe saw Δθ = u / (−lr): the unit-LR Adam update. Measure it directly.
  before, state, u = h_probe[-1]
  direction = jax.tree.map(lambda x: -x / lr, u)
  loss = lambda p: loss_fn(p, 0.0)
  info = state[1].info
  # Warm start = the previous η_c, exactly as the probe does.
  guess = h_probe[-2][1][1].info.step_size
  direct = curvature.critical_sharpness(loss, before, direction, loss0=loss(before),
                                        step_guess=guess, growth=2.0, method="interpolate")
  np.testing.assert_allclose(info.sharpness, direct.sharpness, rtol=1e-5)
  np.testing.assert_allclose(info.lr_sharpness, lr * direct.sharpness, rtol=1e-5)
  assert int(info.num_evals) == int(direct.num_evals)


def test_sgd_probe_matches_quadratic_formula_every_step():
  a, eigs, params, loss_fn = _quadratic(seed=1)
  sched = optax.linear_schedule(0.01, 0.1, 10)
  tx = optax.chain(curvature.critical_sharpness_probe(learning_rate=sched, directional=True),
                   optax.scale_by_learning_rate(sched))
  _, _, hist = _run(tx, params, loss_fn, 10)
  an = np.asarray(a)
  for t, (before, state, _) in enumerate(hist):
    w = np.asarray(before["w"])
    g = an @ w
    lam = (g @ an @ g) / (g @ g)
    info = state[0].info
    np.testing.assert_allclose(info.sharpness, lam, rtol=1 / 30)
    np.testing.assert_allclose(info.directional_sharpness, lam, rtol=1e-4)
    np.testing.assert_allclose(info.lr_sharpness, float(sched(t)) * info.sharpness, rtol=1e-6)
    assert float(info.sharpness) <= eigs.max() * (1 + 1 / 30)
    assert bool(info.measured) and int(info.status) == curvature.STATUS_OK


@pytest.mark.parametrize("method", ["bisect", "interpolate"])
def test_adaptive_warm_start_saves_evaluations_at_equal_tolerance(method):
  a, _, params, loss_fn = _quadratic(seed=2)
  counts = {}
  for growth in (2.0, "adaptive"):
    tx = optax.chain(curvature.critical_sharpness_probe(growth=growth, method=method),
                     optax.scale_by_learning_rate(0.02))
    _, _, hist = _run(tx, params, loss_fn, 40)
    an = np.asarray(a)
    evals = []
    for before, state, _ in hist:
      g = an @ np.asarray(before["w"])
      np.testing.assert_allclose(state[0].info.sharpness, (g @ an @ g) / (g @ g), rtol=1 / 30)
      evals.append(int(state[0].info.num_evals))
    counts[growth] = np.mean(evals[5:])
  if method == "bisect":
    assert counts["adaptive"] < counts[2.0]
  else:
    # On a quadratic the parabola is exact: about three trials whatever the growth.
    assert max(counts.values()) <= 3.5


def test_every_k_skips_without_recompiling():
  _, _, params, loss_fn = _quadratic()
  tx = optax.chain(curvature.critical_sharpness_probe(every=3),
                   optax.scale_by_learning_rate(0.01))
  traces = []

  def loss_traced(p, b):
    return loss_fn(p, b)

  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    loss, g = jax.value_and_grad(loss_traced)(params, batch)
    u, state = tx.update(g, state, params, value=loss, value_fn=lambda p: loss_traced(p, batch))
    return optax.apply_updates(params, u), state

  measured, evals = [], []
  for _ in range(7):
    params, state = step(params, state, jnp.float32(0.0))
    measured.append(bool(state[0].info.measured))
    evals.append(int(state[0].info.num_evals))
  assert len(traces) == 1
  assert measured == [True, False, False, True, False, False, True]
  assert all(e == 0 for e, m in zip(evals, measured) if not m)


def test_scaled_probe_after_learning_rate():
  _, _, params, loss_fn = _quadratic(seed=3)
  lr = 0.03
  before_lr = optax.chain(curvature.critical_sharpness_probe(learning_rate=lr, growth=2.0,
                                                             tol_power=10),
                          optax.scale_by_learning_rate(lr))
  after_lr = optax.chain(optax.scale_by_learning_rate(lr),
                         curvature.critical_sharpness_probe(scaled=True, growth=2.0,
                                                            tol_power=10))
  _, _, h1 = _run(before_lr, params, loss_fn, 3)
  _, _, h2 = _run(after_lr, params, loss_fn, 3)
  # After the scaling the direction is lr·Δθ: its critical sharpness is lr·λ_c.
  for (_, s1, _), (_, s2, _) in zip(h1, h2):
    np.testing.assert_allclose(s2[1].info.sharpness, s1[0].info.lr_sharpness, rtol=2e-3)


def test_probe_requires_value_fn():
  _, _, params, _ = _quadratic()
  tx = curvature.critical_sharpness_probe()
  with pytest.raises(TypeError, match="value_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="every"):
    curvature.critical_sharpness_probe(every=0)
  with pytest.raises(ValueError, match="growth"):
    curvature.critical_sharpness_probe(growth="fast")


def test_nan_loss_is_flagged_and_keeps_warm_start():
  _, _, params, _ = _quadratic()
  tx = curvature.critical_sharpness_probe()
  state = tx.init(params)
  good = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
  _, state = tx.update(params, state, params, value_fn=good)
  guess = state.warm.step_guess
  bad = lambda p: jnp.sum(p["w"]) * jnp.nan
  _, state2 = jax.jit(lambda s, p: tx.update(p, s, p, value_fn=bad))(state, params)
  assert int(state2.info.status) == curvature.STATUS_NONFINITE
  assert np.isnan(float(state2.info.sharpness))
  assert float(state2.warm.step_guess) == float(guess)


def test_relative_probe_matches_direct_relative_sharpness():
  a, _, params, loss_fn = _quadratic(seed=4)
  rng = np.random.default_rng(0)
  b = jnp.asarray(np.diag(rng.uniform(0.5, 3.0, 10)), jnp.float32)
  centre = jnp.asarray(rng.normal(size=10), jnp.float32)
  other = lambda p: 0.5 * (p["w"] - centre) @ b @ (p["w"] - centre)
  tx = optax.chain(curvature.relative_sharpness_probe(["other", "self"], learning_rate=0.1,
                                                      growth=2.0),
                   optax.scale_by_learning_rate(0.1))
  state = tx.init(params)
  loss = lambda p: loss_fn(p, 0.0)
  g = jax.grad(loss)(params)
  _, state = tx.update(g, state, params, value_fn=loss,
                       relative_value_fns={"other": other, "self": loss, "unused": other})
  info = state[0].info
  for name, fn in (("other", other), ("self", loss)):
    direct = curvature.relative_critical_sharpness(fn, params, g, method="interpolate")
    np.testing.assert_allclose(info.sharpness[name], direct.sharpness, rtol=1e-6)
    np.testing.assert_allclose(info.lr_sharpness[name], 0.1 * direct.sharpness, rtol=1e-6)
  metrics = curvature.probe_metrics(state)
  assert "curv/relative/other" in metrics and "curv/relative/self" in metrics
  with pytest.raises(KeyError, match="other"):
    tx.update(g, state, params, relative_value_fns={"self": loss})
  with pytest.raises(TypeError, match="relative_value_fns"):
    tx.update(g, state, params)


def test_controller_tames_a_divergent_learning_rate():
  a, eigs, params, loss_fn = _quadratic(seed=5)
  lr = 3.0 / eigs.max()                        # plain GD diverges: lr·λ_max = 3 > 2
  _, _, hist = _run(optax.sgd(lr), params, loss_fn, 60)
  plain_final = float(loss_fn(hist[-1][0], 0.0))
  tx = optax.chain(curvature.scale_by_critical_sharpness(target=1.0, learning_rate=lr),
                   optax.scale_by_learning_rate(lr))
  final, state, hist = _run(tx, params, loss_fn, 60)
  assert float(loss_fn(final, 0.0)) < 1e-3 * float(loss_fn(params, 0.0)) < plain_final
  # Where the clip is inactive the effective η·λ_c equals the target.
  an = np.asarray(a)
  for before, st, _ in hist[:5]:
    g = an @ np.asarray(before["w"])
    lam = (g @ an @ g) / (g @ g)
    scale = float(st[0].scale)
    if scale < 1.0:
      np.testing.assert_allclose(lr * scale * lam, 1.0, rtol=1 / 30)
  assert "curv/lr_scale" in curvature.probe_metrics(state)


def test_probe_uses_the_gradient_when_given():
  a, _, params, loss_fn = _quadratic(seed=6)
  an = np.asarray(a)
  tx = optax.chain(curvature.critical_sharpness_probe(), optax.scale_by_learning_rate(0.02))
  evals = {}
  for pass_grad in (False, True):
    state, p, counts = tx.init(params), params, []
    for _ in range(20):
      loss, g = jax.value_and_grad(loss_fn)(p, 0.0)
      extra = {"grad": g} if pass_grad else {}
      u, state = tx.update(g, state, p, value=loss, value_fn=lambda q: loss_fn(q, 0.0), **extra)
      w = an @ np.asarray(p["w"])
      np.testing.assert_allclose(state[0].info.sharpness, (w @ an @ w) / (w @ w), rtol=1 / 30)
      counts.append(int(state[0].info.num_evals))
      p = optax.apply_updates(p, u)
    evals[pass_grad] = np.mean(counts[1:])
  assert evals[True] < evals[False]
  with pytest.raises(ValueError, match="grad"):
    tx.update(g, state, p, value_fn=lambda q: loss_fn(q, 0.0), grad={"v": g["w"]})


def test_probe_metrics_directional_key_is_nan_unless_directional():
  # Documented in probe_metrics: the key is always there (a plain and a directional probe have
  # states of one structure), NaN for a plain probe, ΔθᵀHΔθ/Δθᵀg for a directional one.
  a, _, params, loss_fn = _quadratic(seed=7)
  w = np.asarray(a) @ np.asarray(params["w"])
  keys = {"curv/critical_sharpness", "curv/step_size", "curv/num_evals", "curv/lr_sharpness",
          "curv/status", "curv/directional_sharpness"}
  for directional in (False, True):
    tx = optax.chain(curvature.critical_sharpness_probe(learning_rate=0.02,
                                                        directional=directional),
                     optax.scale_by_learning_rate(0.02))
    _, state, _ = _run(tx, params, loss_fn, 1)
    metrics = curvature.probe_metrics(state)
    jitted = jax.jit(curvature.probe_metrics)(state)
    assert set(metrics) == set(jitted) == keys
    ds = float(metrics["curv/directional_sharpness"])
    if directional:
      np.testing.assert_allclose(ds, (w @ np.asarray(a) @ w) / (w @ w), rtol=1e-4)
    else:
      assert np.isnan(ds) and np.isnan(float(jitted["curv/directional_sharpness"]))
    assert np.isfinite(float(metrics["curv/critical_sharpness"]))


def test_controller_brakes_along_an_ascent_direction():
  # Regression (issue 10 §4.5): λ_c = 0 from STATUS_NOT_DESCENT was mapped to max_scale,
  # lengthening steps along a direction that raises the loss. An update of −g (ascent at unit
  # LR: the chain applies params − lr·u with u = −g) must get min_scale; +g (descent along a
  # linear loss, which never rises: STATUS_NO_RISE) keeps max_scale.
  loss_fn = lambda p: jnp.sum(p["w"])        # linear: gradient 1, never turns back up
  params = {"w": jnp.zeros(3)}
  g = jax.grad(loss_fn)(params)
  for sign, status, want in ((-1.0, curvature.STATUS_NOT_DESCENT, 0.25),
                             (1.0, curvature.STATUS_NO_RISE, 2.0)):
    tx = curvature.scale_by_critical_sharpness(target=1.0, learning_rate=0.1, min_scale=0.25,
                                               max_scale=2.0)
    state = tx.init(params)
    u = jax.tree.map(lambda x: sign * x, g)
    out, state = jax.jit(lambda u, s, p: tx.update(u, s, p, value_fn=loss_fn))(u, state, params)
    assert int(state.probe.info.status) == status
    assert float(state.scale) == want
    np.testing.assert_array_equal(out["w"], want * u["w"])  # x·2^k is exact


def test_convex_bracket_probe_matches_the_formula_in_fewer_evaluations():
  # On a quadratic (convex along every line) both brackets hold λ_c within 2^-4/(2 − 2^-4)
  # = 1/31 of gᵀAg/gᵀg (NumPy), plus float32 rounding of the bracket ends.
  a, _, params, loss_fn = _quadratic(seed=8)
  an = np.asarray(a)
  evals = {}
  for bracket in ("trials", "convex"):
    tx = optax.chain(curvature.critical_sharpness_probe(bracket=bracket),
                     optax.scale_by_learning_rate(0.02))

    @jax.jit
    def step(p, state):
      loss, g = jax.value_and_grad(loss_fn)(p, 0.0)
      u, state = tx.update(g, state, p, value=loss, grad=g, value_fn=lambda q: loss_fn(q, 0.0))
      return optax.apply_updates(p, u), state

    state, p, counts = tx.init(params), params, []
    for _ in range(12):
      w = an @ np.asarray(p["w"])
      p, state = step(p, state)
      np.testing.assert_allclose(state[0].info.sharpness, (w @ an @ w) / (w @ w),
                                 rtol=1 / 31 + 1e-5)
      counts.append(int(state[0].info.num_evals))
    evals[bracket] = np.mean(counts[1:])
  assert evals["convex"] <= evals["trials"] <= 3
