"""Mixed precision: loss-scale mechanics, bfloat16 models over float32 parameters, checkpoints.

References are independent of the code under test: loss-scale sequences written out by hand
from the rule (halve and skip on non-finite gradients, double after ``growth_interval`` finite
steps, never below ``min_scale``), ``jax.value_and_grad`` of the unscaled loss, and the float32
model of the same seed.
"""

import functools
import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments import config_lib
from experiments import models
from experiments import precision

# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3. The loss is a float32
# reduction of outputs whose operands were each rounded once to bfloat16 (relative error ≤ u);
# the roundings of thousands of terms have random signs and mostly cancel in the sums, so the
# loss's relative error stays below one u (measured: ≤ 6e-4 for the MLP, ≤ 2e-5 for the GPT at
# initialisation, seeds 0-2).
BF16_LOSS_RTOL = 2.0 ** -8
V, T = 32, 16  # GPT vocabulary and context


def _mlp_config():
  c = config_lib.default_config()
  c.model.widths = (32, 32)  # tanh MLP
  return c.model


def _gpt_config():
  c = config_lib.default_config()
  c.model.name, c.model.depth, c.model.width, c.model.num_heads = "gpt", 1, 16, 2
  c.model.mlp_ratio = 2
  return c.model


def _mlp_data():
  return types.SimpleNamespace(kind="classification", name="digits", input_dim=16,
                               num_classes=4)


def _gpt_data():
  return types.SimpleNamespace(kind="language_model", name="code", num_classes=V,
                               train={"tokens": np.zeros((1, T + 1), np.int32)})


def _mlp_batch(seed):
  # A teacher problem: labels = argmax of a random linear map, so 20 steps can learn it.
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((64, 16)).astype(np.float32)
  label = np.argmax(x @ rng.standard_normal((16, 4)), -1)
  return {"x": x, "y": np.eye(4, dtype=np.float32)[label]}


def _gpt_batch(seed):
  # Sequences that count up modulo V from a random start: the next token is predictable.
  start = np.random.default_rng(seed).integers(0, V, (8, 1))
  return {"tokens": ((start + np.arange(T + 1)) % V).astype(np.int32)}


def _mse(graphdef):
  def loss_fn(params, batch):
    f = nnx.merge(graphdef, params)(batch["x"])
    return 0.5 * jnp.mean(jnp.sum((f - batch["y"]) ** 2, -1))
  return loss_fn


def _xent(graphdef):
  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["tokens"][:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["tokens"][:, 1:]))
  return loss_fn


SETUPS = {"mlp": (_mlp_config, _mlp_data, _mlp_batch, _mse),
          "gpt": (_gpt_config, _gpt_data, _gpt_batch, _xent)}


def _build(name, seed, dtype=jnp.float32):
  cfg, data, _, _ = SETUPS[name]
  return models.split_params(models.build_model(cfg(), data(), seed, dtype=dtype))


TXS = {"mlp": optax.sgd(0.1), "gpt": optax.adam(1e-2)}
# At LLVM optimisation level 0 these small programs compile about 3x faster on the CPU (2.7 s
# instead of 7.5 s for the GPT's gradient). It changes the last bits of results (measured: 1 ulp
# of the loss), so every exact comparison below is between programs compiled alike.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(name, batch):
  return batch["x"] if name == "mlp" else batch["tokens"][:, :-1]


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _train_step(name, graphdef, state, batch):
  """One loss-scaled step: skips a non-finite update; returns the new state and diagnostics.

  Graphdefs are hashable, and equal for models of one config and compute dtype, so the tests
  share one executable per (model, compute dtype, loss-scale mode).
  """
  params, opt_state, ls = state
  loss, grads, finite = precision.scaled_value_and_grad(SETUPS[name][3](graphdef), ls)(
      params, batch)
  updates, new_opt_state = TXS[name].update(grads, opt_state, params)
  new = (optax.apply_updates(params, updates), new_opt_state)
  params, opt_state = optax.tree.where(finite, new, (params, opt_state))
  return (params, opt_state, ls.adjust(finite)), {"loss": loss, "grads": grads,
                                                  "finite": finite}


