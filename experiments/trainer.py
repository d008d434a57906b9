"""Training loop: a pure jitted ``train_step`` plus host-side probes, logging and plots.

``train_and_evaluate(config, workdir)`` builds the data, the model (Flax NNX, split into a static
graph and a plain params dict), the optimizer (with the critical-sharpness probe inside the optax
chain, before the learning-rate scale) and runs ``config.num_steps`` steps, writing the run
directory of DESIGN.md::

  workdir/config.json      the resolved config
  workdir/metrics.jsonl    one JSON object per logged step
  workdir/checkpoints/     Orbax checkpoints and the tier ledger tiers.json (config.checkpoint)
  workdir/resume_log.jsonl one line per resume (restored step, skipped checkpoints, changes)
  workdir/audit.jsonl      the convergence monitor's decisions, anomalies and checkpoint tier
                           events, one JSON object per line (experiments.monitoring)
  workdir/tensorboard/     TensorBoard events (tensorboardX)
  workdir/plots/*.png      sharpness and loss plots, and the convergence report
                           plots/convergence.png (experiments.plots)

With ``config.monitor.enabled`` (default) every step also runs the convergence monitor
(``experiments.monitoring``: anomaly detector, evidence windows, Bayesian network; logged as
``monitor/*``). An anomaly in ``monitor.emergency_on`` writes a pinned emergency checkpoint of
the state before the flagged update; with ``monitor.rollback_on_anomaly`` an anomaly in
``monitor.rollback_on`` (default: a non-finite loss) skips that update and training goes on,
without it a non-finite loss stops the run (``TrainingDiverged``) after that checkpoint. Spikes
while η·λ_c oscillates around 2 are edge-of-stability oscillation, not anomalies: logged
(``monitor/eos_oscillation``, ``audit.jsonl``), never saved as emergencies. The
posterior promotes checkpoints preliminary → observation → candidate → release; the end of
warmup, the start of a WSD decay and a resume under changed hyper-parameters force a save.

Row ``{"step": t, ...}`` describes the parameters θ_t *before* update t: the training loss on
batch t, λ_c along update t, λ_max / λ^PH at θ_t on batch t, the learning rate η_t of update t
and the evaluation loss of θ_t. A last row ``step = num_steps`` holds the final evaluation.

Same seed, same config → bit-identical metrics.jsonl (nothing wall-clock is written there),
also across interruptions: a run whose workdir holds checkpoints resumes from the newest valid
one and rewrites the rows from that step on, identically (``experiments.checkpointing``).
All probe settings are static, so nothing recompiles after the first step.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import convergence
import curvature
from experiments import checkpointing
from experiments import config_lib
from experiments import data as data_lib
from experiments import models
from experiments import monitoring
from experiments import optim
from experiments import precision
from experiments import sharding as sharding_lib

PyTree = Any
TASKS = ("code", "prose")  # the two tasks of data.name='mix', in matrix order
TIER_NAMES = monitoring.TIER_NAMES


class TrainState(NamedTuple):
  """Everything a step changes: the step count, the params dict, the optax state and, with
  ``precision.loss_scale`` other than 'none', the loss-scale state
  (``experiments.precision.LossScale``; checkpointed with the rest)."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  loss_scale: precision.LossScale | None = None


class TrainingDiverged(RuntimeError):
  """The training loss became non-finite; metrics and plots up to that step were written."""


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _mse(logits, y):
  return 0.5 * jnp.mean(jnp.sum(jnp.square(logits.astype(jnp.float32) - y), axis=-1))


def _xent(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def make_loss_fn(config, graphdef) -> Callable[[PyTree, PyTree], jax.Array]:
  """``loss_fn(params, batch) -> scalar``: merges ``graphdef`` with ``params`` and applies it.

  digits: MSE against one-hot targets (``0.5·mean‖f(x) − y‖²``) or cross-entropy;
  text: next-character cross-entropy; mix: ``w·L_code + (1 − w)·L_prose`` with
  ``w = data.code_fraction``.
  """
  if config.data.name == "digits":
    def loss_fn(params, batch):
      logits = nnx.merge(graphdef, params)(batch["x"])
      if config.loss == "mse":
        return _mse(logits, batch["y"])
      return _xent(logits, batch["label"])
    return loss_fn

  def lm_loss(params, batch):
    tokens = batch["tokens"]
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return _xent(logits, tokens[:, 1:])

  if config.data.name != "mix":
    return lm_loss
  w = float(config.data.code_fraction)

  def mix_loss(params, batch):
    return w * lm_loss(params, batch["code"]) + (1.0 - w) * lm_loss(params, batch["prose"])
  mix_loss.task_loss = lm_loss  # per-task loss on batch[task], for the relative matrix
  return mix_loss


def accumulate(loss_fn, num_chunks: int):
  """``(loss_fn, value_and_grad)`` over a batch split into ``num_chunks`` equal chunks.

  The loss is the mean of the chunk losses (equal to the whole-batch loss for a mean loss);
  the gradient is accumulated with a ``lax.scan`` so only one chunk's activations are alive.
  """
  if num_chunks == 1:
    return loss_fn, jax.value_and_grad(loss_fn)

  def chunk(batch):
    return jax.tree.map(
        lambda x: x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:]), batch)

  def full_loss(params, batch):
    return jnp.mean(jax.lax.map(lambda c: loss_fn(params, c), chunk(batch)))

  def full_value_and_grad(params, batch):
    vg = jax.value_and_grad(loss_fn)

    def body(carry, c):
      loss, grads = vg(params, c)
      return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zero, chunk(batch))
    return loss / num_chunks, jax.tree.map(lambda g: g / num_chunks, grads)

  return full_loss, full_value_and_grad


