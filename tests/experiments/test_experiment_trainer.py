"""Trainer pieces: the functional loss on a plain params dict, accumulation, the models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import config_lib
from experiments import data as data_lib
from experiments import models
from experiments import optim
from experiments import precision
from experiments import trainer


def _setup(spec, **overrides):
  config = config_lib.load_config(spec, overrides)
  ds = data_lib.load_dataset(config.data, config.seed)
  primary = ds["code"] if isinstance(ds, dict) else ds
  graphdef, params = models.split_params(models.build_model(config.model, primary, 0))
  return config, ds, graphdef, params


def test_params_are_a_plain_dict_of_arrays():
  _, _, _, params = _setup("configs/edge_of_stability.py:smoke")
  assert isinstance(params, dict)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
  assert models.count_params(params) == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def test_gradient_accumulation_matches_one_batch():
  config, ds, graphdef, params = _setup("configs/edge_of_stability.py:smoke")
  loss_fn = trainer.make_loss_fn(config, graphdef)
  batch = ds.full_batch(multiple_of=4)
  one_loss, one_vg = trainer.accumulate(loss_fn, 1)
  four_loss, four_vg = trainer.accumulate(loss_fn, 4)
  (l1, g1), (l4, g4) = one_vg(params, batch), jax.jit(four_vg)(params, batch)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  np.testing.assert_allclose(four_loss(params, batch), one_loss(params, batch), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_gpt_is_causal():
  model = models.GPT(50, 16, depth=2, width=32, num_heads=4, rngs=__import__("flax").nnx.Rngs(0))
  tokens = jnp.arange(16)[None] % 50
  changed = tokens.at[0, 10].set(7)
  a, b = model(tokens), model(changed)
  np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
  assert not np.allclose(a[0, 10:], b[0, 10:])
  with pytest.raises(ValueError, match="context_length"):
    model(jnp.zeros((1, 17), jnp.int32))


def test_probe_sits_before_the_learning_rate():
  # With the probe before scale_by_learning_rate, λ_c is measured along the unit-LR update:
  # on L = ½‖θ‖² (H = I) and SGD, Δθ = θ and λ_c = 2/η_c = 1 whatever η is.
  config = config_lib.load_config("configs/edge_of_stability.py:smoke",
                                  {"optimizer.learning_rate": 0.3})
  opt = optim.make_optimizer(config, optim.make_schedule(config))
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  loss = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
  state = opt.tx.init(params)
  updates, state = opt.tx.update(jax.grad(loss)(params), state, params, value=loss(params),
                                 value_fn=loss)
  np.testing.assert_allclose(updates["w"], -0.3 * params["w"], rtol=1e-6)
  import curvature  # pylint: disable=g-import-not-at-top
  m = curvature.probe_metrics(state)
  assert m["curv/critical_sharpness"] == pytest.approx(1.0, rel=0.04)
  assert m["curv/lr_sharpness"] == pytest.approx(0.3, rel=0.04)


def test_adamw_preconditioner_is_the_unit_lr_update():
  config = config_lib.load_config("configs/olmo_style.py:smoke",
                                  {"optimizer.weight_decay": 0.1})
  opt = optim.make_optimizer(config, optim.make_schedule(config))
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  state = opt.tx.init(params)
  direction, _ = opt.preconditioner.update(grads, state[0], params)
  # First Adam step: m̂/(√v̂+ε) = sign(g); decoupled decay on matrices only.
  np.testing.assert_allclose(direction["w"], 1.0 + 0.1, rtol=1e-5)
  np.testing.assert_allclose(direction["b"], 1.0, rtol=1e-5)
  ref = optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  ref_updates, _ = ref.update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(direction), jax.tree.leaves(ref_updates)):
    np.testing.assert_allclose(-a, b, rtol=1e-6)


def test_randomised_probes_draw_independent_keys():
  # Regression (issue 10 §4.3): λ_max and λ^PH at one step started Lanczos from the same key.
  key = jax.random.key(0)
  data = lambda k: np.asarray(jax.random.key_data(k))
  keys = {(probe, step): data(trainer.probe_stream_key(key, step, probe))
          for probe in trainer.PROBE_STREAMS for step in (0, 1, 7)}
  assert len({k.tobytes() for k in keys.values()}) == len(keys)  # all distinct
  # Deterministic: the same (probe, step) gives the same key (resume replays it).
  np.testing.assert_array_equal(data(trainer.probe_stream_key(key, 7, "lambda_max")),
                                keys[("lambda_max", 7)])


def _quadratic_step(loss_scale=None, nan_at_step=-1):
  """SGD on L(θ) = ½‖θ‖² (∇L = θ), η(t) = 0.1·(t + 1): every count has its own η."""
  schedule = lambda t: 0.1 * (jnp.asarray(t, jnp.float32) + 1.0)
  tx = optax.chain(optax.identity(), optax.scale_by_learning_rate(schedule))
  loss = lambda p, batch: 0.5 * jnp.sum(jnp.square(p["w"]))
  svg = lambda ls: lambda p, b: precision.scaled_value_and_grad(loss, ls)(p, b)
  step = jax.jit(trainer.make_train_step(loss, jax.value_and_grad(loss), tx, schedule,
                                         nan_at_step=nan_at_step, scaled_value_and_grad=svg))
  params = {"w": jnp.array([1.0, -2.0], jnp.float32)}
  state = trainer.TrainState(jnp.int32(0), params, tx.init(params), loss_scale)
  return step, state, schedule


def test_logged_lr_is_the_one_used_after_a_rollback():
  # A rolled-back update keeps the optimizer state (its schedule count) and advances the step
  # counter (the runner's skip_update): the next update uses η(count), and the row must say so.
  step, state, schedule = _quadratic_step()
  state, _ = step(state, None)  # count 1, step 1
  state = state._replace(step=jnp.int32(2))  # update 1 rolled back: step 2, count 1
  new, metrics = step(state, None)
  eta = float(schedule(1))  # 0.2, not η(2) = 0.3
  # SGD on ½‖θ‖²: θ' = (1 − η)θ exactly in float32 up to one rounding of each product.
  np.testing.assert_allclose(new.params["w"], (1 - eta) * state.params["w"], rtol=1e-6)
  assert float(metrics["train/lr"]) == np.float32(eta)


def test_logged_lr_is_the_one_used_after_a_loss_scale_skip():
  # The dynamic loss scale skips update 1 (NaN gradients): update 2 uses η(1).
  step, state, schedule = _quadratic_step(precision.dynamic_loss_scale(8.0, 100),
                                          nan_at_step=1)
  for _ in range(2):
    state, metrics = step(state, None)
  assert int(metrics["precision/grads_finite"]) == 0 and int(state.step) == 2
  before = state.params["w"]
  state, metrics = step(state, None)
  eta = float(schedule(1))
  np.testing.assert_allclose(state.params["w"], (1 - eta) * before, rtol=1e-6)
  assert float(metrics["train/lr"]) == np.float32(eta)