def _loss_scale():
  return precision.dynamic_loss_scale(2.0 ** 15, 5)


def _evaluate(name, graphdef, params, batch, loss_scale=None):
  """The diagnostics of one training step from ``params``: loss, gradients, finite."""
  state = (params, TXS[name].init(params), _loss_scale() if loss_scale is None else loss_scale)
  return _train_step(name, graphdef, state, batch)[1]


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _loss(name, graphdef, params, batch):
  return SETUPS[name][3](graphdef)(params, batch)


def _trajectory(loss_scale, finite_flags):
  def body(ls, finite):
    ls = ls.adjust(finite)
    return ls, (ls.loss_scale, ls.good_steps)
  return jax.jit(lambda ls, f: jax.lax.scan(body, ls, f))(loss_scale, jnp.array(finite_flags))


def test_dynamic_scale_follows_the_rule_by_hand():
  ls = precision.dynamic_loss_scale(8.0, 3, min_scale=2.0)
  flags = [True, True, True, False, True, False, False, False, True, True, True]
  # 3 finite steps in a row double the scale (8 -> 16); each non-finite step halves it and
  # resets the count; 2 is the floor.
  want_scale = [8, 8, 16, 8, 8, 4, 2, 2, 2, 2, 4]
  want_good = [1, 2, 0, 0, 1, 0, 0, 0, 1, 2, 0]
  final, (scales, good) = _trajectory(ls, flags)
  np.testing.assert_array_equal(scales, np.array(want_scale, np.float32))
  np.testing.assert_array_equal(good, np.array(want_good, np.int32))
  assert final.loss_scale.dtype == jnp.float32 and final.good_steps.dtype == jnp.int32
  assert (final.growth_interval, final.factor, final.min_scale) == (3, 2.0, 2.0)


def test_growth_never_overflows_the_scale():
  _, (scales, _) = _trajectory(precision.dynamic_loss_scale(2.0 ** 127, 1), [True, True])
  np.testing.assert_array_equal(scales, np.float32([2.0 ** 127] * 2))


@pytest.mark.parametrize("make,value", [(precision.no_loss_scale, 1.0),
                                        (lambda: precision.static_loss_scale(1000.0), 1000.0)])
def test_static_scales_do_not_move(make, value):
  ls = make()
  final, (scales, good) = _trajectory(ls, [True, False, True, True])
  np.testing.assert_array_equal(scales, np.float32([value] * 4))
  np.testing.assert_array_equal(good, np.zeros(4, np.int32))
  assert not ls.dynamic
  dyn = precision.dynamic_loss_scale()
  assert jax.tree.structure(ls) != jax.tree.structure(dyn)  # static fields differ...
  same = lambda a, b: [(x.shape, x.dtype) for x in jax.tree.leaves(a)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(b)]
  assert same(ls, dyn)  # ...but the checkpointed leaves are the same in every mode


def _skipping_step(loss_fn, tx):
  def step(carry, _):
    params, opt_state, ls = carry
    loss, grads, finite = precision.scaled_value_and_grad(loss_fn, ls)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    params, opt_state = optax.tree.where(finite, new, (params, opt_state))
    ls = ls.adjust(finite)
    return (params, opt_state, ls), (finite, params, opt_state.count, ls.loss_scale,
                                     ls.good_steps)
  return step


