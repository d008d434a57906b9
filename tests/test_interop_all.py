"""Every optax transformation of the project with optax's own wrappers and with Orbax.

The 11 transformations of ``curvature``, ``convergence`` and ``distill`` (every function that
returns an ``optax.GradientTransformation``; ``test_every_transformation_is_covered`` finds
them on disk, so a new one fails until it has a case here) each go through:

* ``optax.chain`` with AdamW, inside ``optax.MultiSteps`` (k = 2), under ``jax.jit``: no
  recompilation after the first call, zero updates while accumulating, finite parameters that
  move when an update is emitted, unknown extra args accepted;
* ``optax.inject_hyperparams``: the transformation's own float hyperparameter where it has one
  that is worth scheduling (learning rate, clipping norm, target): the injected value is
  changed in the state, and the run must match a run of the plain transformation built with
  that value (params and every state leaf), so the factory works on a traced value. The others
  run beside an injected AdamW (or Adam's β₁), whose switched value stays in the state;
* an Orbax round trip of the whole optimizer state (``StandardCheckpointer``, restored into the
  same structure): bit-exact, and one more update from the restored state gives bit-identical
  parameters and state (one compiled program, so bit for bit).

The LR-type pieces (``scale_by_group_schedule``, ``per_layer_learning_rates``) multiply by
−η, so they take the place of AdamW's learning-rate step: the chain is AdamW written out,
``scale_by_adam → add_decayed_weights → piece``. The wrappers (``anomaly_guard``,
``accumulate_gradients``) wrap AdamW, as documented.
"""

from __future__ import annotations

import ast
import functools
import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import convergence
import curvature
import distill
from distill import _strategy

ROOT = pathlib.Path(__file__).resolve().parents[1]
LR = 1e-2
CORE = ("val/loss", "val/kl", "val/ppl")
A = jnp.diag(jnp.linspace(0.5, 5.0, 8))
SHIFT = jnp.linspace(-1.0, 1.0, 8)


def loss_fn(params, batch):
  return (0.5 * params["w"] @ A @ params["w"] + 0.5 * jnp.sum(params["b"] ** 2)
          + 0.01 * batch * jnp.sum(params["w"]))


def shifted(params):
  return 0.5 * jnp.sum((params["w"] - SHIFT) ** 2)


def init_params():
  return {"w": jnp.ones(8, jnp.float32), "b": jnp.full((2, 3), 0.5, jnp.float32)}


def extra_args(params, batch, loss, grads):
  """Every extra arg any of the transformations reads, plus one none of them knows."""
  del params
  return dict(value=loss, grad=grads, value_fn=lambda p: loss_fn(p, batch),
              relative_value_fns={"shifted": shifted},
              eval_metrics={"val/loss": loss, "val/kl": 2.0 * loss, "val/ppl": jnp.exp(loss)},
              some_unknown_arg=jnp.ones(3))


def adamw(learning_rate, inject=False):
  factory = optax.inject_hyperparams(optax.adamw) if inject else optax.adamw
  return factory(learning_rate=learning_rate, weight_decay=1e-4)


class Case(NamedTuple):
  make: Callable[[float, bool], optax.GradientTransformation]  # (hyperparameter, inject)
  hyperparameter: str   # the injected name
  a: float              # the value the injected optimizer is built with
  b: float              # the value it is switched to, and the reference is built with
  period: int = 2       # the parameters move every `period` calls (MultiSteps' k = 2)
  own: bool = False     # the transformation's own hyperparameter (else optax's, beside it)


def own(factory, name, a, b, static_args=(), **kwargs) -> Case:
  """Injects the transformation's own hyperparameter ``name``; AdamW after it."""
  def make(value, inject):
    f = optax.inject_hyperparams(factory, static_args=static_args) if inject else factory
    return optax.chain(f(**kwargs, **{name: value}), adamw(LR))
  return Case(make, name, a, b, own=True)


