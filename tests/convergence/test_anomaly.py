"""Anomaly detector, optax guard and training-dynamics probes against constructed ground truth."""

import functools
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


@functools.lru_cache(maxsize=None)
def _scanner(settings):
  det = an.anomaly_detector(**dict(settings))

  def body(state, v):
    state = det.update(state, loss=v[0], grad_norm=v[1], update_norm=v[2], lr_sharpness=v[3])
    return state, state.info

  return jax.jit(lambda xs: jax.lax.scan(body, det.init(), xs))


def _scan_detector(loss, grad, upd, lr_sharp=None, **settings):
  """Like _run_detector, in one jitted scan compiled once per detector setting (fast).

  ``lr_sharp=None`` feeds NaN: "not measured", which is what a missing stream means too.
  """
  lr_sharp = np.full(len(loss), np.nan) if lr_sharp is None else lr_sharp
  xs = jnp.asarray(np.stack([loss, grad, upd, lr_sharp], 1), jnp.float32)
  state, infos = jax.device_get(_scanner(tuple(sorted(settings.items())))(xs))
  return state, [jax.tree.map(lambda x, k=k: x[k], infos) for k in range(len(loss))]


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
  loss, ones = _noisy_loss(n, 2), np.ones(n)
  blip = np.full(n, 1.5)
  blip[30] = 3.0
  _, infos = _scan_detector(loss, ones, ones, blip, sustain=10)
  assert not any(i.reason & an.REASON_UNSTABLE_LR for i in infos)
  # 3.0 lies beyond the edge band (2.5): divergence, not edge-of-stability oscillation.
  sustained = np.full(n, 1.5)
  sustained[20:40] = 3.0
  sustained[25] = np.nan  # not measured that step: the run holds
  _, infos = _scan_detector(loss, ones, ones, sustained, sustain=10)
  hits = [k for k, i in enumerate(infos) if i.reason & an.REASON_UNSTABLE_LR]
  # Measured steps 20..24, 26..30 make 10 in a row at step 30; unflagged after step 39.
  assert hits == list(range(30, 40))
  assert infos[35].unstable_run == 15
  assert not any(i.eos for i in infos)
  # The same run at 2.1, inside the band: the run hovers at the edge; the sustained
  # η·λ_c > 2 is edge-of-stability oscillation (logged in eos_reason, not flagged).
  sustained[20:40] = np.where(np.isnan(sustained[20:40]), np.nan, 2.1)
  _, infos = _scan_detector(loss, ones, ones, sustained, sustain=10)
  assert not any(i.flag for i in infos)
  assert [k for k, i in enumerate(infos) if i.eos_reason & an.REASON_UNSTABLE_LR] == list(
      range(30, 40))
  assert int(infos[39].steps_since_lr_above_limit) == 0
  assert int(infos[45].steps_since_lr_above_limit) == 6


def _eos_streams(n=150, peak=90, width=7.0, seed=0):
  """Loss, grad norm, update norm and η·λ_c of full-batch GD through one edge-of-stability
  excursion, from the quadratic model along the sharp direction (curvature λ = 2/η).

  The component a(t) along that direction grows and decays (a Gaussian bump in t); the loss
  gains ½λa², the gradient λa on top of the bulk gradient g₀, and η·λ_c — the curvature along
  the update, the gradient-weighted mean of the curvatures — is 2p + (1 − p)·η·λ_bulk with
  p = (λa)²/|g|² the sharp direction's share, overshooting 2 by ±3 % while p ≈ 1. Small
  multiplicative noise on the baselines, as on a real (smooth) full-batch run.
  """
  rng = np.random.default_rng(seed)
  t = np.arange(n)
  eta, lam = 0.1, 20.0
  a = 0.05 * np.exp(-(((t - peak) / width) ** 2))
  base = 0.05 * np.exp(-t / 400) * (1 + 1e-3 * rng.normal(size=n))
  g0 = 0.02 * (1 + 3e-3 * rng.normal(size=n))
  loss = base + 0.5 * lam * a**2
  grad = np.sqrt(g0**2 + (lam * a) ** 2)
  p = (lam * a) ** 2 / grad**2
  lr_sharp = 2 * p + (1 - p) * 0.005
  lr_sharp = np.where(p > 0.95, lr_sharp * (1 + 0.03 * (-1.0) ** t), lr_sharp)
  return loss, grad, eta * grad, lr_sharp


def test_spikes_at_the_edge_of_stability_are_oscillation_not_anomalies():
  loss, grad, upd, lr_sharp = _eos_streams()
  state, infos = _scan_detector(loss, grad, upd, lr_sharp)
  eos = [k for k, i in enumerate(infos) if i.eos]
  assert not any(i.flag for i in infos) and int(state.total_flagged) == 0
  assert len(eos) >= 20 and int(state.total_eos) == len(eos)
  first = eos[0]
  assert infos[first].eos_reason & an.REASON_SPIKE and infos[first].reason == 0
  # The excursion opens while η·λ_c is still climbing, far below the band (0.5): it is its
  # rise above its own baseline (0.005) that marks the edge; it crosses 2 only later.
  assert lr_sharp[first] < 0.5 and np.max(lr_sharp[:first + 1]) < 2
  assert np.any(lr_sharp[first:] > 2)
  assert any(i.eos_reason & an.REASON_LEVEL_SHIFT for i in infos)  # the loss bump
  assert max(int(i.eos_run) for i in infos) >= 10
  # The network's inputs count every level shift and η·λ_c > 2, whatever the classification.
  shifts = [k for k, i in enumerate(infos) if np.nan_to_num(i.shift_z[0]) > 4.0]
  assert shifts and all(int(infos[k].steps_since_level_shift) == 0 for k in shifts)
  above = np.nonzero(lr_sharp > 2)[0]
  assert int(infos[above[-1] + 3].steps_since_lr_above_limit) == 3
  assert int(infos[10].steps_since_lr_above_limit) == an.NEVER


