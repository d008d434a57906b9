"""The adaptive strategy: controller rules against hand-computed evaluations, the optax pieces
against NumPy / plain optax, no recompilation on switching, state and audit-log round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import convergence
from distill import _strategy as strategy

CORE = ("val/loss", "val/kl", "val/ppl")


def _controller(**kw):
  kw.setdefault("loss_weights", {"kd": 1.0, "ce": 0.5})
  kw.setdefault("core_metrics", CORE)
  return strategy.adaptive_controller(**kw)


def _run_controller(ctrl, rows, log=None):
  """Feeds one metrics dict per evaluation; returns the 1-based evaluations that transitioned."""
  update = jax.jit(ctrl.update)
  state = ctrl.init()
  fired = []
  for metrics in rows:
    new = update(state, metrics)
    if log is not None:
      for r in strategy.audit_records(state, new, metrics):
        log.append(r)
    if bool(new.info.transitioned):
      fired.append(int(new.evaluation))
    state = new
  return state, fired


def _rows(values_per_eval):
  return [dict(zip(CORE, v)) for v in values_per_eval]


def test_stage_transition_fires_exactly_after_ten_stable_evaluations():
  # Evaluations 1-4 move by several percent; from evaluation 5 on every metric stays inside a
  # band of 0.2% of its mean. The window of 10 is first all-stable at evaluation 5 + 9 = 14,
  # then empties; the next transition needs 10 new evaluations: 24.
  noisy = [(2.0 - 0.1 * i, 1.0 + 0.05 * i, 8.0 - 0.3 * i) for i in range(4)]
  wiggle = [1.0 + 0.002 * (i % 2) for i in range(26)]
  stable = [(1.5 * w, 0.7 * w, 4.5 / w) for w in wiggle]
  state, fired = _run_controller(_controller(), _rows(noisy + stable))
  assert fired == [14, 24]
  assert int(state.stage) == 2


@pytest.mark.parametrize("spread, fires", [(0.0029, True), (0.0031, False)])
def test_stage_band_is_relative_to_the_window_mean(spread, fires):
  # Alternating 1 and 1 + spread: range / mean = spread / (1 + spread / 2).
  rows = _rows([(1.0 + spread * (i % 2),) * 3 for i in range(12)])
  _, fired = _run_controller(_controller(), rows)
  assert fired == ([10] if fires else [])


def test_needs_min_stable_metrics_and_targets_and_stage_cap():
  # Two stable metrics, one drifting: no transition with min_stable = 3.
  rows = _rows([(1.0, 2.0, 3.0 + 0.1 * i) for i in range(15)])
  assert _run_controller(_controller(), rows)[1] == []
  assert _run_controller(_controller(min_stable=2), rows)[1] == [10]
  # A target not met blocks the metric.
  rows = _rows([(1.0, 2.0, 3.0)] * 12)
  assert _run_controller(_controller(targets={"val/loss": ("<=", 0.5)}), rows)[1] == []
  assert _run_controller(_controller(targets={"val/loss": ("<=", 1.0)}), rows)[1] == [10]
  # num_stages caps the stage.
  state, fired = _run_controller(_controller(num_stages=2), _rows([(1.0, 2.0, 3.0)] * 30))
  assert fired == [10] and int(state.stage) == 1


def test_nan_metric_blocks_transition_until_it_leaves_the_window_and_is_logged(tmp_path):
  values = [(1.0, 2.0, 3.0)] * 20
  values[6] = (1.0, float("nan"), 3.0)                         # evaluation 7
  log = convergence.AuditLog(tmp_path / "audit.jsonl")  # the one audit log
  _, fired = _run_controller(_controller(), _rows(values), log)
  # The NaN sits in windows ending at evaluations 7..16; the first clean full window ends at 17.
  assert fired == [17]
  lines = [json.loads(l, parse_constant=pytest.fail) for l in
           (tmp_path / "audit.jsonl").read_text().splitlines()]
  assert [(r["event"], r["evaluation"]) for r in lines] == [
      ("nonfinite_metric", 7), ("stage_transition", 17)]
  assert lines[0]["metric"] == "val/kl" and lines[0]["value"] == "nan"
  assert sorted(lines[1]["stable"]) == sorted(CORE) and lines[1]["before"] == 0 and lines[1]["after"] == 1


def test_reweight_clip_accumulation_and_stall_rules(tmp_path):
  ctrl = _controller(
      reweight_rules=[strategy.ReweightRule("val/collapse", 1.5, {"kd": 0.5, "ce": 2.0})],
      weight_bounds=(0.1, 1.5),
      clip_rule=strategy.ClipRule(per_layer_above=2.0, per_leaf_above=4.0),
      accumulation_rule=strategy.AccumulationRule("grad/noise", 10.0, 1.0, 1, 4),
      lr_groups=("embed", "head"), stall_rule=strategy.StallRule(1e-3, patience=2, boost=2.0))
  assert set(ctrl.metric_names) >= {"val/collapse", "clip/spread", "grad/noise",
                                    "update_ratio/embed", "update_ratio/head"}
  base = {**dict(zip(CORE, (1.0, 2.0, 3.0))), "update_ratio/embed": 1e-2,
          "update_ratio/head": 1e-2}
  evals = [
      dict(base, **{"val/collapse": 2.0, "clip/spread": 3.0, "grad/noise": 20.0,
                    "update_ratio/head": 1e-4}),
      dict(base, **{"val/collapse": np.nan, "clip/spread": np.nan, "grad/noise": np.nan,
                    "update_ratio/head": np.nan}),
      dict(base, **{"val/collapse": 2.0, "clip/spread": 5.0, "grad/noise": 20.0,
                    "update_ratio/head": 1e-4}),
      dict(base, **{"val/collapse": 1.0, "clip/spread": 1.0, "grad/noise": 0.5}),
  ]
  update = jax.jit(ctrl.update)
  log = convergence.AuditLog(tmp_path / "a.jsonl")
  state = ctrl.init()
  history = []
  for m in evals:
    new = update(state, m)
    for r in strategy.audit_records(state, new, m, step=100 * (len(history) + 1),
                                    rule_names=["collapse"]):
      log.append(r)
    history.append(new)
    state = new
  w = [(float(s.loss_weights["kd"]), float(s.loss_weights["ce"])) for s in history]
  # kd: 1 -> .5 -> (NaN: no change) .5 -> .25; ce: .5 -> 1 -> 1 -> 2 clipped to 1.5.
  assert w == [(0.5, 1.0), (0.5, 1.0), (0.25, 1.5), (0.25, 1.5)]
  assert [int(s.clip_mode) for s in history] == [1, 1, 2, 0]
  assert [int(s.accum_steps) for s in history] == [2, 2, 4, 2]
  # head stalls at evaluations 1 and 3 (the NaN in between neither counts nor resets).
  assert [int(s.lr_restarts["head"]) for s in history] == [0, 0, 1, 1]
  assert float(history[-1].lr_scales["head"]) == 2.0
  assert int(history[-1].lr_restarts["embed"]) == 0
  events = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
  kinds = [(e["evaluation"], e["event"]) for e in events]
  assert (1, "reweight") in kinds and (3, "lr_restart") in kinds
  assert (2, "nonfinite_metric") in kinds and (2, "reweight") not in kinds
  assert (3, "clip_mode") in kinds and (4, "accumulation") in kinds
  rw = next(e for e in events if e["event"] == "reweight")
  assert rw["rules"] == ["collapse"] and rw["before"]["kd"] == 1.0 and rw["after"]["kd"] == 0.5
  assert rw["step"] == 100


def test_renormalize_keeps_the_weight_sum():
  ctrl = _controller(reweight_rules=[strategy.ReweightRule("m", 0.0, {"kd": 3.0})],
                     renormalize=True)
  s = ctrl.update(ctrl.init(), {**dict(zip(CORE, (1.0, 1.0, 1.0))), "m": 1.0})
  np.testing.assert_allclose([s.loss_weights["kd"], s.loss_weights["ce"]],
                             [3.0 * 1.5 / 3.5, 0.5 * 1.5 / 3.5], rtol=1e-6)


def test_controller_state_round_trips_and_bad_arguments():
  ctrl = _controller(lr_groups=("a",), stall_rule=strategy.StallRule(0.1))
  state = ctrl.update(ctrl.init(), {**dict(zip(CORE, (1.0, 2.0, 3.0))),
                                    "update_ratio/a": 0.5})
  leaves, treedef = jax.tree.flatten(state)
  back = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  assert isinstance(back, strategy.ControllerState)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(x, y)
  # The restored state continues identically.
  m = {**dict(zip(CORE, (1.0, 2.0, 3.0))), "update_ratio/a": 0.5}
  for x, y in zip(jax.tree.leaves(ctrl.update(state, m)), jax.tree.leaves(ctrl.update(back, m))):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(KeyError, match="update_ratio/a"):
    ctrl.update(state, dict(zip(CORE, (1.0, 2.0, 3.0))))
  with pytest.raises(ValueError, match="min_stable"):
    _controller(min_stable=4)
  with pytest.raises(ValueError, match="mode"):
    strategy.clip_by_mode(1.0, mode="per_head")


def _grads():
  rng = np.random.default_rng(0)
  return {"a": {"w": jnp.asarray(rng.normal(size=(3, 4)) * 2, jnp.float32),
                "b": jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32)},
          "c": {"w": jnp.asarray(rng.normal(size=(5,)) * 0.3, jnp.float32)}}


def _np_clip(groups, c):
  out = []
  for g in groups:
    n = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
    out += [x * min(1.0, c / n) for x in g]
  return out


def test_clip_mode_switch_matches_numpy_without_recompiling():
  g = _grads()
  leaves = [np.asarray(x) for x in jax.tree.leaves(g)]   # order: a/b, a/w, c/w
  c = 1.0
  expected = {
      "global": _np_clip([leaves], c),
      "per_layer": _np_clip([leaves[:2], leaves[2:]], c),
      "per_leaf": _np_clip([[x] for x in leaves], c),
  }
  tx = optax.chain(strategy.clip_by_mode(c), optax.identity())
  traces = []

  @jax.jit
  def step(g, state, mode):
    traces.append(1)
    return tx.update(g, state, None, clip_mode=mode, unknown_arg=1.0)

  state = tx.init(g)
  for name in ["global", "per_layer", "per_leaf", "global"]:
    u, state = step(g, state, jnp.int32(strategy.CLIP_MODES[name]))
    for x, y in zip(jax.tree.leaves(u), expected[name]):
      np.testing.assert_allclose(x, y, rtol=1e-6)
    assert int(state[0].clip_mode) == strategy.CLIP_MODES[name]
  assert len(traces) == 1
  # Global mode is optax.clip_by_global_norm.
  ref, _ = optax.clip_by_global_norm(c).update(g, optax.clip_by_global_norm(c).init(g))
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  # Switching through the state instead of the extra arg; the mode is kept.
  state = strategy.set_clip_mode(state, "per_leaf")
  step2 = jax.jit(lambda g, s: tx.update(g, s, None))
  u, state = step2(g, state)
  for x, y in zip(jax.tree.leaves(u), expected["per_leaf"]):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  metrics = strategy.strategy_metrics(state)
  norms = [np.linalg.norm(np.concatenate([x.ravel() for x in grp])) for grp in
           (leaves[:2], leaves[2:])]
  np.testing.assert_allclose(metrics["clip/spread"], max(norms) / np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(metrics["clip/global_norm"],
                             np.sqrt(sum((x ** 2).sum() for x in leaves)), rtol=1e-6)


def test_per_layer_learning_rates_equal_hand_scaled_sgd():
  params = {"a": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "c": {"w": jnp.ones(3)}}
  labels = strategy.top_level_labels(params)
  sched_a = optax.linear_schedule(0.1, 0.0, 10)
  restart_c = optax.cosine_decay_schedule(0.5, 4)
  tx = optax.chain(optax.identity(), strategy.per_layer_learning_rates(
      {"a": sched_a, "c": 0.01}, labels, restart_schedules={"c": restart_c}))

  def loss(p):
    return sum(jnp.sum(jnp.square(x - 3.0)) for x in jax.tree.leaves(p))

  traces = []

  @jax.jit
  def step(p, s, scales, restarts):
    traces.append(1)
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p, lr_scales=scales, lr_restarts=restarts, other=0)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  ref = jax.tree.map(np.asarray, params)
  plan = [({"a": 1.0, "c": 1.0}, {"a": 0, "c": 0}),
          ({"a": 2.0, "c": 1.0}, {"a": 0, "c": 0}),
          ({"a": 2.0, "c": 1.0}, {"a": 0, "c": 1}),    # restart c at t = 2
          ({"a": 1.0, "c": 3.0}, {"a": 0, "c": 1})]
  for t, (scales, restarts) in enumerate(plan):
    lr_a = scales["a"] * float(sched_a(t))
    lr_c = scales["c"] * (0.01 if t < 2 else float(restart_c(t - 2)))
    ref = {"a": {k: v - lr_a * 2 * (v - 3.0) for k, v in ref["a"].items()},
           "c": {"w": ref["c"]["w"] - lr_c * 2 * (ref["c"]["w"] - 3.0)}}
    params, state = step(params, state, jax.tree.map(jnp.float32, scales),
                         jax.tree.map(jnp.int32, restarts))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
      np.testing.assert_allclose(x, y, rtol=1e-6)
    m = strategy.strategy_metrics(state)
    np.testing.assert_allclose([m["lr/a"], m["lr/c"]], [lr_a, lr_c], rtol=1e-6)
  assert len(traces) == 1


def _regression(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.float32(0.3)}

  def loss_fn(p, batch):
    xb, yb = batch
    return jnp.mean(jnp.square(xb @ p["w"] + p["b"] - yb))

  return params, (x, y), loss_fn


def test_accumulation_equals_one_big_batch_step_and_k_switches_at_a_boundary():
  params, (x, y), loss_fn = _regression()
  inner = optax.adam(0.1)
  big = inner.init(params)
  _, big_grad = jax.value_and_grad(loss_fn)(params, (x, y))
  u, _ = inner.update(big_grad, big, params)
  expected = optax.apply_updates(params, u)

  tx = strategy.accumulate_gradients(inner, every_k=4)
  traces = []

  @jax.jit
  def step(p, s, batch, k):
    traces.append(1)
    g = jax.grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p, accum_steps=k, unknown=1)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  p = params
  for j in range(4):
    sl = slice(4 * j, 4 * j + 4)
    # Asking for k = 2 mid-window (j = 1..3) must not cut the window of 4 short.
    p, state = step(p, state, (x[sl], y[sl]), jnp.int32(4 if j == 0 else 2))
    if j < 3:
      np.testing.assert_array_equal(p["w"], params["w"])
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # The new k = 2 is adopted at the boundary: updates now come every 2 calls.
  p1, state = step(p, state, (x[:4], y[:4]), jnp.int32(2))
  assert int(state.accum_steps) == 2
  np.testing.assert_array_equal(p1["w"], p["w"])
  p2, state = step(p1, state, (x[4:8], y[4:8]), jnp.int32(2))
  assert not np.array_equal(p2["w"], p1["w"])
  assert len(traces) == 1


def test_micro_batched_gradient_equals_full_batch():
  params, batch, loss_fn = _regression(1)
  full = jax.value_and_grad(loss_fn)(params, batch)
  micro = jax.jit(strategy.micro_batched_value_and_grad(loss_fn, 4))(params, batch)
  for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_pieces_chain_accept_unknown_args_do_not_recompile_and_converge():
  params, batch, loss_fn = _regression(2)
  labels = strategy.top_level_labels(params)
  ctrl = _controller()
  tx = strategy.accumulate_gradients(optax.chain(
      strategy.clip_by_mode(10.0, mode="per_layer"),
      optax.scale_by_adam(),
      strategy.controller_transformation(ctrl),
      strategy.per_layer_learning_rates({"w": 0.05, "b": 0.05}, labels)), every_k=1)
  cstate = ctrl.init()
  traces = []

  @jax.jit
  def step(p, s, args):
    traces.append(1)
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p, value=loss, some_unknown_arg=jnp.float32(3.0), **args)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  losses = []
  for _ in range(300):
    params, state, loss = step(params, state, strategy.decision_args(cstate))
    losses.append(float(loss))
  assert len(traces) == 1
  x, y = batch
  a = np.c_[np.asarray(x), np.ones(len(x))]
  best = np.mean((a @ np.linalg.lstsq(a, np.asarray(y), rcond=None)[0] - np.asarray(y)) ** 2)
  assert losses[-1] < best + 1e-3 < losses[0]
  # The controller inside the optimizer state updates when eval metrics come.
  held = optax.tree_utils.tree_get(state, "controller")
  assert int(held.evaluation) == 0
  g = jax.grad(loss_fn)(params, batch)
  _, state = tx.update(g, state, params, eval_metrics=dict(zip(CORE, (1.0, 2.0, 3.0))))
  assert int(optax.tree_utils.tree_get(state, "controller").evaluation) == 1