def test_non_finite_gradients_skip_the_update_and_halve_the_scale():
  # L(p) = 2^100·p has gradient 2^100; scaled by S it overflows float32 (max < 2^128) iff
  # S ≥ 2^28. The update p -= 2^-110·g subtracts 2^-10 exactly; the optimizer counts updates.
  c, lr = 2.0 ** 100, 2.0 ** -110
  tx = optax.scale_by_schedule(lambda count: -lr * jnp.ones_like(count, jnp.float32))
  p0 = jnp.float32(1.0)
  ls = precision.dynamic_loss_scale(2.0 ** 29, 2)
  step = _skipping_step(lambda p: c * p, tx)
  run = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=6))
  _, (finite, p, count, scale, good) = run((p0, tx.init(p0), ls))
  e = 2.0 ** -10
  np.testing.assert_array_equal(finite, [False, False, True, True, False, True])
  np.testing.assert_array_equal(p, np.float32([1, 1, 1 - e, 1 - 2 * e, 1 - 2 * e, 1 - 3 * e]))
  np.testing.assert_array_equal(count, [0, 0, 1, 2, 2, 3])
  np.testing.assert_array_equal(scale, np.float32([2.0 ** k for k in (28, 27, 27, 28, 27, 27)]))
  np.testing.assert_array_equal(good, [0, 0, 1, 0, 0, 1])


def test_scaled_gradients_equal_float32_gradients_exactly():
  graphdef, params = _build("mlp", 0)
  batch = _mlp_batch(0)
  # One compiled program (a dynamic scale is a traced value): scales 1 and 2^15 give the same
  # bits, since a power-of-two scale commutes with every rounding in the backward pass.
  one = _evaluate("mlp", graphdef, params, batch, precision.dynamic_loss_scale(1.0, 5))
  big = _evaluate("mlp", graphdef, params, batch, precision.dynamic_loss_scale(2.0 ** 15, 5))
  assert bool(one["finite"]) and bool(big["finite"])
  assert float(one["loss"]) == float(big["loss"])
  for g, w in zip(jax.tree.leaves(big["grads"]), jax.tree.leaves(one["grads"])):
    assert g.dtype == jnp.float32
    np.testing.assert_array_equal(g, w)
  # Against plain value_and_grad, a different program: equal up to float32 rounding. The
  # programs run the same operations, but XLA may fuse and contract them differently, moving
  # each rounding by ≤ 1 ulp; the MLP's gradient is a chain of ≲ 16 such operations per entry
  # (the batch sums included, whose reordering moves them by ≤ log2(batch) ulps of their terms).
  want_loss, want_grads = jax.jit(jax.value_and_grad(_mse(graphdef)),
                                  compiler_options=FAST_COMPILE)(params, batch)
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(float(one["loss"]), float(want_loss), rtol=16 * eps)
  for g, w in zip(jax.tree.leaves(one["grads"]), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=0, atol=16 * eps * float(np.abs(np.asarray(w)).max()))