def test_same_spikes_with_low_lr_sharpness_are_anomalies():
  loss, grad, upd, lr_sharp = _eos_streams()
  _, at_edge = _scan_detector(loss, grad, upd, lr_sharp)
  first = next(k for k, i in enumerate(at_edge) if i.eos)
  # η·λ_c steady at 0.1 (≪ 2, not rising): the same spikes are faults.
  state, infos = _scan_detector(loss, grad, upd, np.full(len(loss), 0.1))
  assert not any(i.eos for i in infos) and int(state.total_eos) == 0
  assert infos[first].flag and infos[first].reason & an.REASON_SPIKE
  assert [k for k, i in enumerate(infos) if i.flag] == [
      k for k, i in enumerate(at_edge) if i.eos]
  # Without an η·λ_c stream the context never holds either (the detector as before).
  _, blind = _scan_detector(loss, grad, upd)
  assert blind[first].flag and not any(i.eos for i in blind)
  # eos_window=0 turns the classification off.
  _, off = _scan_detector(loss, grad, upd, lr_sharp, eos_window=0)
  assert off[first].flag and not any(i.eos for i in off)


def test_faults_at_the_edge_stay_anomalies():
  loss, grad, upd, lr_sharp = _eos_streams()
  _, ref = _scan_detector(loss, grad, upd, lr_sharp)
  k = 95  # inside the excursion: η·λ_c oscillates around 2
  assert ref[k].edge and abs(lr_sharp[k] - 2) < 0.1
  nan_loss = loss.copy()
  nan_loss[k] = np.nan
  _, infos = _scan_detector(nan_loss, grad, upd, lr_sharp)
  assert infos[k].flag and infos[k].reason == an.REASON_NONFINITE  # the oscillation aside
  # An injected x1e4 loss spike: far above the oscillation's loss excess (x1.6 here), so
  # above eos_max_loss_ratio (100) x the window median: a fault even at the edge.
  big = loss.copy()
  big[k] *= 1e4
  _, infos = _scan_detector(big, grad, upd, lr_sharp)
  assert infos[k].flag and infos[k].reason & an.REASON_SPIKE and not infos[k].eos
  # Beyond the band (η·λ_c = 3.5 > 2.5): divergence, the spikes are anomalies again.
  beyond = np.where(lr_sharp > 1.9, 3.5, lr_sharp)
  _, infos = _scan_detector(loss, grad, upd, beyond)
  assert infos[k].flag and not infos[k].eos and not infos[k].edge


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
  # Bit for bit: one compiled step, and θ + 0 = θ exactly.
  jax.tree.map(np.testing.assert_array_equal, before, after)  # params unchanged at step k
  assert st.info.skipped and st.info.flag and st.info.reason & an.REASON_NONFINITE
  assert int(st.total_skipped) == 1
  # Adam's moments did not absorb the NaN: the previous inner state is kept exactly.
  jax.tree.map(np.testing.assert_array_equal, hist[k - 1][2].inner_state, st.inner_state)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
  assert not hist[k + 1][2].info.skipped


def test_guard_on_clean_chain_equals_plain_optimizer():
  steps, lr = 15, 1e-2
  guarded, hist = _train(an.anomaly_guard(optax.adam(lr)), steps)
  plain, _ = _train(optax.adam(lr), steps)
  assert not any(h[2].info.skipped or h[2].info.flag for h in hist)
  # Same arithmetic in two compiled programs, which XLA may fuse and order differently
  # (1-ulp differences seen), so float32 rounding, not bits: the gradient sums 32 examples,
  # and two orders of an n-term float32 sum differ by at most 2(n−1)u = (n−1)·eps relative
  # (Higham §4.2); Adam's step lr·m̂/(√v̂+ε), with |m̂/√v̂| ≤ (1−β₁)/√(1−β₂) ≈ 3.16
  # (Kingma & Ba §2.1), moves by at most twice that relative error; θ + u rounds once more
  # per step (one ulp of θ).
  eps = float(np.finfo(np.float32).eps)
  per_step = lr * 3.17 * 2 * (32 - 1) * eps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0, atol=steps * (per_step + float(np.spacing(np.max(np.abs(b)))))),
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
  with pytest.raises(ValueError, match="eos_band"):
    an.anomaly_detector(eos_band=(1.5, 2.0))
  with pytest.raises(ValueError, match="eos_window"):
    an.anomaly_detector(eos_window=-1)


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


def test_detect_forgetting_flags_drop_not_noise():
  rng = np.random.default_rng(0)
  n, fit = 120, 60
  acc = 0.8 + 0.01 * rng.normal(size=n)
  quiet = jax.jit(lambda v: an.detect_forgetting(v, fit_steps=fit))(jnp.asarray(acc))
  assert int(quiet.first_alarm) == -1
  acc[90:] -= 0.1  # the old task drops by 10 SDs when the new task starts at step 90
  probe = jax.jit(an.detect_forgetting, static_argnames=("fit_steps", "higher_is_better"))
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
