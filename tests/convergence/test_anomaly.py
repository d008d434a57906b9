"""Anomaly detector, optax guard and the seed-000 probes, against constructed ground truth."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convergence import _anomaly as an


def _run_detector(det, loss, grad=None, upd=None, lr_sharp=None):
  state = det.init()
  update = jax.jit(lambda s, l, g, u, r: det.update(
      s, loss=l, grad_norm=g, update_norm=u, lr_sharpness=r))
  if lr_sharp is not None:
    update = jax.jit(lambda s, l, g, u, r: det.update(
        s, loss=l, grad_norm=g, update_norm=u, lr_sharpness=r))
  else:
    update = jax.jit(lambda s, l, g, u, r: det.update(s, loss=l, grad_norm=g, update_norm=u))
  n = len(loss)
  grad = np.ones(n) if grad is None else grad
  upd = np.ones(n) if upd is None else upd
  lr_sharp = np.zeros(n) if lr_sharp is None else lr_sharp
  infos = []
  for k in range(n):
    state = update(state, jnp.float32(loss[k]), jnp.float32(grad[k]), jnp.float32(upd[k]),
                   jnp.float32(lr_sharp[k]))
    infos.append(jax.device_get(state.info))
  return state, infos


def _noisy_loss(n, seed):
  rng = np.random.default_rng(seed)
  t = np.arange(n)
  return 2.0 * np.exp(-t / 300) + 0.5 + 0.02 * rng.normal(size=n)


def test_nan_flagged_at_its_step_with_nonfinite_reason():
  loss = _noisy_loss(60, 0)
  loss[37] = np.nan
  _, infos = _run_detector(an.anomaly_detector(), loss)
  flagged = [k for k, i in enumerate(infos) if i.flag]
  assert flagged == [37]
  assert an.reason_names(infos[37].reason) == ["nonfinite"]
  # The NaN does not enter the baseline: the next steps are judged normally.
  assert np.isfinite(infos[38].spike_z[0])


def test_spike_of_ten_robust_sds_is_flagged():
  n, k = 80, 60
  loss = _noisy_loss(n, 1)
  past = loss[:k]  # the detector's window (64) holds all k previous values
  med = np.median(past)
  mad_sd = 1.4826 * np.median(np.abs(past - med))
  loss[k] = med + 10 * mad_sd
  _, infos = _run_detector(an.anomaly_detector(), loss)
  assert infos[k].flag and infos[k].reason & an.REASON_SPIKE
  np.testing.assert_allclose(infos[k].spike_z[0], 10.0, rtol=0.05)
  assert not any(i.flag for i in infos[:k])


def test_normal_noise_false_positive_rate():
  # Gaussian noise on a smooth decay, 20 seeds x 300 steps, default thresholds. Per-step rate
  # bound stated: ≤ 1e-3 (6000 steps; the Gaussian tail beyond 6 robust SDs is ~1e-9, the
  # rest is the median / MAD estimation noise of a 64-sample window).
  det = an.anomaly_detector()
  update = jax.jit(lambda s, l, g, u: det.update(s, loss=l, grad_norm=g, update_norm=u))

  def run(x):
    def body(s, v):
      s = update(s, v[0], v[1], v[2])
      return s, s.info.flag
    return jax.lax.scan(body, det.init(), x)[1]

  rng = np.random.default_rng(0)
  xs = []
  for seed in range(20):
    loss = _noisy_loss(300, seed)
    g = 1.0 + 0.1 * rng.normal(size=300)
    u = 0.01 * (1.0 + 0.1 * rng.normal(size=300))
    xs.append(np.stack([loss, g, u], 1))
  flags = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(np.stack(xs), jnp.float32)))
  assert flags.mean() <= 1e-3, flags.mean()


def test_sustained_lr_sharpness_flagged_single_blip_not():
  n = 60
  det = an.anomaly_detector(sustain=10)
  loss = _noisy_loss(n, 2)
  blip = np.full(n, 1.5)
  blip[30] = 3.0
  _, infos = _run_detector(det, loss, lr_sharp=blip)
  assert not any(i.reason & an.REASON_UNSTABLE_LR for i in infos)
  sustained = np.full(n, 1.5)
  sustained[20:40] = 2.3
  sustained[25] = np.nan  # not measured that step: the run holds
  _, infos = _run_detector(det, loss, lr_sharp=sustained)
  hits = [k for k, i in enumerate(infos) if i.reason & an.REASON_UNSTABLE_LR]
  # Measured steps 20..24, 26..30 make 10 in a row at step 30; unflagged after step 39.
  assert hits == list(range(30, 40))
  assert infos[35].unstable_run == 15


def _model_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32,)), jnp.float32)
  params = {"w": jnp.zeros(4), "b": jnp.zeros(())}

  def loss_fn(p, poison):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2) * poison

  return params, loss_fn


def _train(tx, steps, poison_at=None):
  params, loss_fn = _model_problem()
  state = tx.init(params)

  @jax.jit
  def step(params, state, poison):
    loss, g = jax.value_and_grad(loss_fn)(params, poison)
    u, state = tx.update(g, state, params, value=loss, unknown_extra_arg=1.0)
    return optax.apply_updates(params, u), state

  hist = []
  for k in range(steps):
    poison = jnp.float32(jnp.nan if k == poison_at else 1.0)
    before = params
    params, state = step(params, state, poison)
    hist.append((before, params, jax.device_get(state)))
  return params, hist


def test_guard_skips_poisoned_update_and_keeps_inner_state():
  k = 12
  tx = an.anomaly_guard(optax.adam(1e-2))
  params, hist = _train(tx, 20, poison_at=k)
  before, after, st = hist[k]
  jax.tree.map(np.testing.assert_array_equal, before, after)  # params unchanged at step k
  assert st.info.skipped and st.info.flag and st.info.reason & an.REASON_NONFINITE
  assert int(st.total_skipped) == 1
  # Adam's moments did not absorb the NaN: the previous inner state is kept exactly.
  jax.tree.map(np.testing.assert_array_equal, hist[k - 1][2].inner_state, st.inner_state)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
  assert not hist[k + 1][2].info.skipped


def test_guard_on_clean_chain_equals_plain_optimizer():
  guarded, hist = _train(an.anomaly_guard(optax.adam(1e-2)), 15)
  plain, _ = _train(optax.adam(1e-2), 15)
  assert not any(h[2].info.skipped or h[2].info.flag for h in hist)
  # Same arithmetic; XLA may fuse the two jitted steps differently (1-ulp differences seen).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               guarded, plain)


def test_guard_gives_up_after_max_consecutive_skips():
  # Mirrors optax.apply_if_finite: NaN every step; the first max_consecutive_skips are skipped.
  params, loss_fn = _model_problem()
  tx = an.anomaly_guard(optax.sgd(0.1), max_consecutive_skips=2)
  ref = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2)
  s, r = tx.init(params), ref.init(params)
  g = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  tx_update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  for _ in range(4):
    u, s = tx_update(g, s, params)
    v, r = ref_update(g, r, params)
    assert bool(s.info.skipped) == (not bool(jnp.isnan(v["b"])))
    assert int(s.consecutive_skips) == int(r.notfinite_count)
  assert int(s.total_skipped) == int(r.total_notfinite) - 2


def test_guard_arguments_checked():
  with pytest.raises(ValueError, match="skip_on"):
    an.anomaly_guard(skip_on=64)
  with pytest.raises(ValueError, match="max_consecutive_skips"):
    an.anomaly_guard(max_consecutive_skips=-1)
  with pytest.raises(ValueError, match="short_window"):
    an.anomaly_detector(window=8, short_window=16)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
@pytest.mark.parametrize("method,tol", [("gaussian", 0.02), ("histogram", 0.03),
                                        ("gaussian_joint", 0.05)])
def test_entropy_of_gaussian(sigma, method, tol):
  # n = 20000: the variance estimate's relative sd is sqrt(2/n) = 1%, i.e. 0.005 nats per unit;
  # the histogram adds O(bins/n) bias. Joint: 4 units, entropy sums 4 per-unit errors.
  d = 4
  x = sigma * jax.random.normal(jax.random.key(1), (20000, d))
  h = float(jax.jit(lambda a: an.activation_entropy(a, method=method))(x))
  per_unit = 0.5 * math.log(2 * math.pi * math.e * sigma**2)
  want = d * per_unit if method == "gaussian_joint" else per_unit
  assert abs(h - want) < tol, (h, want)


def test_entropy_nan_propagates():
  x = jnp.ones((10, 3)).at[2, 1].set(jnp.nan)
  for m in ("gaussian", "histogram", "gaussian_joint"):
    assert np.isnan(float(jax.jit(lambda a: an.activation_entropy(a, method=m))(x)))


def test_sliced_wasserstein_identical_vs_shifted():
  d, n = 8, 2000
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, d))
  y = jax.random.normal(k2, (n, d))
  shift = jnp.full((d,), 0.5)
  sw = jax.jit(lambda a, b: an.activation_distance(a, b, num_projections=512))
  same = float(sw(x, y))
  shifted = float(sw(x, y + shift))
  # SW_2 of a pure shift v is |v|/sqrt(d) = 0.5 in expectation over directions; the finite
  # sample adds the identical-distribution floor in quadrature.
  assert same < 0.06
  assert abs(shifted - math.sqrt(0.5**2 + same**2)) < 0.05
  # Unequal sample sizes use the quantile grid.
  assert abs(float(jax.jit(an.activation_distance)(x[:1500], y + shift)) - 0.5) < 0.07


def test_mmd_identical_vs_shifted_against_closed_form():
  # Unit Gaussians, kernel exp(-|a-b|^2 / 2h^2): MMD^2 = 2 (h^2/(h^2+2))^(d/2)
  # (1 - exp(-|δ|^2 / (2 (h^2+2)))). The unbiased estimator's sd is O(1/n) under the null
  # (tolerance 0.01) and O(1/sqrt(n)) under the shift: ≈ 0.012 at n = 1000 (measured over 8
  # seeds), tolerance 0.035 ≈ 3 sd.
  d, n, h = 2, 1000, 1.5
  k1, k2 = jax.random.split(jax.random.key(3))
  x = jax.random.normal(k1, (n, d))
  y = jax.random.normal(k2, (n, d))
  delta = jnp.array([1.0, 0.0])
  mmd = jax.jit(lambda a, b: an.activation_distance(a, b, method="mmd", bandwidth=h))
  want = 2 * (h**2 / (h**2 + 2)) ** (d / 2) * (1 - math.exp(-1.0 / (2 * (h**2 + 2))))
  assert abs(float(mmd(x, y))) < 0.01
  assert abs(float(mmd(x, y + delta)) - want) < 0.035
  mmd_median = jax.jit(lambda a, b: an.activation_distance(a, b, method="mmd"))
  assert float(mmd_median(x, y + delta)) > 0.05  # median-distance bandwidth
  assert np.isnan(float(mmd_median(x.at[0, 0].set(jnp.nan), y)))


def test_forecast_band_covers_saturating_truth():
  # y = 0.9 - 0.6 t^-0.4 + N(0, 0.01^2), observed at t = 10..500, forecast t = 1000, 3000.
  # 90% band per seed; required: truth inside at both horizons in >= 8 of 10 seeds
  # (binomial(10, 0.9): P(<8) ≈ 0.07 if the band were exact; residual bootstrap is slightly
  # anti-conservative, so not stricter than that).
  t = np.arange(10, 501, 5, dtype=np.float64)
  horizon = np.array([1000.0, 3000.0])
  truth = lambda s: 0.9 - 0.6 * s ** -0.4
  fc = jax.jit(lambda y, k: an.forecast_performance(t, y, horizon, key=k))
  covered = 0
  for seed in range(10):
    y = truth(t) + 0.01 * np.random.default_rng(seed).normal(size=t.size)
    y[seed] = np.nan  # a missing evaluation is excluded from the fit
    f = fc(jnp.asarray(y, jnp.float32), jax.random.key(seed))
    assert np.all(np.asarray(f.lower) <= np.asarray(f.upper))
    covered += bool(np.all((np.asarray(f.lower) <= truth(horizon))
                           & (truth(horizon) <= np.asarray(f.upper))))
  assert covered >= 8, covered


def test_forecast_too_few_points_is_nan():
  f = jax.jit(an.forecast_performance)(jnp.array([1.0, 2.0, 3.0]),
                                       jnp.array([1.0, jnp.nan, 2.0]), jnp.array([10.0]))
  assert np.isnan(float(f.asymptote)) and np.isnan(float(f.prediction[0]))


def test_forgetting_probe_flags_drop_not_noise():
  rng = np.random.default_rng(0)
  n, fit = 120, 60
  acc = 0.8 + 0.01 * rng.normal(size=n)
  quiet = jax.jit(lambda v: an.forgetting_probe(v, fit_steps=fit))(jnp.asarray(acc))
  assert int(quiet.first_alarm) == -1
  acc[90:] -= 0.1  # the old task drops by 10 SDs when the new task starts at step 90
  probe = jax.jit(an.forgetting_probe, static_argnames=("fit_steps", "higher_is_better"))
  res = probe(jnp.asarray(acc), fit_steps=fit)
  assert int(res.first_alarm) == 92
  assert bool(res.below[90]) and not bool(np.any(np.asarray(res.below[:90])))
  # A loss (lower is better) rising is forgetting too; NaN is never "below".
  loss = 1.0 + 0.01 * rng.normal(size=n)
  loss[100:] += 0.2
  loss[101] = np.nan
  res = probe(jnp.asarray(loss), fit_steps=fit, higher_is_better=False)
  assert int(res.first_alarm) == 104 and not bool(res.below[101])


def test_mapping_consistency_flags_persistent_deviation():
  rng = np.random.default_rng(0)
  n = 80
  drift = 0.1 * (1 + 0.05 * rng.normal(size=n))
  dec = 0.01 * (1 + 0.05 * rng.normal(size=n))
  dec[50:] *= 10  # loss suddenly falls 10x faster with the same feature movement
  loss = 5.0 - np.concatenate([[0.0], np.cumsum(dec[1:])])
  res = jax.jit(lambda l, d: an.mapping_consistency(l, d, window=20, patience=3))(
      jnp.asarray(loss), jnp.asarray(drift))
  np.testing.assert_allclose(np.asarray(res.ratio[1:]), dec[1:] / (drift[1:] + 1e-8),
                             rtol=5e-3)
  assert np.isnan(float(res.ratio[0]))
  assert not np.any(np.asarray(res.alarm[:50]))  # single outside steps happen; no alarm
  assert bool(res.outside[50]) and bool(res.alarm[52]) and not bool(res.alarm[51])


def test_guard_wraps_a_chain_with_a_curvature_probe_without_recompiling():
  import curvature

  params, loss_fn = _model_problem()
  chain = optax.chain(optax.scale_by_adam(), curvature.critical_sharpness_probe(
      learning_rate=0.01), optax.scale_by_learning_rate(0.01))
  tx = an.anomaly_guard(chain, skip_on=an.REASON_NONFINITE | an.REASON_SPIKE)
  state = tx.init(params)

  @jax.jit
  def step(params, state, poison):
    loss, g = jax.value_and_grad(loss_fn)(params, poison)
    u, state = tx.update(g, state, params, value=loss,
                         value_fn=lambda p: loss_fn(p, poison), lr_sharpness=jnp.float32(1.0))
    return optax.apply_updates(params, u), state

  for k in range(3):
    params, state = step(params, state, jnp.float32(1.0))
  assert step._cache_size() == 1
  metrics = curvature.probe_metrics(state.inner_state)
  assert np.isfinite(float(metrics["curv/critical_sharpness"]))
  assert not bool(state.info.skipped)
