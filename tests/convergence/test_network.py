"""Convergence network: exact posterior vs a hand enumeration, decay, conflicts, audit, NUTS."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convergence import _network as net_lib


def _random_tables(rng):
  u = lambda *s: rng.uniform(0.05, 0.95, size=s).astype(np.float32)
  return net_lib.ConvergenceTables(
      structural=jnp.float32(rng.uniform(0.05, 0.95)), functional=jnp.asarray(u(2)), generalisation=jnp.asarray(u(2)),
      converged=jnp.asarray(u(2, 2, 2)))


def _reference_posterior(tables, node_lik):
  """Loops over the 16 joint states, multiplies CPT entries and likelihoods, normalises."""
  t = jax.tree.map(lambda a: np.asarray(a, np.float64), tables)
  bern = lambda p, x: p if x == 1 else 1.0 - p
  weights = {}
  for s, f, g, c in itertools.product((0, 1), repeat=4):
    w = (bern(t.structural, s) * bern(t.functional[s], f) * bern(t.generalisation[f], g)
         * bern(t.converged[s, f, g], c))
    w *= node_lik[0, s] * node_lik[1, f] * node_lik[2, g] * node_lik[3, c]
    weights[(s, f, g, c)] = w
  z = sum(weights.values())
  return np.array([sum(w for x, w in weights.items() if x[i] == 1) / z for i in range(4)]), z


@pytest.mark.parametrize("seed", range(6))
def test_posterior_matches_hand_enumeration(seed):
  rng = np.random.default_rng(seed)
  post = jax.jit(net_lib.posterior)
  for evidence_set in range(4):
    tables = _random_tables(rng)
    # Soft likelihoods in [0.05, 1]; some nodes without evidence (1, 1).
    lik = rng.uniform(0.05, 1.0, size=(4, 2))
    lik[rng.random(4) < 0.3] = 1.0
    got = post(tables, jnp.asarray(np.log(lik), jnp.float32))
    want, z = _reference_posterior(tables, lik)
    np.testing.assert_allclose(np.asarray(got.marginals), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(got.log_evidence), math.log(z), atol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(got.log_joint))), 1.0, atol=1e-6)


def test_posterior_without_evidence_is_prior():
  t = net_lib.default_tables()
  want, z = _reference_posterior(t, np.ones((4, 2)))
  got = jax.jit(net_lib.posterior)(t)
  np.testing.assert_allclose(np.asarray(got.marginals), want, atol=1e-6)
  assert abs(float(got.log_evidence)) < 1e-6 and abs(z - 1) < 1e-12


def test_posterior_nan_evidence_gives_nan():
  ll = jnp.zeros((4, 2)).at[1, 0].set(jnp.nan)
  post = jax.jit(net_lib.posterior)(net_lib.default_tables(), ll)
  assert np.all(np.isnan(np.asarray(post.marginals)))


def test_evidence_decay_matches_closed_form():
  half_lives = [3.0, 25.0, float("inf")]
  net = net_lib.convergence_network([0, 2, 1], half_lives)
  rng = np.random.default_rng(0)
  steps = 40
  obs = rng.normal(size=(steps, 3, 2)).astype(np.float32)
  obs[rng.random((steps, 3)) < 0.2] = np.nan  # not observed: adds nothing, old evidence decays
  state = net.init()
  update = jax.jit(net.update)
  for k in range(steps):
    state = update(state, jnp.asarray(obs[k]))
  rho = 2.0 ** (-1.0 / np.asarray(half_lives))
  ages = steps - 1 - np.arange(steps)
  clean = np.where(np.isnan(obs), 0.0, obs).astype(np.float64)
  want = np.einsum("km,kmx->mx", rho[None, :] ** ages[:, None], clean)
  np.testing.assert_allclose(np.asarray(state.log_lik), want, rtol=1e-5, atol=1e-5)
  # The accumulated evidence is a tempered product of likelihoods: ∏ λ_k^(ρ^age).
  np.testing.assert_allclose(net_lib.decay_factors(half_lives), rho, rtol=1e-7)


def test_soft_likelihood_mapping():
  ll = net_lib.soft_likelihood(jnp.array([1.0, 0.5, 0.3, jnp.nan]),
                               jnp.array([1.0, -1.0, 0.0, 1.0]))
  r = np.asarray(ll[:, 1] - ll[:, 0])
  np.testing.assert_allclose(r, [math.log(9), -0.5 * math.log(9), 0.0, 0.0], atol=1e-6)


def _context(**kw):
  return net_lib.unknown_context()._replace(**{k: jnp.float32(v) for k, v in kw.items()})


# Structure stable, generalisation worsening: the conflict of the issue.
_S_PLUS_G_MINUS = jnp.array([4.0, 1.0, -4.0, 0.0])


@pytest.mark.parametrize("context,expected", [
    (dict(lr_sharpness=3.5, grad_norm_z=2.0, train_loss_slope=1.0), "learning_rate_too_high"),
    (dict(gap_slope=2.5, train_loss_slope=-2.0, lr_sharpness=1.2), "overfitting"),
    (dict(data_drift=3.0, gap_slope=0.2), "data_problem"),
    (dict(nonfinite_rate=0.2, grad_norm_z=3.0), "precision_overflow"),
])
def test_conflict_rules_rank_expected_cause_first(context, expected):
  names = [r.name for r in net_lib.DEFAULT_RULES]
  c = jax.jit(net_lib.detect_conflict)(_S_PLUS_G_MINUS, _context(**context))
  assert bool(c.active)
  assert net_lib.CONFLICT_PAIRS[int(c.pair)] == (0, 2)
  assert names[int(c.cause_rank[0])] == expected, (names, np.asarray(c.cause_scores))
  np.testing.assert_allclose(float(jnp.sum(c.cause_probs)), 1.0, atol=1e-6)


def test_no_conflict_when_evidence_agrees_or_is_weak():
  ctx = net_lib.unknown_context()
  assert not bool(net_lib.detect_conflict(jnp.array([4.0, 3.0, 5.0, 0.0]), ctx).active)
  assert not bool(net_lib.detect_conflict(jnp.array([-4.0, -3.0, -5.0, 0.0]), ctx).active)
  assert not bool(net_lib.detect_conflict(jnp.array([4.0, 1.0, -1.0, 0.0]), ctx).active)
  assert not bool(net_lib.detect_conflict(jnp.array([4.0, jnp.nan, -4.0, 0.0]), ctx)
                  .strength[1] == 0)  # the (S, G) pair is still judged


def test_decision_freezes_during_conflict_and_resumes():
  net = net_lib.convergence_network(["structural", "functional", "generalisation"],
                                    [20.0, 50.0, 100.0])
  update = jax.jit(net.update)
  good = net_lib.soft_likelihood(jnp.ones(3), jnp.ones(3))
  state = net.init()
  for _ in range(15):
    state = update(state, good)
  assert int(state.decision) == net_lib.DECISION_CONVERGED and not bool(state.info.frozen)
  # Generalisation suddenly worsens sharply while structure stays stable.
  bad_g = good.at[2].set(jnp.array([20.0, -20.0]))
  state = update(state, bad_g, _context(gap_slope=2.5, train_loss_slope=-2.0))
  assert bool(state.info.conflict.active)
  assert not bool(state.info.wanted)  # the posterior alone would demote ...
  assert int(state.decision) == net_lib.DECISION_CONVERGED  # ... but the decision is frozen
  assert net.rule_names[int(state.info.conflict.cause_rank[0])] == "overfitting"
  for _ in range(5):
    state = update(state, good.at[2].set(0.0))
    assert bool(state.info.frozen) and int(state.decision) == net_lib.DECISION_CONVERGED
  # Resolution: generalisation evidence turns positive again; the posterior decides again.
  for _ in range(40):
    state = update(state, good)
  assert not bool(state.info.frozen)
  assert int(state.decision) == int(state.info.wanted)


def test_unsettled_dynamics_block_convergence():
  # No "converged" while a loss level shift or η·λ_c > 2 lies inside the
  # evidence window, however settled the windowed evidence looks.
  net = net_lib.convergence_network(["structural", "functional", "generalisation"],
                                    [20.0, 50.0, 100.0], settle_window=50)
  update = jax.jit(net.update)
  good = net_lib.soft_likelihood(jnp.ones(3), jnp.ones(3))
  settled = net.init()
  for _ in range(15):
    settled = update(settled, good)
  assert int(settled.decision) == net_lib.DECISION_CONVERGED
  assert float(settled.info.marginals[3]) > 0.9 and not bool(settled.info.unsettled)

  state = update(settled, good, _context(steps_since_lr_above_limit=10.0,
                                         steps_since_level_shift=np.inf))
  assert bool(state.info.unsettled) and not bool(state.info.frozen)
  assert int(state.decision) == net_lib.DECISION_NOT_CONVERGED
  # The observation "unsettled" enters the converged node with likelihood ratio 1e-3.
  assert float(state.info.marginals[3]) < 0.05
  np.testing.assert_allclose(float(state.info.node_llr[3]), math.log(1e-3), rtol=1e-6)
  rec = net_lib.decision_record(10, state.info, context=_context(
      steps_since_lr_above_limit=10.0, steps_since_level_shift=np.inf))
  assert rec["unsettled"] and rec["decision"] == "not_converged"
  assert "unsettled" in rec["reason"] and "η·λ_c above the limit 10 steps ago" in rec["reason"]
  assert rec["inputs"]["context"]["steps_since_level_shift"] is None  # inf: never

  state = update(state, good, _context(steps_since_level_shift=49.0))
  assert bool(state.info.unsettled) and int(state.decision) == net_lib.DECISION_NOT_CONVERGED
  # Out of the window (age >= settle_window), or ages unknown: the posterior decides again.
  for ctx in (_context(steps_since_level_shift=50.0, steps_since_lr_above_limit=np.inf),
              net_lib.unknown_context()):
    state = update(state, good, ctx)
    assert not bool(state.info.unsettled)
    assert int(state.decision) == net_lib.DECISION_CONVERGED

  # A conflict freezes "converged" ... unless the run is unsettled.
  bad_g = good.at[2].set(jnp.array([20.0, -20.0]))
  frozen = update(settled, bad_g, _context(gap_slope=2.5))
  assert bool(frozen.info.frozen) and int(frozen.decision) == net_lib.DECISION_CONVERGED
  vetoed = update(settled, bad_g, _context(gap_slope=2.5, steps_since_level_shift=0.0))
  assert bool(vetoed.info.conflict.active) and not bool(vetoed.info.frozen)
  assert int(vetoed.decision) == net_lib.DECISION_NOT_CONVERGED
  with pytest.raises(ValueError, match="settle_window"):
    net_lib.convergence_network([0], [10.0], settle_window=-1)


def test_frozen_not_converged_cannot_be_promoted():
  net = net_lib.convergence_network([0, 1, 2], [50.0, 50.0, 50.0], threshold=0.9)
  state = net.init()
  # Conflict from the first step: the decision stays "not converged" whatever P(C) is.
  obs = net_lib.soft_likelihood(jnp.ones(3), jnp.array([1.0, 1.0, -1.0]))
  update = jax.jit(net.update)
  for _ in range(10):
    state = update(state, obs)
  assert bool(state.info.frozen) and int(state.decision) == net_lib.DECISION_NOT_CONVERGED


def test_audit_log_lines_parse(tmp_path):
  names = ("param_norm_cv", "val_accuracy", "ood_gap")
  net = net_lib.convergence_network([0, 1, 2], [10.0, 50.0, 200.0], metric_names=names)
  log = net_lib.AuditLog(tmp_path / "audit" / "decisions.jsonl")
  state = net.init()
  update = jax.jit(net.update)
  for step in range(6):
    obs = net_lib.soft_likelihood(jnp.ones(3), jnp.ones(3))
    if step >= 3:  # generalisation collapses: strong contrary evidence
      obs = obs.at[2].set(jnp.array([8.0, -8.0]))
    ctx = _context(gap_slope=2.0) if step >= 3 else net_lib.unknown_context()
    state = update(state, obs, ctx)
    log.append(net_lib.decision_record(step, state.info, observed=obs, context=ctx,
                                       metric_names=net.metric_names,
                                       rule_names=net.rule_names))
  lines = (tmp_path / "audit" / "decisions.jsonl").read_text().splitlines()
  assert len(lines) == 6
  recs = [json.loads(line) for line in lines]
  assert recs == log.read()
  for r in recs:
    assert {"step", "inputs", "posterior", "reason", "decision", "frozen"} <= r.keys()
    assert set(r["inputs"]["observed_log_lik"]) == set(names)
    assert set(net_lib.NODES) <= r["posterior"].keys()
    assert isinstance(r["reason"], str) and r["reason"]
  assert recs[0]["inputs"]["context"]["lr_sharpness"] is None  # NaN written as null
  assert any(r["frozen"] for r in recs)
  frozen = next(r for r in recs if r["frozen"])
  assert frozen["reason"].startswith("frozen") and "overfitting" in frozen["reason"]
  np.testing.assert_allclose(recs[-1]["posterior"]["converged"],
                             float(state.info.marginals[3]), rtol=1e-6)


def test_bad_arguments_fail_at_the_boundary():
  with pytest.raises(ValueError, match="metric_nodes"):
    net_lib.convergence_network(["structure"], [10.0])
  with pytest.raises(ValueError, match="half_lives"):
    net_lib.convergence_network([0, 1], [10.0, 0.0])
  with pytest.raises(ValueError, match="tables.functional"):
    net_lib.check_tables(net_lib.default_tables()._replace(functional=jnp.ones(3)))
  with pytest.raises(ValueError, match="tables.converged"):
    net_lib.check_tables(net_lib.default_tables()._replace(
        converged=jnp.full((2, 2, 2), 1.5)))
  net = net_lib.convergence_network([0], [10.0])
  with pytest.raises(ValueError, match="observed"):
    net.update(net.init(), jnp.zeros((2, 2)))


def _sample_runs(tables, n, rng):
  t = jax.tree.map(np.asarray, tables)
  s = (rng.random(n) < t.structural).astype(int)
  f = (rng.random(n) < t.functional[s]).astype(int)
  g = (rng.random(n) < t.generalisation[f]).astype(int)
  c = (rng.random(n) < t.converged[s, f, g]).astype(int)
  return np.stack([s, f, g, c], 1)


def test_nuts_recovers_table_entries():
  true = net_lib.ConvergenceTables(
      structural=jnp.float32(0.6), functional=jnp.asarray([0.15, 0.8], jnp.float32),
      generalisation=jnp.asarray([0.2, 0.65], jnp.float32),
      converged=jnp.asarray(np.where(np.arange(8).reshape(2, 2, 2) == 7, 0.9, 0.05),
                            jnp.float32))
  rng = np.random.default_rng(0)
  runs = _sample_runs(true, 400, rng)
  runs[rng.random(runs.shape) < 0.1] = -1  # some judgements unknown: marginalised exactly
  fit = net_lib.fit_tables(runs, num_warmup=200, num_samples=200, seed=1)
  # P(F=1 | S=1) sees ~0.6·400·0.9 ≈ 215 runs: posterior sd ≈ sqrt(.8·.2/215) ≈ 0.027;
  # tolerance 0.08 ≈ 3 sd. P(S=1) sees ~360 runs: sd ≈ 0.026.
  assert abs(float(fit.mean.functional[1]) - 0.8) < 0.08
  assert abs(float(fit.mean.structural) - 0.6) < 0.08
  assert abs(float(fit.mean.generalisation[1]) - 0.65) < 0.1
  assert 0.0 < float(fit.std.functional[1]) < 0.08
  # The learned tables plug straight into the network.
  net = net_lib.convergence_network([0], [10.0])
  assert net.init(fit.mean).tables.converged.shape == (2, 2, 2)