# --------------------------------------------------------------------------------------------
# Steps (pure; jitted by the caller)
# --------------------------------------------------------------------------------------------


def make_train_step(loss_fn, value_and_grad, tx, schedule, *, directional: bool = False,
                    nan_at_step: int = -1, probe_loss=None, scaled_value_and_grad=None):
  """``train_step(state, batch) -> (state, metrics)``: one optimizer step with the probes.

  The probe inside ``tx`` gets ``value`` (the loss just computed, reused as L(θ)), ``grad``
  (which places the search's first model trial) and ``value_fn`` (the loss at this batch as a
  function of params only). With ``probe_loss`` (a float32-compute twin of ``loss_fn`` for a
  bfloat16 model, ``config.precision.probe_dtype``) the probe's ``value`` and ``value_fn``
  come from it instead — one extra float32 forward pass — so λ_c compares float32 losses.

  Loss scaling (``state.loss_scale`` not None; ``scaled_value_and_grad(loss_scale)`` returns
  ``f(params, batch) -> (loss, grads, grads_finite)``, see ``experiments.precision``): the
  gradients are those of ``S·L`` divided by ``S``; with a dynamic scale a step whose gradients
  are not all finite is skipped (params and optimizer state, the probes' included, unchanged)
  and the scale halves; ``precision/loss_scale`` (the scale used by this step) and
  ``precision/grads_finite`` are logged. ``nan_at_step`` ≥ 0 (``config.debug.nan_at_step``, tests only)
  replaces the loss and every gradient entry of that step by NaN (a ``where``: the other
  steps' parameters, losses and λ_c are bit-identical to a run without it, but XLA may fuse
  the optional directional-sharpness HVP differently, changing it in the last bits).
  """
  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    ls = state.loss_scale
    if ls is not None:
      loss, grads, _ = scaled_value_and_grad(ls)(state.params, batch)
    else:
      loss, grads = value_and_grad(state.params, batch)
    if nan_at_step >= 0:
      poisoned = state.step == nan_at_step
      loss = jnp.where(poisoned, jnp.nan, loss)
      grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
    if probe_loss is None:
      value, value_fn = loss, lambda p: loss_fn(p, batch)
    else:
      value, value_fn = probe_loss(state.params, batch), lambda p: probe_loss(p, batch)
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, value=value, grad=grads, value_fn=value_fn)
    params = optax.apply_updates(state.params, updates)
    extra = {}
    if ls is not None:
      finite = precision.all_finite(grads)
      if ls.dynamic:  # skip a non-finite update, as optax.apply_if_finite does
        params, opt_state = precision.select_tree(finite, (params, opt_state),
                                                  (state.params, state.opt_state))
        updates = jax.tree.map(lambda u: jnp.where(finite, u, 0), updates)
      extra = {"precision/loss_scale": ls.loss_scale,
               "precision/grads_finite": finite.astype(jnp.int32)}
      ls = ls.adjust(finite)
    metrics = {
        "train/loss": loss,
        "train/lr": jnp.asarray(schedule(state.step), jnp.float32),
        "train/grad_norm": optax.tree.norm(grads),
        "train/update_norm": optax.tree.norm(updates),
    }
    probes = curvature.probe_metrics(opt_state)
    if not directional:  # the probe reports NaN for it; leave it out of the logs instead
      probes.pop("curv/directional_sharpness", None)
    metrics.update(probes)
    metrics.update(extra)
    return TrainState(state.step + 1, params, opt_state, ls), metrics
  return train_step


def make_eval_step(config, graphdef):
  """``eval_step(params, batch) -> metrics``: loss (and accuracy for digits) on a fixed batch."""
  loss_fn = make_loss_fn(config, graphdef)

  def eval_step(params, batch):
    if config.data.name == "digits":
      logits = nnx.merge(graphdef, params)(batch["x"])
      acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
      return {"eval/loss": loss_fn(params, batch), "eval/accuracy": acc}
    if config.data.name == "mix":
      out = {f"eval/{t}_loss": loss_fn.task_loss(params, batch[t]) for t in TASKS}
      out["eval/loss"] = loss_fn(params, batch)
      return out
    return {"eval/loss": loss_fn(params, batch)}
  return eval_step


# One PRNG stream per randomised probe, so that λ_max and λ^PH measured at the same step do
# not start their Lanczos runs from the same random vector.
PROBE_STREAMS = {"lambda_max": 0, "preconditioned": 1}


