"""The curvature probes in an optimizer: they converge on a quadratic and run inside ``lax.scan``.

In a chain they accept unknown extra args, do not recompile on the second call (traces
counted), and the optimizer still converges; inside ``lax.scan`` they match a Python loop.
``tests/test_interop_all.py`` puts every optax transformation of the project (these included)
through AdamW, ``optax.MultiSteps``, ``optax.inject_hyperparams`` and an Orbax round trip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvature

LR = 0.1

TRANSFORMS = {
    "critical_sharpness_probe": lambda: curvature.critical_sharpness_probe(learning_rate=LR),
    "critical_sharpness_probe_every_directional": lambda: curvature.critical_sharpness_probe(
        learning_rate=optax.cosine_decay_schedule(LR, 100), every=2, directional=True),
    "relative_sharpness_probe": lambda: curvature.relative_sharpness_probe(
        ["shifted"], learning_rate=LR, every=3),
    "scale_by_critical_sharpness": lambda: curvature.scale_by_critical_sharpness(
        target=1.0, learning_rate=LR),
}

A = jnp.diag(jnp.linspace(0.5, 5.0, 8))
SHIFT = jnp.linspace(-1.0, 1.0, 8)


def loss_fn(params, batch):
  return 0.5 * params["w"] @ A @ params["w"] + 0.5 * jnp.sum(params["b"] ** 2) + 0.0 * batch


def shifted(params):
  return 0.5 * jnp.sum((params["w"] - SHIFT) ** 2)


def init_params():
  return {"w": jnp.ones(8, jnp.float32), "b": jnp.full((2, 3), 0.5, jnp.float32)}


def make_chain(tx):
  return optax.chain(optax.clip_by_global_norm(100.0), tx, optax.scale_by_learning_rate(LR))


def make_step(chain, traces):
  def step(params, state, batch):
    traces.append(1)
    loss, g = jax.value_and_grad(loss_fn)(params, batch)
    u, state = chain.update(g, state, params, value=loss, grad=g,
                            value_fn=lambda p: loss_fn(p, batch),
                            relative_value_fns={"shifted": shifted},
                            some_unknown_arg=jnp.ones(3))
    return optax.apply_updates(params, u), state, loss
  return step


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_chain_unknown_args_no_recompile_converges(name):
  chain = make_chain(TRANSFORMS[name]())
  assert isinstance(chain, optax.GradientTransformationExtraArgs)
  traces = []
  step = jax.jit(make_step(chain, traces))
  params = init_params()
  state = chain.init(params)
  first = float(loss_fn(params, 0.0))
  for i in range(60):
    params, state, loss = step(params, state, jnp.float32(i))
  assert len(traces) == 1, "recompiled after the first step"
  assert float(loss) < 1e-3 * first
  metrics = curvature.probe_metrics(state)
  assert metrics, "no probe diagnostics found in the state"
  assert all(np.all(np.isfinite(np.asarray(v))) for k, v in metrics.items()
             if "directional" not in k or "every" in name)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_inside_lax_scan_matches_python_loop(name):
  chain = make_chain(TRANSFORMS[name]())
  step = make_step(chain, [])
  params = init_params()
  state = chain.init(params)

  def body(carry, batch):
    p, s = carry
    p, s, loss = step(p, s, batch)
    return (p, s), loss

  (p_scan, s_scan), losses = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))(
      (params, state), jnp.arange(10, dtype=jnp.float32))
  jstep = jax.jit(step)
  p_loop, s_loop = params, state
  for i in range(10):
    p_loop, s_loop, _ = jstep(p_loop, s_loop, jnp.float32(i))
  np.testing.assert_allclose(p_scan["w"], p_loop["w"], rtol=1e-5, atol=1e-7)
  m_scan, m_loop = curvature.probe_metrics(s_scan), curvature.probe_metrics(s_loop)
  assert m_scan.keys() == m_loop.keys()
  for k in m_scan:
    np.testing.assert_allclose(m_scan[k], m_loop[k], rtol=1e-5, err_msg=k)
  assert losses.shape == (10,)