def _dot_dtypes(fn, *args):
  eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  out = set()
  while eqns:
    e = eqns.pop()
    if e.primitive.name == "dot_general":
      out.add(tuple(v.aval.dtype for v in e.invars))
    for p in e.params.values():
      inner = getattr(p, "jaxpr", p)
      eqns.extend(getattr(inner, "eqns", []))
  return out


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_bf16_model_keeps_float32_params_and_losses(name):
  batch_fn = SETUPS[name][2]
  for seed in range(3):
    g32, p32 = _build(name, seed)
    g16, p16 = _build(name, seed, jnp.bfloat16)
    assert g16 != g32  # the compute dtype lives in the graphdef...
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32)):
      assert a.dtype == jnp.float32
      np.testing.assert_array_equal(a, b)  # ...not in the float32 master parameters
    batch = batch_fn(seed)
    bf16, l32 = _evaluate(name, g16, p32, batch), _loss(name, g32, p32, batch)
    assert bf16["loss"].dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16["grads"]))
    assert float(bf16["loss"]) != float(l32)
    np.testing.assert_allclose(bf16["loss"], l32, rtol=BF16_LOSS_RTOL)
  inputs = _inputs(name, batch)
  outputs = jax.eval_shape(lambda p: nnx.merge(g16, p)(inputs), p32)
  assert outputs.dtype == jnp.float32
  dots16 = _dot_dtypes(lambda p: nnx.merge(g16, p)(inputs), p32)
  assert dots16 and all(jnp.bfloat16 in d for d in dots16), dots16  # really computes in bf16
  dots32 = _dot_dtypes(lambda p: nnx.merge(g32, p)(inputs), p32)
  assert dots32 == {(jnp.dtype(jnp.float32),) * 2}, dots32


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_float32_twin_gives_the_float32_loss_exactly(name):
  cfg, data, batch_fn, _ = SETUPS[name]
  g16, params = _build(name, 3, jnp.bfloat16)
  twin = models.build_graphdef(cfg(), data(), jnp.float32, like=params)
  g32, p32 = _build(name, 3)
  assert twin == g32
  batch = batch_fn(3)
  got, want = _loss(name, twin, params, batch), _loss(name, g32, p32, batch)
  assert got.dtype == jnp.float32 and float(got) == float(want)
  _, mlp_params = _build("mlp", 0)
  narrow = config_lib.default_config().model
  narrow.widths = (8,)
  with pytest.raises(ValueError, match="parameters of `like`"):
    models.build_graphdef(narrow, _mlp_data(), jnp.float32, like=mlp_params)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_bf16_training_with_dynamic_scale_reduces_the_loss(name):
  graphdef, params = _build(name, 0, jnp.bfloat16)
  batch = SETUPS[name][2](0)
  state = (params, TXS[name].init(params), _loss_scale())
  losses = []
  for _ in range(20):
    state, out = _train_step(name, graphdef, state, batch)
    assert bool(out["finite"])
    losses.append(float(out["loss"]))
  params, _, ls = state
  assert float(ls.loss_scale) == 2.0 ** (15 + 20 // 5)  # doubled every 5 finite steps
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert losses[-1] < 0.5 * losses[0], losses


def test_loss_scale_round_trips_through_orbax(tmp_path):
  ls = precision.dynamic_loss_scale(2.0 ** 15, 4, min_scale=0.5)
  ls, _ = _trajectory(ls, [True, False, True, True, True])  # scale 2^14, 3 good steps
  payload = {"loss_scale": ls, "params": {"w": jnp.arange(3.0)}}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", payload)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: payload))
  got = restored["loss_scale"]
  assert isinstance(got, precision.LossScale)
  assert jax.tree.structure(got) == jax.tree.structure(ls)  # static fields from the target
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ls)):
    assert a.dtype == b.dtype and a.shape == ()
    np.testing.assert_array_equal(a, b)
  assert (float(got.loss_scale), int(got.good_steps)) == (2.0 ** 14, 3)
  assert float(got.adjust(jnp.bool_(True)).loss_scale) == 2.0 ** 15  # 4th good step grows


def test_precision_config_is_validated():
  c = config_lib.validate_config(config_lib.default_config())
  assert precision.compute_dtype(c) == jnp.float32 and precision.probe_dtype(c) == jnp.float32
  assert not precision.loss_scale_from_config(c).dynamic
  for value, check in [("dynamic", lambda ls: ls.dynamic and ls.growth_interval == 2000
                        and float(ls.loss_scale) == 2.0 ** 15),
                       ("1024", lambda ls: not ls.dynamic and float(ls.loss_scale) == 1024.0)]:
    c = config_lib.default_config()
    c.precision.loss_scale = value
    c.precision.compute_dtype = "bfloat16"
    c = config_lib.validate_config(c)
    assert check(precision.loss_scale_from_config(c))
    assert precision.compute_dtype(c) == jnp.bfloat16
  bad = [("compute_dtype", "float16", r"precision.compute_dtype='float16' is not one of"),
         ("probe_dtype", "fp32", r"precision.probe_dtype='fp32' is not one of"),
         ("loss_scale", "dynamc", r"precision.loss_scale='dynamc'.*Did you mean 'dynamic'"),
         ("loss_scale", "-2", r"precision.loss_scale='-2' is not one of"),
         ("initial_scale", 0.0, r"precision.initial_scale=0.0: must be > 0"),
         ("growth_interval", 0, r"precision.growth_interval=0: must be >= 1")]
  for key, value, message in bad:
    c = config_lib.default_config()
    c.precision[key] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate_config(c)


