"""preconditioned_sharpness / adam_preconditioner / find_adam_state against dense references.

Reference: ``eigh`` of P^{-1/2} H P^{-1/2} from the dense float64 ``jax.hessian``, with P
either a given positive diagonal or computed here in NumPy from a real optax Adam state:
P = (1 - b1^t)(sqrt(nu / (1 - b2^t)) + eps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from curvature._preconditioned import adam_preconditioner
from curvature._preconditioned import find_adam_state
from curvature._preconditioned import preconditioned_sharpness


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _problem(seed=0, n=32):
  """A tanh MLP on a regression batch: 133 parameters in two layers (four leaves)."""
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(6, 14)) / 2), "b1": jnp.asarray(rng.normal(size=14)),
            "w2": jnp.asarray(rng.normal(size=(14, 3)) / 4), "b2": jnp.zeros(3)}
  x, y = jnp.asarray(rng.normal(size=(n, 6))), jnp.asarray(rng.normal(size=(n, 3)))

  def loss(p):
    return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

  return loss, params


def _dense_preconditioned(loss, params, p_flat):
  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat))
  s = 1.0 / np.sqrt(p_flat)
  return np.linalg.eigvalsh(s[:, None] * h * s[None, :])[::-1]


def test_diagonal_pytree(x64):
  loss, params = _problem()
  rng = np.random.default_rng(1)
  precond = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.05, 2.0, size=x.shape)), params)
  want = _dense_preconditioned(loss, params, np.asarray(ravel_pytree(precond)[0]))
  out = jax.jit(lambda p, d: preconditioned_sharpness(loss, p, d, k=3))(params, precond)
  assert bool(out.converged)
  np.testing.assert_allclose(np.asarray(out.eigenvalues), want[:3], rtol=1e-5)


def _adam_state_after_steps(loss, params, tx, steps=5):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_adam_state_matches_numpy(x64):
  loss, params = _problem()
  b1, b2, eps = 0.8, 0.99, 1e-6
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, b1=b1, b2=b2, eps=eps))
  params, state = _adam_state_after_steps(loss, params, tx)
  adam = find_adam_state(state)
  t = int(adam.count)
  assert t == 5
  nu = np.asarray(ravel_pytree(adam.nu)[0])
  p_np = (1 - b1 ** t) * (np.sqrt(nu / (1 - b2 ** t)) + eps)
  p_ours = np.asarray(ravel_pytree(adam_preconditioner(adam, b1=b1, b2=b2, eps=eps))[0])
  np.testing.assert_allclose(p_ours, p_np, rtol=1e-12)

  want = _dense_preconditioned(loss, params, p_np)
  f = jax.jit(lambda p, s: preconditioned_sharpness(loss, p, s, k=2, b1=b1, b2=b2, eps=eps))
  out = f(params, adam)
  np.testing.assert_allclose(np.asarray(out.eigenvalues), want[:2], rtol=1e-5)
  # Passing the state or the diagonal built from it is the same computation.
  diag = adam_preconditioner(adam, b1=b1, b2=b2, eps=eps)
  out2 = jax.jit(lambda p, d: preconditioned_sharpness(loss, p, d, k=2))(params, diag)
  np.testing.assert_allclose(np.asarray(out2.eigenvalues), np.asarray(out.eigenvalues),
                             rtol=1e-12)


def test_find_adam_state_in_chains():
  params = {"w": jnp.ones(3)}
  for tx in [optax.adam(1e-3),
             optax.chain(optax.clip(1.0), optax.adamw(1e-3, weight_decay=0.1)),
             optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
             optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 2)]:
    found = find_adam_state(tx.init(params))
    assert isinstance(found, optax.ScaleByAdamState)
    assert jax.tree.structure(found.nu) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="no optax.ScaleByAdamState"):
    find_adam_state(optax.sgd(0.1, momentum=0.9).init(params))
  with pytest.raises(ValueError, match="2 ScaleByAdamState"):
    find_adam_state(optax.chain(optax.adam(1e-3), optax.adam(1e-3)).init(params))


def test_bad_preconditioner():
  loss, params = _problem()
  with pytest.raises(ValueError, match="preconditioner"):
    preconditioned_sharpness(loss, params, {"w1": jnp.ones((6, 14))})
  with pytest.raises(TypeError, match="adam_state"):
    adam_preconditioner(optax.sgd(0.1).init(params))


def test_count_zero_is_not_finite():
  # Before the first update P = 0: the result must not be a finite, plausible number.
  loss, params = _problem()
  state = optax.adam(1e-3).init(params)
  out = preconditioned_sharpness(loss, params, state[0], max_restarts=0, num_iters=5)
  assert not np.all(np.isfinite(np.asarray(out.eigenvalues)))
