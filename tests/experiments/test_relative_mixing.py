"""Relative critical sharpness in the trainer and the Fig. 5 reproduction's judge.

References: on a quadratic task loss L(θ) = ½θᵀAθ + bᵀθ (one (A, b) per task and batch), the
loss along θ − ηΔ rises exactly when η > η* = 2 Δᵀ∇L / ΔᵀAΔ, so λ_c = ΔᵀAΔ / Δᵀ∇L when
Δᵀ∇L > 0; otherwise the step raises the loss at every η (counted as +inf). Δ_j is the first
AdamW step from task j's gradient, g_j/(|g_j| + ε) + γθ, computed here in NumPy.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import curvature
from experiments import repro_mixing
from experiments import trainer

K, DIM, EPS, WD = 4, 5, 1e-8, 0.1


def _tol_bound(k):
  # Bracket 1 − lower/upper ≤ 2^−k around η*, midpoint reported: |λ_c/λ* − 1| ≤ t/(2 − t);
  # plus a few float64 ulps of the bracket arithmetic.
  return 2.0 ** -k / (2 - 2.0 ** -k) + 8 * np.finfo(np.float64).eps


def _quadratic_tasks(rng):
  """Per task: a training (A, b) and K held-out (A, b), all different."""
  def spd(*shape):
    q = rng.normal(size=shape + (DIM, DIM))
    return q @ np.swapaxes(q, -1, -2) / DIM + 0.1 * np.eye(DIM)
  train = {t: {"a": spd(), "b": rng.normal(size=DIM)} for t in trainer.TASKS}
  held = {t: {"a": spd(K), "b": rng.normal(size=(K, DIM))} for t in trainer.TASKS}
  return train, held


def test_online_matrix_is_fresh_adamw_step_on_held_out_batches():
  rng = np.random.default_rng(3)
  train, held = _quadratic_tasks(rng)
  theta = rng.normal(size=DIM)

  def task_loss(p, batch):
    return 0.5 * p @ batch["a"] @ p + batch["b"] @ p
  loss_fn = lambda p, batch: sum(task_loss(p, batch[t]) for t in trainer.TASKS)
  loss_fn.task_loss = task_loss
  precond = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95, eps=EPS),
                        optax.add_decayed_weights(WD))
  config = ml_collections.ConfigDict({"probe": {"tol_power": 8, "max_evals": 60}})
  with jax.enable_x64(True):
    relative = jax.jit(trainer.make_relative_fn(loss_fn, precond, config))
    as_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)
    per, band, nxt = relative(jnp.asarray(theta), as_jnp(train), as_jnp(held),
                              jnp.ones((2, 2)))
    logged = trainer._relative_metrics(per, band)  # pylint: disable=protected-access
  per, band = jax.tree.map(np.asarray, (per, band))
  g = {t: train[t]["a"] @ theta + train[t]["b"] for t in trainer.TASKS}
  # Fresh Adam: m̂ = g and v̂ = g², so the first unit-LR step is g/(|g| + ε), plus γθ.
  dirs = [g[t] / (np.abs(g[t]) + EPS) + WD * theta for t in trainer.TASKS]
  expected = np.empty((K, 2, 2))
  for i, t in enumerate(trainer.TASKS):
    for k in range(K):
      grad = held[t]["a"][k] @ theta + held[t]["b"][k]
      for j, d in enumerate(dirs):
        slope = d @ grad
        expected[k, i, j] = d @ held[t]["a"][k] @ d / slope if slope > 0 else np.inf
  assert np.isinf(expected).any() and np.isfinite(expected).any()  # both cases exercised
  fin = np.isfinite(expected)
  np.testing.assert_allclose(per.sharpness[fin], expected[fin], rtol=_tol_bound(8))
  assert np.all(per.status[~fin] == curvature.STATUS_NOT_DESCENT)
  # Order statistics are monotone in each value, so the median inherits the per-batch bound.
  want = np.median(expected, axis=0)
  np.testing.assert_array_equal(np.isinf(band.median), np.isinf(want))
  np.testing.assert_allclose(band.median[np.isfinite(want)], want[np.isfinite(want)],
                             rtol=_tol_bound(8))
  for i, a in enumerate(trainer.TASKS):
    for j, b in enumerate(trainer.TASKS):
      name = f"{a}_along_{b}"
      assert float(logged[f"curv/relative/{name}"]) == band.median[i, j]
      assert int(logged[f"curv/relative_not_descent/{name}"]) == np.isinf(expected[:, i, j]).sum()
      status = int(logged[f"curv/relative_status/{name}"])
      assert status == (curvature.STATUS_NOT_DESCENT if np.isinf(want[i, j])
                        else curvature.STATUS_OK)
      if np.isfinite(want[i, j]):
        np.testing.assert_allclose(float(nxt[i, j]), 2.0 / band.median[i, j], rtol=1e-12)
      else:
        assert float(nxt[i, j]) == 1.0  # the previous warm start is kept


# ---------------------------------------------------------------------------------------------
# The reproduction's criterion on synthetic curves (no training)
# ---------------------------------------------------------------------------------------------


def _sweep(code, prose):
  return [{"r": r, "code/median": c, "prose/median": p, "code/min": c, "code/max": c,
           "prose/min": p, "prose/max": p} for r, c, p in zip(repro_mixing.RATIOS, code, prose)]


def _published_shape():
  r = np.asarray(repro_mixing.RATIOS)
  # log λ linear in r: code from 1e4 down to 1e3, prose from 1e3 up to 1e4: they cross at 0.5.
  return _sweep(10 ** (4 - r), 10 ** (3 + r))


def _grid(sweep, rise_below=False, rise_above=True):
  rows = []
  for r in repro_mixing.GRID_RATIOS:
    for lr in repro_mixing.grid_learning_rates(sweep):
      cell = {"r": r, "lr": float(lr)}
      for t in repro_mixing.TASKS:
        above = lr * repro_mixing._at(sweep, f"{t}/median", r) > 2  # pylint: disable=protected-access
        cell[f"{t}/change"] = 0.1 if (rise_above if above else rise_below) else -0.1
      rows.append(cell)
  return rows


def test_crossing_of_log_linear_curves():
  r_star, eta_star, changes = repro_mixing.crossing(_published_shape())
  assert changes == 1
  assert r_star == pytest.approx(0.5, abs=1e-9)
  assert eta_star == pytest.approx(2 / 10 ** 3.5, rel=1e-9)


def test_crossing_with_conflicts_at_the_end():
  # Code's update raises prose at every η (inf) for r ≥ 0.9: the sign change is still found.
  sweep = _published_shape()
  for row in sweep:
    if row["r"] >= 0.9:
      row["prose/median"] = math.inf
  assert repro_mixing.crossing(sweep)[2] == 1


def test_judge_published_shape_and_prediction():
  sweep = _published_shape()
  text, ok = repro_mixing._judge({"sweep": sweep, "grid": _grid(sweep)})  # pylint: disable=protected-access
  assert ok is True, text
  assert "r* = 0.50" in text


def test_judge_parallel_curves_do_not_cross():
  r = np.asarray(repro_mixing.RATIOS)
  sweep = _sweep(10 ** (4 - r), 10 ** (2 - r))  # both fall, code always the sharper
  _, ok = repro_mixing._judge({"sweep": sweep, "grid": _grid(sweep)})  # pylint: disable=protected-access
  assert ok == "partly"


def test_judge_prediction_fails_when_losses_rise_below_the_critical_lr():
  sweep = _published_shape()
  grid = _grid(sweep, rise_below=True)
  counts = repro_mixing.prediction_table({"sweep": sweep, "grid": grid})
  assert counts["below"] > 0 and counts["below_held"] == 0
  assert counts["above_held"] == counts["above"]
  _, ok = repro_mixing._judge({"sweep": sweep, "grid": grid})  # pylint: disable=protected-access
  assert ok == "partly"