# --------------------------------------------------------------------------------------------
# The trainer with bfloat16 compute and a dynamic loss scale
# --------------------------------------------------------------------------------------------


def _run_config(**overrides):
  base = {"num_steps": 6, "progress_bar": False, "plots": False, "log_every": 1,
          "eval_every": 3, "eval_examples": 16, "batch_size": 8, "model.depth": 1,
          "model.width": 32, "model.num_heads": 2, "data.context_length": 32,
          "data.max_chars": 50_000, "probe.lanczos_every": 3, "probe.lanczos_iters": 8,
          "probe.preconditioned_every": 0, "monitor.enabled": False, "checkpoint.every": 2,
          "checkpoint.async_save": False, "precision.compute_dtype": "bfloat16",
          "precision.loss_scale": "dynamic", "precision.growth_interval": 2}
  base.update(overrides)
  return config_lib.load_config("configs/olmo_style.py:wsd,smoke", base)


def _rows(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, compile_cache):  # pylint: disable=unused-argument
  # compile_cache: the crashed and resumed runs below reuse this run's executables.
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("bf16")
  trainer.train_and_evaluate(_run_config(), str(workdir))
  return _rows(workdir)


def test_trainer_logs_the_dynamic_scale_and_probes_in_float32(bf16_run, tmp_path):
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  # growth_interval=2 and finite gradients: the scale doubles after every second step.
  scales = [r["precision/loss_scale"] for r in bf16_run if "precision/loss_scale" in r]
  assert scales == [2.0 ** 15 * 2 ** (s // 2) for s in range(6)]
  assert all(r["precision/grads_finite"] == 1 for r in bf16_run if "train/loss" in r)
  # Reference: the same seed trained in float32. At step 0 both runs hold the same float32
  # parameters and the same batch; the Lanczos λ_max and the evaluation loss are computed by
  # float32 forward passes (precision.probe_dtype) in both, so they agree exactly, while the
  # training loss of the bfloat16 run differs by bfloat16 rounding.
  f32 = tmp_path / "f32"
  trainer.train_and_evaluate(_run_config(**{"precision.compute_dtype": "float32",
                                            "precision.loss_scale": "none", "num_steps": 1,
                                            "schedule.warmup_steps": 0,
                                            # row 0's λ_max, eval and train loss are computed
                                            # before the first update: no λ_c, no saves
                                            "probe.critical": False,
                                            "checkpoint.enabled": False}),
                             str(f32))
  ref = _rows(f32)[0]
  assert bf16_run[0]["curv/lambda_max"] == ref["curv/lambda_max"]
  assert bf16_run[0]["eval/loss"] == ref["eval/loss"]
  assert bf16_run[0]["train/loss"] != ref["train/loss"]
  np.testing.assert_allclose(bf16_run[0]["train/loss"], ref["train/loss"], rtol=BF16_LOSS_RTOL)


def test_bf16_run_resumes_exactly_with_its_loss_scale(bf16_run, tmp_path, interrupt_at_row):
  """Crash before row 5 (after the checkpoint at step 5, the end of warmup), resume: the loss
  scale comes back from the checkpoint (it doubled twice by then; a fresh scale would log 2^15
  at step 5) and every row equals the uninterrupted run's bit for bit."""
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  interrupt_at_row(lambda: trainer.train_and_evaluate(_run_config(), str(tmp_path)), 5)
  summary = trainer.train_and_evaluate(_run_config(), str(tmp_path))
  assert summary["resumed_from_step"] == 5
  assert _rows(tmp_path) == bf16_run