def probe_stream_key(key: jax.Array, step: int, probe: str) -> jax.Array:
  """The key of ``probe`` (a name in :data:`PROBE_STREAMS`) at ``step``."""
  return jax.random.fold_in(jax.random.fold_in(key, PROBE_STREAMS[probe]), step)


def make_lanczos_fn(loss_fn, num_iters: int):
  """``(params, batch, key) -> (λ_max(H), converged)`` of the batch loss, by Lanczos."""
  def lanczos(params, batch, key):
    res = curvature.hessian_eigenvalues(lambda p: loss_fn(p, batch), params, k=1,
                                        num_iters=num_iters, key=key)
    return res.eigenvalues[0], res.converged.astype(jnp.int32)
  return lanczos


def make_preconditioned_fn(loss_fn, config):
  """``(params, opt_state, batch, key) -> (λ_max(P^{-1/2} H P^{-1/2}), converged)``, Adam's P."""
  o = config.optimizer

  def preconditioned(params, opt_state, batch, key):
    adam_state = curvature.find_adam_state(opt_state)
    res = curvature.preconditioned_sharpness(
        lambda p: loss_fn(p, batch), params, adam_state, b1=o.b1, b2=o.b2, eps=o.eps,
        num_iters=config.probe.lanczos_iters, key=key)
    return res.eigenvalues[0], res.converged.astype(jnp.int32)
  return preconditioned


def make_relative_fn(loss_fn, preconditioner, config):
  """``(params, opt_state, batch, guesses) -> CriticalSharpness`` with [2, 2] fields.

  Entry [i, j]: λ_c of task i's loss along task j's unit-LR update Δθ_j, the optimizer's update
  of task j's gradient alone without the learning-rate scale (a virtual step: the optimizer
  state is not changed). Rows and columns follow ``TASKS``.
  """
  task_loss = loss_fn.task_loss
  p = config.probe

  def relative(params, opt_state, batch, guesses):
    fns = [functools.partial(task_loss, batch=batch[t]) for t in TASKS]
    directions = []
    for fn in fns:
      grads = jax.grad(fn)(params)
      direction, _ = preconditioner.update(grads, opt_state[0], params)
      directions.append(direction)
    return curvature.relative_sharpness_matrix(
        fns, params, directions, step_guesses=guesses, tol_power=p.tol_power,
        max_evals=p.max_evals)
  return relative


# --------------------------------------------------------------------------------------------
# Run directory writers
# --------------------------------------------------------------------------------------------


def _to_python(value):
  value = np.asarray(value)
  if value.dtype == np.bool_:
    return bool(value)
  if np.issubdtype(value.dtype, np.integer):
    return int(value)
  return float(value)