def beside(factory) -> Case:
  """No float hyperparameter worth injecting: AdamW's learning rate, beside it, is."""
  return Case(lambda lr, inject: optax.chain(factory(), adamw(lr, inject)), "learning_rate",
              LR, 3 * LR)


def as_adamw_step(piece) -> Case:
  """An LR piece ends AdamW written out; Adam's β₁ is injected."""
  def make(b1, inject):
    adam = optax.inject_hyperparams(optax.scale_by_adam) if inject else optax.scale_by_adam
    return optax.chain(adam(b1=b1), optax.add_decayed_weights(1e-4), piece)
  return Case(make, "b1", 0.9, 0.8)


def wrapping(wrapper, period=2) -> Case:
  """A wrapper around AdamW; AdamW's learning rate is injected."""
  return Case(lambda lr, inject: wrapper(adamw(lr, inject)), "learning_rate", LR, 3 * LR,
              period)


def scale_by_critical_sharpness(target):
  # inject_hyperparams passes a factory's ``**kwargs`` on as one keyword named after them, so
  # the transformation's ``**probe_kwargs`` is bound here, as a user would.
  return curvature.scale_by_critical_sharpness(target, learning_rate=0.5)


_PROBE_STATIC = ("every", "step_guess", "tol_power", "max_evals")
LABELS = {"w": "w", "b": "b"}

CASES = {
    "critical_sharpness_probe": own(curvature.critical_sharpness_probe, "learning_rate",
                                    0.1, 0.3, _PROBE_STATIC),
    "relative_sharpness_probe": own(
        functools.partial(curvature.relative_sharpness_probe, ["shifted"]), "learning_rate",
        0.1, 0.3, _PROBE_STATIC),
    "scale_by_critical_sharpness": own(scale_by_critical_sharpness, "target", 1.0, 0.5),
    "evidence_monitor": beside(lambda: convergence.evidence_monitor(["loss"])),
    "trajectory_monitor": beside(
        lambda: convergence.trajectory_monitor(half_width=3, max_lag=2, window=4)),
    "anomaly_guard": wrapping(convergence.anomaly_guard),
    "clip_by_mode": own(distill.clip_by_mode, "max_norm", 0.5, 0.2, ("layer_labels",),
                        mode="per_layer", layer_labels=LABELS),
    "scale_by_group_schedule": Case(
        lambda lr, inject: optax.chain(
            optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
            (optax.inject_hyperparams(_strategy.scale_by_group_schedule)
             if inject else _strategy.scale_by_group_schedule)(lr, group="w")),
        "schedule", LR, 3 * LR, own=True),
    "per_layer_learning_rates": as_adamw_step(
        distill.per_layer_learning_rates({"w": 0.05, "b": 0.02}, LABELS)),
    "accumulate_gradients": wrapping(
        functools.partial(distill.accumulate_gradients, every_k=2), period=4),
    # One reweight rule: with none, ``info.rules_fired`` has shape (0,), which Orbax refuses
    # to save ("Cannot save arrays with zero size").
    "controller_transformation": beside(lambda: distill.controller_transformation(
        distill.adaptive_controller(
            loss_weights={"kd": 1.0, "ce": 0.5}, core_metrics=CORE, window=2,
            reweight_rules=[distill.ReweightRule("val/kl", 1.0, {"kd": 0.9})]))),
}


def test_every_transformation_is_covered():
  """Every function of the packages annotated to return a GradientTransformation has a case."""
  found = set()
  for package in ("curvature", "convergence", "distill"):
    for path in sorted((ROOT / package).glob("*.py")):
      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.FunctionDef) and node.returns is not None
            and "GradientTransformation" in ast.unparse(node.returns)):
          found.add(node.name)
  assert found == set(CASES), (sorted(found - set(CASES)), sorted(set(CASES) - found))


def _jit_step(opt, traces):
  def step(params, state, batch):
    traces.append(1)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, **extra_args(params, batch, loss, grads))
    return optax.apply_updates(params, updates), state, updates
  return jax.jit(step)


