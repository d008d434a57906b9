"""Windowed evidence against NumPy references: quantiles, Kalman recursion, EWMA, test level."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convergence import _windows as win


def _numpy_kalman(y, q, r, x0, p0):
  x, p, xs, ps = x0, p0, [], []
  for v in y:
    pm = p + q
    if np.isfinite(v):
      k = pm / (pm + r)
      x = x + k * (v - x)
      p = (1 - k) * pm
    else:
      p = pm
    xs.append(x)
    ps.append(p)
  return np.asarray(xs), np.asarray(ps)


def test_local_level_filter_matches_numpy_recursion():
  rng = np.random.default_rng(0)
  level = np.cumsum(0.05 * rng.normal(size=300))
  y = level + 0.3 * rng.normal(size=300)
  y[[10, 11, 150]] = [np.nan, np.inf, np.nan]
  xs, ps, _ = jax.jit(win.local_level_filter)(y, 0.0025, 0.09, 0.0, 1.0)
  rx, rp = _numpy_kalman(y, 0.0025, 0.09, 0.0, 1.0)
  np.testing.assert_allclose(xs, rx, rtol=1e-5, atol=1e-5)   # float32 recursion
  np.testing.assert_allclose(ps, rp, rtol=1e-5)


@pytest.mark.parametrize("q,r", [(1e-4, 1.0), (0.01, 0.5), (2.0, 1.0)])
def test_ewma_is_the_steady_state_kalman_filter(q, r):
  y = np.random.default_rng(1).normal(size=200).astype(np.float32)
  k = float(win.steady_state_gain(q, r))
  assert abs(k * k + (q / r) * k - q / r) < 1e-6          # the Riccati fixed point
  xs, _, gains = win.local_level_filter(y, q, r, 0.0, k * r)
  np.testing.assert_allclose(gains, k, rtol=1e-5)
  np.testing.assert_allclose(win.ewma(y, k, 0.0), xs, rtol=1e-5, atol=1e-6)


def _ar1(key, n, phi):
  e = jax.random.normal(key, (n,))
  _, x = jax.lax.scan(lambda c, v: (phi * c + v, phi * c + v), 0.0, e)
  return x


def test_stationarity_test_level_and_power():
  n, batches, reps = 500, 10, 600
  keys = jax.random.split(jax.random.key(0), reps)
  test = jax.jit(jax.vmap(lambda k: win.batch_means_trend_test(_ar1(k, n, 0.5), batches)[1]))
  p_null = np.asarray(test(keys))
  # Stationary AR(1), φ = 0.5: batches of 50 ≫ correlation time 2, so the batch means are
  # nearly independent and the rejection rate is ≈ α = 0.05. Binomial sd over 600 series:
  # 0.009; the residual batch-mean correlation (≈ φ/(b(1−φ²)) = 0.013) adds a little.
  rate = np.mean(p_null < 0.05)
  assert 0.025 <= rate <= 0.085, rate
  assert abs(np.mean(p_null < 0.2) - 0.2) < 0.05          # uniform p-values beyond α
  trend = jax.jit(jax.vmap(lambda k: win.batch_means_trend_test(
      _ar1(k, n, 0.5) - 0.004 * jnp.arange(n), batches)[1]))
  assert np.mean(np.asarray(trend(keys)) < 0.05) >= 0.95   # trend of 2 sd over the window


def _block_means(x, w):
  m = x.size // w
  return x[:m * w].reshape(m, w).mean(1)


def test_rolling_quantiles_and_window_means_match_numpy():
  short, long, history = 10, 100, 16
  tr = win.evidence_tracker(["m"], short=short, long=long, history=history)
  step = jax.jit(tr.update)
  st = tr.init()
  x = np.random.default_rng(2).gamma(2.0, size=437).astype(np.float32)
  for i, v in enumerate(x):
    st = step(st, {"m": v})
    info = st.info["m"]
    seen = x[:i + 1]
    np.testing.assert_allclose(info.short_mean, seen[-short:].mean(), rtol=1e-5)
    np.testing.assert_allclose(info.long_mean, seen[-long:].mean(), rtol=1e-5)
    blocks = _block_means(seen.astype(np.float64), short)[-history:]
    if blocks.size:
      np.testing.assert_allclose(info.baseline, np.quantile(blocks, [0.25, 0.5, 0.75]),
                                 rtol=1e-5)


def test_nonfinite_and_missing_values_are_skipped_and_flagged():
  tr = win.evidence_tracker(["a", "b"], short=5, long=20, history=8, num_batches=4)
  step = jax.jit(tr.update)
  st = tr.init()
  for i in range(30):
    st = step(st, {"a": 1.0 + 0.1 * np.sin(i), "b": 2.0})
  before = st
  st = step(st, {"a": np.nan, "b": 2.0})
  assert bool(st.info["a"].skipped) and not bool(st.info["b"].skipped)
  assert int(st.metrics["a"].num_skipped) == 1
  same = jax.tree.map(lambda u, v: bool(jnp.all(u == v)),
                      before.metrics["a"]._replace(num_skipped=0),
                      st.metrics["a"]._replace(num_skipped=0))
  assert all(jax.tree.leaves(same))
  ev = st.info["a"].evidence
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(ev))
  st = jax.jit(tr.update)(st, {"b": 2.0})                 # "a" absent: skipped as well
  assert int(st.metrics["a"].num_skipped) == 2


def test_evidence_direction_and_strength():
  rng = np.random.default_rng(3)
  n = 3000
  noise = lambda: 0.05 * rng.normal(size=n)
  series = {
      # Still falling at the end vs. a baseline of earlier blocks: improving for a loss,
      "dec_min": 2.0 - np.arange(n) / n + noise(),
      # worsening for an accuracy,
      "dec_max": 2.0 - np.arange(n) / n + noise(),
      # stable for a flat series,
      "flat": 1.0 + noise(),
      # and some state, with valid probabilities, for a loss that has levelled off.
      "falling": 1.0 + np.exp(-np.arange(n) / 400) + noise(),
  }
  specs = [win.MetricSpec(k, mode="max" if k == "dec_max" else "min") for k in series]
  tr = win.evidence_tracker(specs, short=50, long=500, history=40)

  def body(s, v):
    s = tr.update(s, v)
    return s, s.info["flat"].evidence.direction

  run = jax.jit(lambda xs: jax.lax.scan(body, tr.init(), xs))
  final, flat_dirs = run({k: jnp.asarray(v, jnp.float32) for k, v in series.items()})
  info = final.info
  ev = {k: v.evidence for k, v in info.items()}
  assert int(ev["dec_min"].direction) == win.IMPROVING and float(ev["dec_min"].strength) > 0.9
  assert int(ev["dec_max"].direction) == win.WORSENING and float(ev["dec_max"].strength) > 0.9
  # A stationary series is called stable most of the time once the long window is full;
  # the trend test (α = 0.05, re-run every step) still fires now and then.
  stable_frac = np.mean(np.asarray(flat_dirs)[500:] == win.STABLE)
  assert stable_frac >= 0.85, stable_frac
  for e in ev.values():
    assert 0.0 <= float(e.strength) <= 1.0
    lik = np.asarray(e.likelihood())
    np.testing.assert_allclose(lik.sum(), 1.0, rtol=1e-6)
    assert float(e.reliability) == 1.0
  # Fused level: the Kalman filter's r comes from the short window (true r = 0.0025; the MAD
  # of 49 differences has a relative sd of about 20 %, so ±60 %).
  assert abs(float(info["flat"].noise_var) - 0.0025) < 0.0015


def test_evidence_monitor_in_chain():
  target = jnp.arange(4.0)
  loss_fn = lambda p: 0.5 * jnp.sum((p - target) ** 2)
  tx = optax.chain(optax.sgd(0.05), win.evidence_monitor(
      ["loss", win.MetricSpec("grad_norm", short=5, long=20, history=8)],
      short=10, long=40, history=8, num_batches=4))
  params = jnp.zeros(4)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p, value=loss, metrics={"grad_norm": optax.tree.norm(g)},
                     something_else=3)
    traces.append(1)
    return optax.apply_updates(p, u), s, u, g

  for _ in range(100):
    params, state, u, g = step(params, state)
    np.testing.assert_allclose(u, -0.05 * g, rtol=1e-6)   # updates untouched
  assert len(traces) == 1
  info = state[1].info
  assert int(info["loss"].evidence.count) == 100 and int(info["grad_norm"].evidence.count) == 100
  assert int(info["loss"].evidence.direction) in (win.IMPROVING, win.STABLE)


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiple"):
    win.evidence_tracker(["a"], short=7, long=50)
  with pytest.raises(ValueError, match="mode"):
    win.evidence_tracker([win.MetricSpec("a", mode="up")])
  with pytest.raises(ValueError, match="distinct"):
    win.evidence_tracker(["a", "a"])
