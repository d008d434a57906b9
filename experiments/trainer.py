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

The loop is ``experiments.loop.run`` over named pieces: the jitted ``train_step``, the probe
schedule (:class:`Probes`), the evaluation (:class:`Evaluation`), the monitor
(``experiments.monitoring.RunMonitor``), the checkpoint policy (``loop.CheckpointPolicy``) and
the metric writer (``experiments.records.MetricWriter``); :class:`_Run` builds and runs them.
With ``config.monitor.enabled`` (default) every step also runs the convergence monitor
(``convergence.Monitor``: anomaly detector, evidence windows, Bayesian network; logged as
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
import optax
from flax import nnx

import curvature
import distill
from experiments import checkpointing
from experiments import config_lib
from experiments import data as data_lib
from experiments import models
from experiments import loop
from experiments import monitoring
from experiments import optim
from experiments import precision
from experiments import records
from experiments.records import MetricWriter
from experiments.records import write_config
from experiments import sharding as sharding_lib

PyTree = Any
TASKS = ("code", "prose")  # the two tasks of data.name='mix', in matrix order


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
  the gradient is :func:`distill.micro_batched_value_and_grad`'s (a ``lax.scan``, so only one
  chunk's activations are alive).
  """
  if num_chunks == 1:
    return loss_fn, jax.value_and_grad(loss_fn)

  def chunk(batch):
    return jax.tree.map(
        lambda x: x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:]), batch)

  def full_loss(params, batch):
    return jnp.mean(jax.lax.map(lambda c: loss_fn(params, c), chunk(batch)))

  # The library's micro-batching: the same scan, accumulating in float32 whatever the
  # parameters' dtype.
  return full_loss, distill.micro_batched_value_and_grad(loss_fn, num_chunks)


# --------------------------------------------------------------------------------------------
# Steps (pure; jitted by the caller)
# --------------------------------------------------------------------------------------------


def schedule_count(opt_state, default: jax.Array) -> jax.Array:
  """The count the learning-rate schedule of ``opt_state`` reads (its last
  ``optax.ScaleByScheduleState``), ``default`` when it has none.

  A skipped update (a rollback, or the dynamic loss scale's skip) leaves the optimizer state,
  its count included, as it was while the step counter advances: from then on η_t = η(count),
  not η(step).
  """
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
  return counts[-1] if counts else default


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
        params, opt_state = optax.tree.where(finite, (params, opt_state),
                                             (state.params, state.opt_state))
        updates = jax.tree.map(lambda u: jnp.where(finite, u, 0), updates)
      extra = {"precision/loss_scale": ls.loss_scale,
               "precision/grads_finite": finite.astype(jnp.int32)}
      ls = ls.adjust(finite)
    metrics = {
        "train/loss": loss,
        "train/lr": jnp.asarray(schedule(schedule_count(state.opt_state, state.step)),
                                jnp.float32),
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
  r"""``(params, batch, held_out, guesses) -> (per_batch, band, next_guesses)``, the 2×2
  relative critical sharpness matrix on held-out batches (Kalra et al. 2026, arXiv 2601.16979).

  Entry [i, j] is :math:`\lambda_c^{i\to j} = 2/\eta_c`, :math:`\eta_c = \min\{\eta :
  L_i(\theta - \eta\,\Delta\theta_j) > L_i(\theta)\}`, measured on each of task i's K fixed
  held-out batches (``held_out[task]``, stacked on a leading axis) and summarised by
  ``curvature.relative_sharpness_band`` (median, min, max; ``not_descent`` counts as +inf).
  :math:`\Delta\theta_j` is the paper's update of task j: the update a fresh optimizer takes
  from the gradient of task j's part of this training batch, at unit learning rate — for AdamW
  its first step :math:`g_j/(|g_j| + \epsilon) + \gamma\theta` (the authors' virtual step
  from an empty optimizer state, as when fine-tuning on task j starts from θ), not a step
  of the mixed run's optimizer state, whose moments mostly carry the other task's gradients.
  The monitored gradients come from the held-out batches' own ``value_and_grad`` (one per
  batch, for both directions). Rows and columns follow ``TASKS``; ``next_guesses`` = 2/median
  where finite (the next measurement's warm start), else ``guesses``.
  """
  task_loss = loss_fn.task_loss
  p = config.probe

  def relative(params, batch, held_out, guesses):
    fresh = preconditioner.init(params)
    directions = [preconditioner.update(jax.grad(task_loss)(params, batch[t]), fresh, params)[0]
                  for t in TASKS]
    per_batch, band = curvature.relative_sharpness_band(
        [task_loss] * len(TASKS), params, directions, [held_out[t] for t in TASKS],
        step_guesses=guesses, tol_power=p.tol_power, max_evals=p.max_evals)
    ok = jnp.isfinite(band.median) & (band.median > 0)
    return per_batch, band, jnp.where(ok, 2.0 / jnp.where(ok, band.median, 1.0), guesses)
  return relative


def relative_held_out(config, dataset) -> dict[str, dict[str, Any]]:
  """Each task's evaluation examples (``eval_examples``, 0: all) cut into
  ``probe.relative_batches`` fixed held-out batches: ``{task: {"tokens": [K, n, T + 1]}}``."""
  k = config.probe.relative_batches
  out = {}
  for t in TASKS:
    tokens = dataset[t].eval_batch(config.eval_examples)["tokens"]
    n = len(tokens) // k
    if n < 1:
      raise ValueError(f"probe.relative_batches={k} held-out batches of {t} need at least {k} "
                       f"evaluation sequences, eval_examples gives {len(tokens)}.")
    out[t] = {"tokens": tokens[:k * n].reshape((k, n) + tokens.shape[1:])}
  return out


def _logged_relative(relative):
  """``relative`` (:func:`make_relative_fn`) returning the logged metrics and
  ``next_guess``, for the jitted probe."""
  def logged(params, batch, held_out, guesses):
    per_batch, band, nxt = relative(params, batch, held_out, guesses)
    return {**_relative_metrics(per_batch, band), "next_guess": nxt}
  return logged


def _relative_metrics(per_batch, band) -> dict[str, jax.Array]:
  """The logged band of each entry: median as ``curv/relative/<i>_along_<j>``, ``/min``,
  ``/max`` and ``not_descent`` counts under their own prefixes, and a status: ok (finite
  median), not_descent (+inf median), no_rise (0), else the batches' most common status."""
  out = {}
  codes = jnp.arange(len(curvature.STATUS_NAMES))
  for i, li in enumerate(TASKS):
    for j, dj in enumerate(TASKS):
      med, name = band.median[i, j], f"{li}_along_{dj}"
      mode = jnp.argmax(jnp.sum(per_batch.status[:, i, j, None] == codes, axis=0))
      status = jnp.where(jnp.isfinite(med) & (med > 0), curvature.STATUS_OK,
                         jnp.where(jnp.isinf(med), curvature.STATUS_NOT_DESCENT,
                                   jnp.where(med == 0, curvature.STATUS_NO_RISE, mode)))
      out.update({f"curv/relative/{name}": med, f"curv/relative_min/{name}": band.min[i, j],
                  f"curv/relative_max/{name}": band.max[i, j],
                  f"curv/relative_not_descent/{name}": band.num_not_descent[i, j],
                  f"curv/relative_status/{name}": status.astype(jnp.int32)})
  return out


# --------------------------------------------------------------------------------------------
# The loop's pieces: probes and evaluation (each an experiments.loop.Hook)
# --------------------------------------------------------------------------------------------


class Probes(loop.Hook):
  """The curvature probes outside the optax chain, on their schedules (``config.probe``).

  Explicit state, checkpointed with the run: ``key`` (the probes' PRNG key; each probe and
  step draws from its own stream, :func:`probe_stream_key`) and ``guess`` (the relative
  matrix's warm-start step sizes, [2, 2]). ``lanczos``, ``preconditioned``, ``relative``:
  the jitted probes, None when off; ``held_out``: the relative matrix's held-out batches
  (:func:`relative_held_out`).
  """

  def __init__(self, config, *, key, guess, lanczos=None, preconditioned=None, relative=None,
               held_out=None):
    p = config.probe
    self.every = {"lanczos": p.lanczos_every, "preconditioned": p.preconditioned_every,
                  "relative": p.relative_every}
    self.last = config.num_steps - 1
    self.key, self.guess = key, guess
    self.lanczos, self.preconditioned, self.relative = lanczos, preconditioned, relative
    self.held_out = held_out

  def _due(self, name: str, step: int) -> bool:
    return getattr(self, name) is not None and loop.due(self.every[name], step, self.last)

  def before(self, step, state, batch):
    out = {}
    if self._due("lanczos", step):
      out["curv/lambda_max"], out["curv/lambda_max_converged"] = self.lanczos(
          state.params, batch, probe_stream_key(self.key, step, "lambda_max"))
    if self._due("relative", step):
      rel = self.relative(state.params, batch, self.held_out, self.guess)
      self.guess = rel.pop("next_guess")
      out.update(rel)
    return out

  def sync(self, step):
    return self._due("relative", step)  # it moves the warm start a save of step − 1 holds

  def after(self, step, state, new_state, batch):
    if not self._due("preconditioned", step):
      return {}
    # P from the state after the step: v̂_t holds g_t, as in the unit-LR update Δθ_t.
    key = probe_stream_key(self.key, step, "preconditioned")
    lam, conv = self.preconditioned(state.params, new_state.opt_state, batch, key)
    return {"curv/preconditioned_sharpness": lam, "curv/preconditioned_converged": conv}


class Evaluation(loop.Hook):
  """``eval_step(params, eval_batch)`` every ``every`` steps (0: only the final evaluation)."""

  def __init__(self, eval_step, batch, every: int):
    self.eval_step, self.batch, self.every = eval_step, batch, every

  def before(self, step, state, batch):
    if self.every and step % self.every == 0:
      return self.eval_step(state.params, self.batch)
    return {}

  def final(self, params) -> dict[str, Any]:
    return records.to_json(jax.device_get(self.eval_step(params, self.batch)))


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------

_canonical = loop.canonical


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
  ``convergence.Monitor.pack`` of the monitor's state."""
  out = {"train": state, "rng": {"probe": probe_key}, "host": {"rel_guess": rel_guess}}
  if monitor_packed is not None:
    out["monitor"] = monitor_packed
  return out


class _Model(NamedTuple):
  """The data and model of a run (``_build_model``)."""
  dataset: Any
  data_info: Any
  graphdef: Any
  probe_graphdef: Any  # the same model computing in precision.probe_dtype
  params: PyTree


def _build_model(config) -> _Model:
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
  data_info = ({t: d.info for t, d in dataset.items()} if isinstance(dataset, dict)
               else primary.info)
  return _Model(dataset, data_info, graphdef, probe_graphdef, params)


class _Placement(NamedTuple):
  """Where arrays live: one device, or the mesh of ``config.mesh`` (experiments.sharding)."""
  mesh: Any
  state_sh: Any  # the train state's shardings (None on one device)
  small_sh: Any  # replicated scalars: probes' outputs, eval metrics (None on one device)
  place: Callable[[PyTree, Any], PyTree]
  put_batch: Callable[..., PyTree]
  jit_small: dict[str, Any]  # jit kwargs of the functions returning small outputs

  def state(self, s: TrainState) -> TrainState:
    return self.place(loop.canonical(s), self.state_sh)


def _placement(config, mesh, state) -> _Placement:
  if mesh is None:
    return _Placement(None, None, None, lambda tree, _: tree, lambda b, what: b, {})
  small_sh = sharding_lib.replicated(mesh)
  return _Placement(
      mesh, sharding_lib.state_shardings(state, mesh, config.mesh.layout, config.mesh.fsdp_axis),
      small_sh, sharding_lib.place, functools.partial(sharding_lib.shard_batch, mesh=mesh),
      {"out_shardings": small_sh})


def _place_batches(pl: _Placement, full, eval_batch):
  """The full batch (or None) and the evaluation batch on their devices."""
  if pl.mesh is None:
    return (None if full is None else jax.device_put(full)), jax.device_put(eval_batch)
  if full is not None:
    full = pl.put_batch(full, what="full batch")
  shards = sharding_lib.data_shards(pl.mesh)
  if all(x.shape[0] % shards == 0 for x in jax.tree.leaves(eval_batch)):
    return full, pl.put_batch(eval_batch, what="eval batch")
  return full, jax.device_put(eval_batch, pl.small_sh)


class _Jitted(NamedTuple):
  """The run's compiled functions (a probe that is off is None)."""
  train_step: Any
  eval_step: Any
  lanczos: Any
  preconditioned: Any
  relative: Any


def _jitted(config, model: _Model, optimizer, schedule, pl: _Placement) -> _Jitted:
  """The train step, evaluation and probes, each jitted once with its shardings."""
  same_precision = model.probe_graphdef is model.graphdef
  base_loss = make_loss_fn(config, model.graphdef)
  probe_base = base_loss if same_precision else make_loss_fn(config, model.probe_graphdef)
  if pl.mesh is not None and config.mesh.layout == "fsdp":
    base_loss = sharding_lib.gather_params(base_loss, pl.mesh)  # gather weights, not activations
    probe_base = sharding_lib.gather_params(probe_base, pl.mesh)
  n = config.grad_accum_steps
  loss_fn, value_and_grad = accumulate(base_loss, n)
  probe_loss_fn = accumulate(probe_base, n)[0]
  scaled_vg = functools.partial(precision.scaled_value_and_grad, base_loss,
                                value_and_grad=lambda f: accumulate(f, n)[1])
  step = make_train_step(loss_fn, value_and_grad, optimizer.tx, schedule,
                         directional=config.probe.directional,
                         nan_at_step=config.debug.nan_at_step,
                         probe_loss=None if same_precision else probe_loss_fn,
                         scaled_value_and_grad=scaled_vg)
  train_step = jax.jit(step, **({} if pl.mesh is None
                                else {"out_shardings": (pl.state_sh, pl.small_sh)}))
  p, small = config.probe, pl.jit_small
  return _Jitted(
      train_step, jax.jit(make_eval_step(config, model.probe_graphdef), **small),
      jax.jit(make_lanczos_fn(probe_loss_fn, p.lanczos_iters), **small)
      if p.lanczos_every else None,
      jax.jit(make_preconditioned_fn(probe_loss_fn, config), **small)
      if p.preconditioned_every else None,
      jax.jit(_logged_relative(make_relative_fn(probe_base, optimizer.preconditioner, config)),
              **small) if p.relative_every else None)


class _Resumed(NamedTuple):
  """What a resume restored (``_resume``)."""
  step: int
  arrays: dict[str, Any]  # the checkpoint's payload
  hyper_changes: list[str]  # maths fields changed on resume (allow_config_change)
  rows: list[dict]  # the metric rows kept (before ``step``)


def _resume(config, workdir, mgr, target, data_info, iterator) -> _Resumed:
  """Restores the newest valid checkpoint, checks config and data, truncates the logs."""
  try:
    restored, changed = checkpointing.restore_checked(config, workdir, mgr, target, data_info)
    meta = restored.metadata
    step = restored.step
    if int(restored.state["train"].step) != step:
      raise checkpointing.ResumeRefused(
          f"checkpoint {step} holds TrainState.step={int(restored.state['train'].step)}; it "
          "was not written by this runner.")
    hyper_changes, _ = checkpointing.config_differences(meta["config"],
                                                        checkpointing.config_json(config))
    if iterator is not None:
      iterator.set_state(meta["data_position"])
    kept = records.truncate_rows(os.path.join(workdir, records.METRICS_FILE), step)
  except BaseException:
    mgr.close()
    raise
  records.truncate_audit(workdir, step)
  checkpointing.log_resume(workdir, {
      "restored_step": step, "kept_metric_rows": len(kept),
      "skipped_corrupt": [s for s, _ in restored.skipped], "config_changes": changed})
  logging.info("resumed %s from the checkpoint at step %d (%d metric rows kept)", workdir,
               step, len(kept))
  return _Resumed(step, restored.state, hyper_changes, [json.loads(line) for line in kept])


def _boundaries(config, resumed: _Resumed | None) -> dict[int, str]:
  """Forced saves: stage boundaries and the first state after a changed-config resume."""
  out = monitoring.stage_boundaries(config) if config.checkpoint.enabled else {}
  if resumed is not None and resumed.hyper_changes and resumed.step < config.num_steps:
    why = "hyper-parameter change on resume: " + "; ".join(resumed.hyper_changes)
    s = resumed.step + 1
    out[s] = "; ".join(r for r in (out.get(s), why) if r)
  return out


# --------------------------------------------------------------------------------------------
# The run
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
    second of this process (``steady_steps_per_second``: after the first step, which
    compiles), ``jit_compilations``: the most times any jitted function of the
    run (train step, eval, Lanczos, ...) was compiled — 1 when nothing recompiled.

  Raises:
    TrainingDiverged: the training loss became non-finite (and ``monitor.rollback_on_anomaly``
      is off or its ``max_rollbacks`` are used up); everything up to that step is already
      written (metrics, TensorBoard, plots, audit log) and, with the monitor on, the state
      before the poisoned update is in a pinned emergency checkpoint at that step.
    ValueError: a bad config field, or a distillation config (one with a ``distill`` block).
    experiments.checkpointing.ResumeRefused: the workdir holds checkpoints of a run with a
      different config (the message lists the fields and the overrides).
  """
  if "distill" in config:
    raise ValueError("this config has a `distill` block: it is a distillation config; run it "
                     "with experiments.distillation.distill_and_evaluate or experiments.run.")
  config = config_lib.validate_config(config)
  sharding_lib.initialize_distributed(config.distributed)
  mesh = sharding_lib.make_mesh(config.mesh)
  # Several hosts: every process trains (and takes part in Orbax's saves); process 0 alone
  # writes config.json, metrics.jsonl, TensorBoard, the audit log and the plots.
  is_primary = jax.process_index() == 0
  resuming = checkpointing.prepare_workdir(config, workdir)
  if is_primary:
    write_config(config, workdir)
  model = _build_model(config)
  schedule = optim.make_schedule(config)
  optimizer = optim.make_optimizer(config, schedule)
  loss_scale = (None if config.precision.loss_scale == "none"
                else precision.loss_scale_from_config(config))
  state = loop.canonical(TrainState(jnp.int32(0), model.params,
                                    optimizer.tx.init(model.params), loss_scale))
  full, iterator, eval_batch = _batches(config, model.dataset, sharding_lib.data_shards(mesh))
  pl = _placement(config, mesh, state)
  full, eval_batch = _place_batches(pl, full, eval_batch)
  state = pl.state(state)
  if mesh is not None:
    logging.info("mesh %s, layout %s: parameters + optimizer state %s", dict(mesh.shape),
                 config.mesh.layout, sharding_lib.describe(state))
  fns = _jitted(config, model, optimizer, schedule, pl)
  p = config.probe
  probes = Probes(config, key=pl.place(jax.random.fold_in(jax.random.key(config.seed), 1),
                                       pl.small_sh),
                  guess=pl.place(jnp.full((len(TASKS), len(TASKS)), p.step_guess,
                                          jnp.float32), pl.small_sh),
                  lanczos=fns.lanczos, preconditioned=fns.preconditioned, relative=fns.relative,
                  held_out=None if fns.relative is None else pl.place(
                      relative_held_out(config, model.dataset), pl.small_sh))
  monitor = (monitoring.RunMonitor(monitoring.from_config(config), workdir=workdir,
                                   audit_every=config.monitor.audit_every,
                                   last_step=config.num_steps - 1, write_audit=is_primary)
             if config.monitor.enabled else None)
  run = _Run(config, workdir, is_primary, model, pl, fns, probes, monitor, iterator, full,
             Evaluation(fns.eval_step, eval_batch, config.eval_every))
  return run.train(state, resuming)


class _Run:
  """One run's pieces, the checkpoint policy around them, the loop and its summary."""

  def __init__(self, config, workdir, is_primary, model, pl, fns, probes, monitor, iterator,
               full, evaluation):
    self.config, self.workdir, self.is_primary = config, workdir, is_primary
    self.model, self.pl, self.fns, self.probes, self.monitor = model, pl, fns, probes, monitor
    self.iterator, self.full, self.evaluation = iterator, full, evaluation
    self.static_meta = {"config": checkpointing.config_json(config), "data": model.data_info,
                        "versions": checkpointing.versions()}

  def payload(self, state: TrainState) -> dict[str, Any]:
    return _payload(state, self.probes.key, self.probes.guess,
                    None if self.monitor is None else self.monitor.packed())

  def metadata(self, step: int) -> dict[str, Any]:
    """Checkpoint metadata with the data position after the batch of ``step`` was drawn."""
    pos = self.positions.get(step, _iterator_position(self.iterator))
    return {**self.static_meta, "data_position": pos}

  def next_batch(self):
    if self.full is not None:
      return self.full
    batch = self.pl.put_batch(next(self.iterator), what="batch")
    # The loop may draw step t + 1's batch before step t is saved: keep recent positions.
    self.positions[self.drawn] = _iterator_position(self.iterator)
    self.positions.pop(self.drawn - 3, None)
    self.drawn += 1
    return batch

  def skip_update(self, state: TrainState, step: int) -> TrainState:
    """The state after a rolled-back update: unchanged but for the step counter (the batch is
    dropped, as in optax.apply_if_finite)."""
    return self.pl.state(state._replace(step=jnp.int32(step + 1)))

  def restore(self, state: TrainState, resumed: _Resumed) -> TrainState:
    """Puts a resume's arrays into the state and the pieces.

    On one device they pass through the host first: Orbax returns arrays committed to the
    device, which a fresh run's are not, so every jitted function would lower to another
    program (sharding annotations) and miss the persistent compilation cache a fresh run of
    the same config filled. On a mesh both are placed with the same shardings already.
    """
    a = resumed.arrays if self.pl.mesh is not None else jax.device_get(resumed.arrays)
    state = self.pl.state(a["train"])
    self.probes.key = self.pl.place(a["rng"]["probe"], self.pl.small_sh)
    self.probes.guess = self.pl.place(loop.canonical(a["host"]["rel_guess"]), self.pl.small_sh)
    if self.monitor is not None:
      self.monitor.restore(a["monitor"])
    return state

  def train(self, state: TrainState, resuming: bool) -> dict[str, Any]:
    """Resume if asked, run the loop, the final evaluation and save; returns the summary."""
    config, ck = self.config, self.config.checkpoint
    mgr = checkpointing.make_manager(config, self.workdir) if (ck.enabled or resuming) else None
    resumed = None
    if resuming:
      resumed = _resume(config, self.workdir, mgr, self.payload(state), self.model.data_info,
                        self.iterator)
      state = self.restore(state, resumed)
    start_step = 0 if resumed is None else resumed.step
    self.drawn, self.positions = start_step, {}
    rows = [] if resumed is None else resumed.rows
    last_row = next((r for r in reversed(rows) if "train/loss" in r), {})
    policy = loop.CheckpointPolicy(
        mgr, every=ck.every, num_steps=config.num_steps, payload=self.payload,
        metadata=self.metadata, boundaries=_boundaries(config, resumed), enabled=ck.enabled,
        monitor=self.monitor, last_row=last_row,
        last_eval=next(({"eval/loss": r["eval/loss"]} for r in reversed(rows)
                        if "eval/loss" in r), {}))
    if resumed is None and ck.save_initial:
      policy.save_initial(state)
    writer = records.MetricWriter(self.workdir, resume_step=start_step if resuming else None,
                                  enabled=self.is_primary)
    if start_step < config.num_steps:  # the first step compiles every jitted function
      logging.info("compiling… (the first step traces and compiles the train step and probes)")
    bar = loop.ProgressBar(total=config.num_steps, initial=start_step,
                           enabled=config.progress_bar,
                           desc=os.path.basename(os.path.normpath(self.workdir)))
    start = time.perf_counter()
    hooks = [self.probes, self.evaluation] + ([self.monitor] if self.monitor else [])
    self.clock = loop.Clock()
    end, last_eval = loop.run_to_end(
        state, range(start_step, config.num_steps), final_eval=self.evaluation.final,
        policy=policy, mgr=mgr, closers=(bar, writer), step_fn=self.fns.train_step,
        next_batch=self.next_batch, hooks=hooks + [policy, bar, self.clock], writer=writer,
        log_every=config.log_every, skip_update=self.skip_update)
    wall = time.perf_counter() - start
    return self.summary(end, start_step, resuming, last_eval, wall, last_row, writer.path)

  def summary(self, end: loop.LoopEnd, start_step, resuming, last_eval, wall, resumed_row,
              metrics_path) -> dict[str, Any]:
    """Plots, the divergence error, and the summary dict of :func:`train_and_evaluate`."""
    config = self.config
    last_row = end.last_row or resumed_row
    steps_done = config.num_steps if end.stopped_at is None else end.stopped_at + 1
    jitted = dict(self.fns._asdict(),
                  monitor=self.monitor.monitor.update if self.monitor is not None else None)
    counts = {k: f._cache_size() for k, f in jitted.items() if f is not None}  # pylint: disable=protected-access
    compilations = max(counts.values())
    if compilations > 1:
      logging.warning("jitted functions compiled more than once (expected 1 each): %s; some "
                      "input changed shape, dtype or weak type between steps.", counts)
    if config.plots and self.is_primary:
      from experiments import plots  # pylint: disable=g-import-not-at-top
      plots.make_plots(self.workdir)
    if end.stopped_at is not None:
      raise _diverged(config, self.workdir, end.stopped_at, last_row, metrics_path,
                      self.monitor)
    summary = {
        "steps": steps_done,
        "resumed_from_step": start_step if resuming else None,
        "train/loss": last_row.get("train/loss"),
        **last_eval,
        "wall_seconds": wall,
        "steps_per_second": (steps_done - start_step) / wall if wall > 0 else float("inf"),
        "steady_steps_per_second": self.clock.steps_per_second,
        "jit_compilations": compilations,
    }
    if self.monitor is not None:
      summary.update({"monitor/p_converged": last_row.get("monitor/p_converged"),
                      "monitor/decision": last_row.get("monitor/decision"),
                      **self.monitor.summary()})
    logging.info("finished %d steps (%d in this process) in %.1f s (%.1f steps/s); final %s",
                 steps_done, steps_done - start_step, wall, summary["steps_per_second"],
                 last_eval)
    return summary


def _diverged(config, workdir, step, last_row, metrics_path, monitor) -> TrainingDiverged:
  lr = last_row.get("train/lr", float("nan"))
  emergency = monitor is not None and monitor.emergency_at == step
  return TrainingDiverged(
      f"training loss became non-finite ({last_row.get('train/loss')}) at step {step} "
      f"(learning rate {lr:.4g}, λ_c {last_row.get('curv/critical_sharpness', float('nan')):.4g}"
      f", 2/η {2 / lr if lr else float('inf'):.4g}). Metrics up to and including that step "
      f"are in {metrics_path}; plots in {os.path.join(workdir, 'plots')}."
      + (f" The state before that update is the emergency checkpoint {step} in "
         f"{checkpointing.checkpoint_dir(workdir)}." if emergency else "")
      + " Lower optimizer.learning_rate or set optimizer.grad_clip"
      + ("." if monitor is None or config.monitor.rollback_on_anomaly else
         ", or set monitor.rollback_on_anomaly=True to skip a poisoned update."))