def _unwrap_injected(tree):
  """The state with each inject_hyperparams state replaced by its inner state."""
  injected = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)
  return jax.tree.map(lambda x: x.inner_state if injected(x) else x, tree, is_leaf=injected)


def _assert_trees_close(got, want, what):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
  for path, x, y in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = np.asarray(x), np.asarray(y)
    if np.issubdtype(y.dtype, np.floating):
      # Two compiled programs doing the same float32 arithmetic in possibly different fusion
      # orders: a few ulps per step, over a handful of steps; 1e-5 relative is ~80 ulps.
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True,
                                 err_msg=f"{what}: {path}")
    else:
      np.testing.assert_array_equal(x, y, err_msg=f"{what}: {path}")


def _assert_bit_identical(got, want, what):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, what
    assert x.tobytes() == y.tobytes(), what


def _orbax_round_trip(state, directory):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, state)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = checkpointer.restore(directory, abstract)
  checkpointer.close()
  return restored


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformation_with_optax_wrappers_and_orbax(name, tmp_path):
  case = CASES[name]
  params0 = init_params()
  batches = [jnp.float32(i) for i in range(5)]

  # 1. In a chain with AdamW, injected, inside MultiSteps, jitted.
  opt = optax.MultiSteps(case.make(case.a, True), every_k_schedule=2)
  traces = []
  step = _jit_step(opt, traces)
  state = opt.init(params0)
  hyper = optax.tree_utils.tree_get(state, "hyperparams")
  assert float(hyper[case.hyperparameter]) == pytest.approx(case.a)
  state = optax.tree_utils.tree_set(state, hyperparams={**hyper, case.hyperparameter:
                                                        jnp.asarray(case.b, jnp.float32)})
  params = params0
  for i, batch in enumerate(batches[:4]):
    new_params, state, updates = step(params, state, batch)
    emitted = bool(opt.has_updated(state))
    assert emitted == (i % 2 == 1), f"step {i}: MultiSteps emitted {emitted}"
    norm = float(optax.tree.norm(updates))
    moved = (i + 1) % case.period == 0
    assert (norm > 0) == moved and np.isfinite(norm), f"step {i}: |update| = {norm}"
    params = new_params
  assert len(traces) == 1, "recompiled after the first step"
  assert float(optax.tree_utils.tree_get(state, "hyperparams")[case.hyperparameter]) == (
      pytest.approx(case.b)), "the injected value did not stay in the state"

  # 2. inject_hyperparams: switched to b, it runs as the plain transformation built with b.
  if case.own:
    ref = optax.MultiSteps(case.make(case.b, False), every_k_schedule=2)
    ref_step = _jit_step(ref, [])
    ref_params, ref_state = params0, ref.init(params0)
    for batch in batches[:4]:
      ref_params, ref_state, _ = ref_step(ref_params, ref_state, batch)
    _assert_trees_close(params, ref_params, "params")
    _assert_trees_close(_unwrap_injected(state), ref_state, "state")

  # 3. Orbax: the restored state is bit-exact and the next update from it is the same.
  restored = _orbax_round_trip(state, tmp_path / "state")
  _assert_bit_identical(restored, state, "restored state")
  after = step(params, state, batches[4])
  after_restored = step(params, restored, batches[4])
  assert len(traces) == 1, "the restored state recompiled the step"
  _assert_bit_identical(after_restored, after, "update after restore")


def test_python_hyperparameters_are_still_checked():
  """The factories accept a traced hyperparameter (under inject_hyperparams) unchecked, and
  still reject a bad Python number at the boundary, naming it."""
  with pytest.raises(ValueError, match="`max_norm`"):
    distill.clip_by_mode(0.0)
  with pytest.raises(ValueError, match="`target`"):
    curvature.scale_by_critical_sharpness(-1.0, learning_rate=0.1)