class MetricWriter:
  """Appends metric rows to ``metrics.jsonl`` (flushed every row) and to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True, *, resume_step: int | None = None,
               enabled: bool = True):
    """``resume_step``: append to ``metrics.jsonl`` (already truncated to the rows before it)
    and hide older TensorBoard events from that step on (``purge_step``). ``enabled=False``
    (the processes other than 0 of a multi-host run) writes nothing."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = None
    self._tb = None
    if not enabled:
      return
    self._file = open(self.path, "w" if resume_step is None else "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if self._file is None:
      return
    row = {"step": int(step)}
    row.update({k: _to_python(v) for k, v in sorted(metrics.items())})
    # Python's json writes NaN / Infinity for non-finite floats; json.loads reads them back.
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and math.isfinite(float(v)):
          self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Write the resolved config as ``workdir/config.json``."""
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write("\n")


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def _canonical(tree):
  # Strong-typed, committed arrays: the state after step 1 must have the same avals as before
  # it, or the jitted step would compile a second time.
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), tree)


def _batches(config, dataset, shards: int = 1):
  """``(full_batch_or_None, iterator_or_None, eval_batch)`` for the configured data.

  ``shards``: the number of devices the batch is split over; a full batch is trimmed to a
  multiple of it (and of ``grad_accum_steps``).
  """
  a = config.grad_accum_steps
  full_multiple = math.lcm(a, shards)
  if config.data.name == "mix":
    frac = config.data.code_fraction
    if config.batch_size == 0:
      n = config.full_batch_examples or min(d.num_train for d in dataset.values())
      sizes = {"code": int(round(n * frac))}
      sizes["prose"] = n - sizes["code"]
    else:
      sizes = {"code": int(round(config.batch_size * frac))}
      sizes["prose"] = config.batch_size - sizes["code"]
    for t, s in sizes.items():
      if s < a or s % a:
        raise ValueError(f"data.code_fraction={frac} gives {s} {t} sequences per batch; each "
                         f"task needs a positive multiple of grad_accum_steps={a}. Change "
                         f"batch_size or data.code_fraction.")
    ev = {t: d.eval_batch(config.eval_examples) for t, d in dataset.items()}
    if config.batch_size == 0:
      full = {t: d.full_batch(multiple_of=full_multiple, max_examples=sizes[t])
              for t, d in dataset.items()}
      return full, None, ev
    its = {t: d.iterator(sizes[t], config.seed + i, multiple_of=a)
           for i, (t, d) in enumerate(dataset.items())}
    return None, data_lib.MixedIterator(its), ev
  ev = dataset.eval_batch(config.eval_examples)
  if config.batch_size == 0:
    return (dataset.full_batch(multiple_of=full_multiple,
                               max_examples=config.full_batch_examples), None, ev)
  if config.batch_size > dataset.num_train:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {dataset.num_train} "
                     f"training examples of data.name={dataset.name!r}.")
  return None, dataset.iterator(config.batch_size, config.seed, multiple_of=a), ev


def _iterator_position(iterator) -> Any:
  """The iterator's position as JSON data (``None`` in full-batch mode)."""
  if iterator is None:
    return None
  pos = iterator.get_state()
  if isinstance(pos, dict):
    return {k: dict(v._asdict()) for k, v in pos.items()}
  return dict(pos._asdict())


def _payload(state: TrainState, probe_key, rel_guess, monitor_packed=None) -> dict[str, Any]:
  """The array part of a checkpoint (see experiments.checkpointing); ``monitor_packed`` is
  ``experiments.monitoring.pack`` of the monitor state."""
  out = {"train": state, "rng": {"probe": probe_key}, "host": {"rel_guess": rel_guess}}
  if monitor_packed is not None:
    out["monitor"] = monitor_packed
  return out


def _postfix(row: dict) -> dict:
  out = {"loss": f"{row.get('train/loss', float('nan')):.4g}"}
  if "curv/critical_sharpness" in row:
    out["λc"] = f"{row['curv/critical_sharpness']:.4g}"
  if "curv/lr_sharpness" in row:
    out["ηλc"] = f"{row['curv/lr_sharpness']:.3g}"
  return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train as ``config`` says and write the run directory ``workdir``.

  Args:
    config: an experiment config (see ``experiments/config_lib.py`` for every field);
      validated first, with errors naming the offending field.
    workdir: the run directory; created if needed. If it holds checkpoints the run resumes
      from the newest valid one (``config.checkpoint.resume``); otherwise an existing
      ``metrics.jsonl`` is replaced.

  Returns:
    A summary dict: steps done (in all, resumed runs included), ``resumed_from_step`` (None
    for a fresh run), last training loss, last evaluation metrics, wall time and steps per
    second of this process, ``jit_compilations``: the most times any jitted function of the
    run (train step, eval, Lanczos, ...) was compiled — 1 when nothing recompiled.

  Raises:
    TrainingDiverged: the training loss became non-finite (and ``monitor.rollback_on_anomaly``
      is off or its ``max_rollbacks`` are used up); everything up to that step is already
      written (metrics, TensorBoard, plots, audit log) and, with the monitor on, the state
      before the poisoned update is in a pinned emergency checkpoint at that step.
    experiments.checkpointing.ResumeRefused: the workdir holds checkpoints of a run with a
      different config (the message lists the fields and the overrides).
  """
  config = config_lib.validate_config(config)
  sharding_lib.initialize_distributed(config.distributed)
  mesh = sharding_lib.make_mesh(config.mesh)
  # Several hosts: every process trains (and takes part in Orbax's saves); process 0 alone
  # writes config.json, metrics.jsonl, TensorBoard, the audit log and the plots.
  is_primary = jax.process_index() == 0
  ck = config.checkpoint
  resuming = checkpointing.prepare_workdir(config, workdir)
  if is_primary:
    write_config(config, workdir)

  dataset = data_lib.load_dataset(config.data, config.seed)
  primary = dataset["code"] if isinstance(dataset, dict) else dataset
  if isinstance(dataset, dict):
    for t, d in dataset.items():
      logging.info("data %s: %s", t, d.info)
  else:
    logging.info("data %s: %s", primary.name, primary.info)

  dtype, probe_dtype = precision.compute_dtype(config), precision.probe_dtype(config)
  model = models.build_model(config.model, primary, config.seed, dtype=dtype)
  graphdef, params = models.split_params(model)
  del model
  # The probes' (and the evaluation's) forward passes in probe_dtype over the same parameters.
  probe_graphdef = (graphdef if probe_dtype == dtype else
                    models.build_graphdef(config.model, primary, probe_dtype, like=params))
  logging.info("model %s: %d parameters", config.model.name, models.count_params(params))

  schedule = optim.make_schedule(config)
  optimizer = optim.make_optimizer(config, schedule)
  base_loss = make_loss_fn(config, graphdef)
  probe_base = (base_loss if probe_graphdef is graphdef
                else make_loss_fn(config, probe_graphdef))  # float32 probe losses
  if mesh is not None and config.mesh.layout == "fsdp":
    base_loss = sharding_lib.gather_params(base_loss, mesh)  # gather weights, not activations
    probe_base = sharding_lib.gather_params(probe_base, mesh)
  loss_fn, value_and_grad = accumulate(base_loss, config.grad_accum_steps)
  probe_loss_fn = accumulate(probe_base, config.grad_accum_steps)[0]
  scaled_vg = functools.partial(
      precision.scaled_value_and_grad, base_loss,
      value_and_grad=lambda f: accumulate(f, config.grad_accum_steps)[1])
  loss_scale = (None if config.precision.loss_scale == "none"
                else precision.loss_scale_from_config(config))

  state = _canonical(TrainState(jnp.int32(0), params, optimizer.tx.init(params), loss_scale))
  full, iterator, eval_batch = _batches(config, dataset, sharding_lib.data_shards(mesh))

  # ---- placement: one device, or the mesh of config.mesh (experiments.sharding)
  if mesh is None:
    state_sh = small_sh = None
    place = lambda tree, _: tree  # pylint: disable=unnecessary-lambda-assignment
    put_batch = lambda b, what: b  # pylint: disable=unnecessary-lambda-assignment
    jit_small: dict[str, Any] = {}
    if full is not None:
      full = jax.device_put(full)
    eval_batch = jax.device_put(eval_batch)
  else:
    state_sh = sharding_lib.state_shardings(state, mesh, config.mesh.layout,
                                            config.mesh.fsdp_axis)
    small_sh = sharding_lib.replicated(mesh)
    place = sharding_lib.place
    put_batch = functools.partial(sharding_lib.shard_batch, mesh=mesh)
    jit_small = {"out_shardings": small_sh}  # probes' scalars and eval metrics: replicated
    if full is not None:
      full = put_batch(full, what="full batch")
    eval_batch = (put_batch(eval_batch, what="eval batch")
                  if all(x.shape[0] % sharding_lib.data_shards(mesh) == 0
                         for x in jax.tree.leaves(eval_batch))
                  else jax.device_put(eval_batch, small_sh))

  def canonical_state(s: TrainState) -> TrainState:
    return place(_canonical(s), state_sh)

  state = canonical_state(state)
  if mesh is not None:
    logging.info("mesh %s, layout %s: parameters + optimizer state %s", dict(mesh.shape),
                 config.mesh.layout, sharding_lib.describe(state))
  train_step = jax.jit(make_train_step(loss_fn, value_and_grad, optimizer.tx, schedule,
                                       directional=config.probe.directional,
                                       nan_at_step=config.debug.nan_at_step,
                                       probe_loss=(None if probe_graphdef is graphdef
                                                   else probe_loss_fn),
                                       scaled_value_and_grad=scaled_vg),
                       **({} if mesh is None else {"out_shardings": (state_sh, small_sh)}))
  eval_step = jax.jit(make_eval_step(config, probe_graphdef), **jit_small)
  p = config.probe
  lanczos = (jax.jit(make_lanczos_fn(probe_loss_fn, p.lanczos_iters), **jit_small)
             if p.lanczos_every else None)
  precond = (jax.jit(make_preconditioned_fn(probe_loss_fn, config), **jit_small)
             if p.preconditioned_every else None)
  relative = (jax.jit(make_relative_fn(probe_base, optimizer.preconditioner, config),
                      **jit_small)
              if p.relative_every else None)
  rel_guess = place(jnp.full((len(TASKS), len(TASKS)), p.step_guess, jnp.float32), small_sh)
  probe_key = place(jax.random.fold_in(jax.random.key(config.seed), 1), small_sh)
  monitor = monitoring.Monitor(config) if config.monitor.enabled else None
  mstate = monitor.init() if monitor is not None else None

  # ---- checkpoints: resume, then save every ck.every steps and at the end
  data_info = ({t: d.info for t, d in dataset.items()} if isinstance(dataset, dict)
               else primary.info)
  static_meta = {"config": checkpointing.config_json(config), "data": data_info,
                 "versions": checkpointing.versions()}
  mgr = checkpointing.make_manager(config, workdir) if (ck.enabled or resuming) else None
  start_step = 0
  hyper_changes: list[str] = []  # maths fields changed on resume (allow_config_change)
  last_row: dict[str, Any] = {}
  last_eval_loss: dict[str, float] = {}  # ledger metric of the next checkpoint
  if resuming:
    try:
      target = checkpointing.abstract(_payload(
          state, probe_key, rel_guess, None if monitor is None else monitor.pack(mstate)))
      restored = checkpointing.restore(mgr, target, max_step=config.num_steps, workdir=workdir)
      meta = restored.metadata
      changed = checkpointing.check_config(meta["config"], config, workdir=workdir,
                                           where=f"checkpoint at step {restored.step}")
      checkpointing.check_data(meta["data"], data_info, workdir=workdir,
                               allow=ck.allow_config_change)
      start_step = restored.step
      state = canonical_state(restored.state["train"])
      if int(state.step) != start_step:
        raise checkpointing.ResumeRefused(
            f"checkpoint {start_step} holds TrainState.step={int(state.step)}; it was not "
            "written by this runner.")
      probe_key = place(restored.state["rng"]["probe"], small_sh)
      rel_guess = place(_canonical(restored.state["host"]["rel_guess"]), small_sh)
      if monitor is not None:
        mstate = monitoring.unpack(restored.state["monitor"], mstate)
      hyper_changes, _ = checkpointing.config_differences(meta["config"],
                                                          checkpointing.config_json(config))
      if iterator is not None:
        iterator.set_state(meta["data_position"])
      kept = checkpointing.truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start_step)
    except BaseException:
      mgr.close()
      raise
    monitoring.truncate_audit(workdir, start_step)
    rows = [json.loads(line) for line in kept]
    last_row = next((r for r in reversed(rows) if "train/loss" in r), {})
    last_eval_loss = next(({"eval/loss": r["eval/loss"]} for r in reversed(rows)
                           if "eval/loss" in r), {})
    checkpointing.log_resume(workdir, {
        "restored_step": start_step, "kept_metric_rows": len(kept),
        "skipped_corrupt": [s for s, _ in restored.skipped], "config_changes": changed})
    logging.info("resumed %s from the checkpoint at step %d (%d metric rows kept)", workdir,
                 start_step, len(kept))

  # ---- the monitor's host side: tiers, emergency saves, rollback, audit log
  boundaries = monitoring.stage_boundaries(config) if ck.enabled else {}
  if resuming and hyper_changes and start_step < config.num_steps:
    # allow_config_change: the first state trained under the new hyper-parameters.
    why = "hyper-parameter change on resume: " + "; ".join(hyper_changes)
    boundaries[start_step + 1] = "; ".join(
        r for r in (boundaries.get(start_step + 1), why) if r)
  m = config.monitor
  emergency_at = None  # step of the last emergency checkpoint
  level = 0  # the tier level the posterior asks for (monitoring.tier_level)

  def audit(record: dict) -> None:
    if monitor is not None and is_primary:
      monitoring.append_audit(workdir, record)

  def host(**changes) -> None:
    nonlocal mstate
    if mstate is not None:
      mstate = mstate._replace(host=mstate.host._replace(
          **{k: jnp.int32(v) for k, v in changes.items()}))

  def packed_monitor():
    return None if monitor is None else monitor.pack(mstate)

  def host_int(name: str) -> int:
    return int(getattr(mstate.host, name)) if mstate is not None else 0

  def save_tier() -> int:
    """The tier of a new save: the asked level, release only once per upward crossing."""
    return 2 if level == 3 and host_int("released") else level

  def save(done: int, loop_step: int, *, force: bool = False, reason: str | None = None
           ) -> None:
    """Checkpoints the state after ``done`` updates (the loop state of step ``done``)."""
    tier = save_tier() if monitor is not None else 0
    host(newest_tier=tier, released=max(host_int("released"), int(tier == 3)))
    metrics = {k: float(last_row[k]) for k in ("train/loss",) if k in last_row}
    metrics.update({k: float(v) for k, v in last_eval_loss.items()})
    mgr.save(done, _payload(state, probe_key, rel_guess, packed_monitor()),
             tier=TIER_NAMES[tier],
             metadata={**static_meta, "data_position": _iterator_position(iterator)},
             metrics=metrics, force=force, reason=reason)
    audit({"event": "checkpoint", "step": loop_step, "checkpoint": done, "kind":
           "forced" if force else "regular", "tier": TIER_NAMES[tier], "reason": reason,
           "p_converged": last_row.get("monitor/p_converged")})

  def promote(loop_step: int) -> None:
    """Promotes the newest checkpoint when the posterior's level rose above its tier."""
    newest = host_int("newest_tier")
    target = save_tier()
    if mgr is None or newest < 0 or target <= newest:
      return
    latest = mgr.latest_step()
    p_c = last_row.get("monitor/p_converged", float("nan"))
    reason = (f"posterior P(converged)={p_c:.4f} at step {loop_step} "
              + ("(decision: converged)" if target == 3 else
                 f"(>= {monitor.thresholds[target - 1]})"))
    if latest is not None and monitoring.TIER_NAMES.index(mgr.record(latest).tier) < target:
      mgr.promote(latest, TIER_NAMES[target], reason=reason)
    host(newest_tier=target, released=max(host_int("released"), int(target == 3)))
    audit({"event": "promotion", "step": loop_step, "checkpoint": latest,
           "tier": TIER_NAMES[target], "reason": reason, "p_converged": p_c})

  writer = MetricWriter(workdir, resume_step=start_step if resuming else None,
                        enabled=is_primary)
  if start_step < config.num_steps:  # the first step compiles every jitted function
    logging.info("compiling… (the first step traces and compiles the train step and probes)")
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=config.num_steps, initial=start_step, disable=not config.progress_bar,
             dynamic_ncols=True, mininterval=0.5,
             desc=os.path.basename(os.path.normpath(workdir)))
  start = time.perf_counter()
  last_eval: dict[str, Any] = {}
  diverged = None
  saving = ck.enabled

  def due(every: int, step: int) -> bool:
    return every > 0 and (step % every == 0 or step == config.num_steps - 1)

  try:
    for step in range(start_step, config.num_steps):
      batch = full if full is not None else put_batch(next(iterator), what="batch")
      extra = {}
      if lanczos is not None and due(p.lanczos_every, step):
        extra["curv/lambda_max"], extra["curv/lambda_max_converged"] = lanczos(
            state.params, batch, probe_stream_key(probe_key, step, "lambda_max"))
      if relative is not None and due(p.relative_every, step):
        rel = relative(state.params, state.opt_state, batch, rel_guess)
        rel_guess = rel.step_size
        for i, li in enumerate(TASKS):
          for j, dj in enumerate(TASKS):
            extra[f"curv/relative/{li}_along_{dj}"] = rel.sharpness[i, j]
            extra[f"curv/relative_status/{li}_along_{dj}"] = rel.status[i, j]
      if config.eval_every and step % config.eval_every == 0:
        extra.update(eval_step(state.params, eval_batch))
        last_eval_loss = {"eval/loss": extra["eval/loss"]}
      new_state, metrics = train_step(state, batch)
      if precond is not None and due(p.preconditioned_every, step):
        # P from the state after the step: v̂_t holds g_t, as in the unit-LR update Δθ_t.
        key = probe_stream_key(probe_key, step, "preconditioned")
        (extra["curv/preconditioned_sharpness"],
         extra["curv/preconditioned_converged"]) = precond(
             state.params, new_state.opt_state, batch, key)
      metrics.update(extra)
      metrics = jax.device_get(metrics)
      mout = None
      if monitor is not None:
        # Host (NumPy) inputs: the same jit signature whatever device arrays the step made.
        new_mstate, mout = monitor.update(mstate, monitor.inputs_of(metrics))
        metrics.update(jax.device_get(mout.metrics))
      finite = math.isfinite(float(metrics["train/loss"]))

      # What the monitor asks for (documented in experiments.monitoring).
      reason = int(metrics["monitor/anomaly_reason"]) if mout is not None else 0
      emergency = bool(reason & monitor.emergency_mask) if mout is not None else False
      emergency = (emergency and mgr is not None
                   and host_int("emergency_saves") < m.max_emergency_saves)
      rollback = (mout is not None and bool(reason & monitor.rollback_mask)
                  and host_int("rollbacks") < m.max_rollbacks)
      stop = not finite and not rollback
      if mout is not None:
        level = monitoring.tier_level(float(metrics["monitor/p_converged"]),
                                      int(metrics["monitor/decision"]), monitor.thresholds)
        metrics["monitor/tier"] = level
        metrics["monitor/action"] = ((monitoring.ACTION_EMERGENCY_SAVE if emergency else 0)
                                     | (monitoring.ACTION_ROLLBACK if rollback else 0)
                                     | (monitoring.ACTION_STOP if stop else 0))
      if (step % config.log_every == 0 or extra or not finite or reason
          or metrics.get("monitor/eos_oscillation") or step == config.num_steps - 1):
        writer.write(step, metrics)
      last_row = {k: _to_python(v) for k, v in metrics.items()}

      if mout is not None:
        if (step % m.audit_every == 0 or bool(mout.changed) or reason
            or step == config.num_steps - 1):
          audit(monitor.audit_record(step, new_mstate, mout))
        if emergency:
          # The state before the flagged update, with the monitor state of that moment, so a
          # resume from this checkpoint replays step `step` exactly.
          why = (f"anomaly at step {step}: {', '.join(convergence.reason_names(reason))} "
                 f"(train/loss={metrics['train/loss']})")
          mgr.emergency_save(step, _payload(state, probe_key, rel_guess, packed_monitor()),
                             reason=why,
                             metadata={**static_meta,
                                       "data_position": _iterator_position(iterator)})
          logging.warning("emergency checkpoint at step %d: %s", step, why)
          emergency_at = step
          new_mstate = new_mstate._replace(host=new_mstate.host._replace(
              emergency_saves=jnp.int32(host_int("emergency_saves") + 1)))
        # Edge-of-stability oscillation: audited and logged, not an anomaly (no save, no warning).
        for rec in monitor.eos_events(step, mstate, new_mstate, metrics):
          audit(rec)
          if rec["phase"] == "start":
            logging.info("edge-of-stability oscillation from step %d (%s, η·λ_c=%s): logged as "
                         "monitor/eos_oscillation, not an anomaly", step,
                         ", ".join(rec["reasons"]), rec["curv/lr_sharpness"])
        mstate = new_mstate
        if emergency or rollback or stop:
          audit({"event": "anomaly", "step": step, "reasons": convergence.reason_names(reason),
                 "train/loss": metrics["train/loss"], "emergency_checkpoint": emergency,
                 "action": "rollback" if rollback else ("stop" if stop else "continue")})

      if rollback:
        # Back to the last good state, the state before the flagged update: the emergency
        # checkpoint at this step is restored (checksums verified) and must equal the copy
        # the loop still holds, which it continues from (arrays restored by Orbax are
        # committed to a device and would make every jitted function compile again). The
        # flagged update is skipped: its batch is dropped and the step counter advances,
        # as in optax.apply_if_finite.
        if mgr is not None and step in mgr.all_steps():
          good = {"train": state, "host": {"rel_guess": rel_guess}}
          restored = mgr.restore(step, checkpointing.abstract(
              _payload(state, probe_key, rel_guess, packed_monitor()))).state
          restored = {"train": restored["train"], "host": restored["host"]}
          same = [np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(
              jax.tree.leaves(jax.device_get(good)), jax.tree.leaves(jax.device_get(restored)))]
          if not all(same):  # bit for bit (NaN probe diagnostics included)
            raise RuntimeError(f"the emergency checkpoint at step {step} differs from the "
                               "in-memory state it was written from; not rolling back.")
        state = canonical_state(state._replace(step=jnp.int32(step + 1)))
        host(rollbacks=host_int("rollbacks") + 1)
        logging.warning("rolled back at step %d: skipped the update of batch %d", step, step)
      elif stop:
        diverged = step
        break
      else:
        state = new_state
      if step == start_step:  # compiled: start the bar's clock now, so its ETA leaves that out
        bar.start_t = bar.last_print_t = time.time()
      bar.update(1)
      if step % 10 == 0 or step == config.num_steps - 1:
        bar.set_postfix(_postfix(last_row), refresh=False)

      if monitor is not None:
        if level < 3 and host_int("released"):
          host(released=0)
        promote(step)
      done = step + 1
      if saving and done < config.num_steps:
        regular = done % ck.every == 0
        if regular or done in boundaries:
          save(done, step, force=not regular, reason=boundaries.get(done))
    if diverged is None:
      last_eval = {k: _to_python(v)
                   for k, v in jax.device_get(eval_step(state.params, eval_batch)).items()}
      writer.write(config.num_steps, last_eval)
      if saving and mgr.latest_step() != config.num_steps:
        last_eval_loss = {"eval/loss": last_eval["eval/loss"]}
        forced = config.num_steps % ck.every != 0 or config.num_steps in boundaries
        why = "; ".join(r for r in ("end of run" if config.num_steps % ck.every else None,
                                    boundaries.get(config.num_steps)) if r)
        save(config.num_steps, config.num_steps - 1, force=forced, reason=why or None)
  except BaseException:
    if mgr is not None:  # wait for a save in flight, but do not mask the error
      checkpointing.close_after_error(mgr)
      mgr = None
    raise
  finally:
    bar.close()
    writer.close()
  if mgr is not None:
    mgr.close()  # waits for the last asynchronous save; raises if it failed

  wall = time.perf_counter() - start
  steps_done = config.num_steps if diverged is None else diverged + 1
  jitted = {"train_step": train_step, "eval_step": eval_step, "lanczos": lanczos,
            "preconditioned": precond, "relative": relative,
            "monitor": monitor.update if monitor is not None else None}
  counts = {k: f._cache_size() for k, f in jitted.items() if f is not None}  # pylint: disable=protected-access
  compilations = max(counts.values())
  if compilations > 1:
    logging.warning("jitted functions compiled more than once (expected 1 each): %s; some "
                    "input changed shape, dtype or weak type between steps.", counts)
  if config.plots and is_primary:
    from experiments import plots  # pylint: disable=g-import-not-at-top
    plots.make_plots(workdir)

  if diverged is not None:
    lr = last_row.get("train/lr", float("nan"))
    raise TrainingDiverged(
        f"training loss became non-finite ({last_row.get('train/loss')}) at step {diverged} "
        f"(learning rate {lr:.4g}, λ_c {last_row.get('curv/critical_sharpness', float('nan')):.4g}"
        f", 2/η {2 / lr if lr else float('inf'):.4g}). Metrics up to and including that step "
        f"are in {writer.path}; plots in {os.path.join(workdir, 'plots')}."
        + (f" The state before that update is the emergency checkpoint {diverged} in "
           f"{checkpointing.checkpoint_dir(workdir)}." if emergency_at == diverged else "")
        + " Lower optimizer.learning_rate or set optimizer.grad_clip"
        + ("." if monitor is None or config.monitor.rollback_on_anomaly else
           ", or set monitor.rollback_on_anomaly=True to skip a poisoned update."))

  summary = {
      "steps": steps_done,
      "resumed_from_step": start_step if resuming else None,
      "train/loss": last_row.get("train/loss"),
      **last_eval,
      "wall_seconds": wall,
      "steps_per_second": (steps_done - start_step) / wall if wall > 0 else float("inf"),
      "jit_compilations": compilations,
  }
  if mstate is not None:
    summary.update({
        "monitor/p_converged": last_row.get("monitor/p_converged"),
        "monitor/decision": last_row.get("monitor/decision"),
        "monitor/anomalies": int(mstate.detector.total_flagged),
        "monitor/eos_oscillations": int(mstate.detector.total_eos),
        "monitor/emergency_saves": host_int("emergency_saves"),
        "monitor/rollbacks": host_int("rollbacks"),
    })
  logging.info("finished %d steps (%d in this process) in %.1f s (%.1f steps/s); final %s",
               steps_done, steps_done - start_step, wall, summary["steps_per_second"], last_eval)
  return summary
