"""Training loop: a pure jitted ``train_step`` plus host-side probes, logging and plots.

``train_and_evaluate(config, workdir)`` builds the data, the model (Flax NNX, split into a static
graph and a plain params dict), the optimizer (with the critical-sharpness probe inside the optax
chain, before the learning-rate scale) and runs ``config.num_steps`` steps, writing the run
directory of DESIGN.md::

  workdir/config.json      the resolved config
  workdir/metrics.jsonl    one JSON object per logged step
  workdir/checkpoints/     Orbax checkpoints and the tier ledger tiers.json (config.checkpoint)
  workdir/resume_log.jsonl one line per resume (restored step, skipped checkpoints, changes)
  workdir/tensorboard/     TensorBoard events (tensorboardX)
  workdir/plots/*.png      sharpness and loss plots (experiments.plots)

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

import curvature
from experiments import checkpointing
from experiments import config_lib
from experiments import data as data_lib
from experiments import models
from experiments import optim

PyTree = Any
TASKS = ("code", "prose")  # the two tasks of data.name='mix', in matrix order


class TrainState(NamedTuple):
  """Everything a step changes: the step count, the params dict and the optax state."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


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


def make_train_step(loss_fn, value_and_grad, tx, schedule, *, directional: bool = False):
  """``train_step(state, batch) -> (state, metrics)``: one optimizer step with the probes.

  The probe inside ``tx`` gets ``value`` (the loss just computed, reused as L(θ)), ``grad``
  (which places the search's first model trial) and ``value_fn`` (the loss at this batch as a
  function of params only).
  """
  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    loss, grads = value_and_grad(state.params, batch)
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, value=loss, grad=grads,
        value_fn=lambda p: loss_fn(p, batch))
    params = optax.apply_updates(state.params, updates)
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
    return TrainState(state.step + 1, params, opt_state), metrics
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


def make_lanczos_fn(loss_fn, num_iters: int):
  """``(params, batch, key) -> λ_max(H)`` of the batch loss, by Lanczos."""
  def lanczos(params, batch, key):
    res = curvature.hessian_eigenvalues(lambda p: loss_fn(p, batch), params, k=1,
                                        num_iters=num_iters, key=key)
    return res.eigenvalues[0]
  return lanczos


def make_preconditioned_fn(loss_fn, config):
  """``(params, opt_state, batch, key) -> λ_max(P^{-1/2} H P^{-1/2})`` with Adam's P."""
  o = config.optimizer

  def preconditioned(params, opt_state, batch, key):
    adam_state = curvature.find_adam_state(opt_state)
    res = curvature.preconditioned_sharpness(
        lambda p: loss_fn(p, batch), params, adam_state, b1=o.b1, b2=o.b2, eps=o.eps,
        num_iters=config.probe.lanczos_iters, key=key)
    return res.eigenvalues[0]
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

  def __init__(self, workdir: str, tensorboard: bool = True, *, resume_step: int | None = None):
    """``resume_step``: append to ``metrics.jsonl`` (already truncated to the rows before it)
    and hide older TensorBoard events from that step on (``purge_step``)."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "w" if resume_step is None else "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
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


def _batches(config, dataset):
  """``(full_batch_or_None, iterator_or_None, eval_batch)`` for the configured data."""
  a = config.grad_accum_steps
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
      full = {t: d.full_batch(multiple_of=a, max_examples=sizes[t]) for t, d in dataset.items()}
      return full, None, ev
    its = {t: d.iterator(sizes[t], config.seed + i, multiple_of=a)
           for i, (t, d) in enumerate(dataset.items())}
    return None, data_lib.MixedIterator(its), ev
  ev = dataset.eval_batch(config.eval_examples)
  if config.batch_size == 0:
    return dataset.full_batch(multiple_of=a, max_examples=config.full_batch_examples), None, ev
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


def _payload(state: TrainState, probe_key, rel_guess) -> dict[str, Any]:
  """The array part of a checkpoint (see experiments.checkpointing)."""
  return {"train": state, "rng": {"probe": probe_key}, "host": {"rel_guess": rel_guess}}


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
    TrainingDiverged: the training loss became non-finite; everything up to that step is
      already written (metrics, TensorBoard, plots).
    experiments.checkpointing.ResumeRefused: the workdir holds checkpoints of a run with a
      different config (the message lists the fields and the overrides).
  """
  config = config_lib.validate_config(config)
  ck = config.checkpoint
  os.makedirs(workdir, exist_ok=True)
  resuming = checkpointing.has_checkpoints(workdir)
  if resuming and not ck.resume:
    checkpointing.move_aside(workdir)
    os.makedirs(workdir)
    resuming = False
  saved_config_path = os.path.join(workdir, "config.json")
  if resuming and not ck.allow_config_change and os.path.exists(saved_config_path):
    # Cheap early refusal, before data and compilation; the checkpoint's own copy of the
    # config is checked again after the restore.
    with open(saved_config_path, encoding="utf-8") as f:
      checkpointing.check_config(json.load(f), config, where="config.json", workdir=workdir,
                                 quiet=True)
  write_config(config, workdir)

  dataset = data_lib.load_dataset(config.data, config.seed)
  primary = dataset["code"] if isinstance(dataset, dict) else dataset
  if isinstance(dataset, dict):
    for t, d in dataset.items():
      logging.info("data %s: %s", t, d.info)
  else:
    logging.info("data %s: %s", primary.name, primary.info)

  model = models.build_model(config.model, primary, config.seed)
  graphdef, params = models.split_params(model)
  del model
  logging.info("model %s: %d parameters", config.model.name, models.count_params(params))

  schedule = optim.make_schedule(config)
  optimizer = optim.make_optimizer(config, schedule)
  base_loss = make_loss_fn(config, graphdef)
  loss_fn, value_and_grad = accumulate(base_loss, config.grad_accum_steps)

  state = _canonical(TrainState(jnp.int32(0), params, optimizer.tx.init(params)))
  full, iterator, eval_batch = _batches(config, dataset)
  if full is not None:
    full = jax.device_put(full)
  eval_batch = jax.device_put(eval_batch)

  train_step = jax.jit(make_train_step(loss_fn, value_and_grad, optimizer.tx, schedule,
                                       directional=config.probe.directional))
  eval_step = jax.jit(make_eval_step(config, graphdef))
  p = config.probe
  lanczos = jax.jit(make_lanczos_fn(loss_fn, p.lanczos_iters)) if p.lanczos_every else None
  precond = jax.jit(make_preconditioned_fn(loss_fn, config)) if p.preconditioned_every else None
  relative = (jax.jit(make_relative_fn(base_loss, optimizer.preconditioner, config))
              if p.relative_every else None)
  rel_guess = jnp.full((len(TASKS), len(TASKS)), p.step_guess, jnp.float32)
  probe_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  # ---- checkpoints: resume, then save every ck.every steps and at the end
  data_info = ({t: d.info for t, d in dataset.items()} if isinstance(dataset, dict)
               else primary.info)
  static_meta = {"config": checkpointing.config_json(config), "data": data_info,
                 "versions": checkpointing.versions()}
  mgr = checkpointing.make_manager(config, workdir) if (ck.enabled or resuming) else None
  start_step = 0
  last_row: dict[str, Any] = {}
  last_eval_loss: dict[str, float] = {}  # ledger metric of the next checkpoint
  if resuming:
    try:
      target = checkpointing.abstract(_payload(state, probe_key, rel_guess))
      restored = checkpointing.restore(mgr, target, max_step=config.num_steps, workdir=workdir)
      meta = restored.metadata
      changed = checkpointing.check_config(meta["config"], config, workdir=workdir,
                                           where=f"checkpoint at step {restored.step}")
      checkpointing.check_data(meta["data"], data_info, workdir=workdir,
                               allow=ck.allow_config_change)
      start_step = restored.step
      state = _canonical(restored.state["train"])
      if int(state.step) != start_step:
        raise checkpointing.ResumeRefused(
            f"checkpoint {start_step} holds TrainState.step={int(state.step)}; it was not "
            "written by this runner.")
      probe_key = restored.state["rng"]["probe"]
      rel_guess = _canonical(restored.state["host"]["rel_guess"])
      if iterator is not None:
        iterator.set_state(meta["data_position"])
      kept = checkpointing.truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start_step)
    except BaseException:
      mgr.close()
      raise
    rows = [json.loads(line) for line in kept]
    last_row = next((r for r in reversed(rows) if "train/loss" in r), {})
    last_eval_loss = next(({"eval/loss": r["eval/loss"]} for r in reversed(rows)
                           if "eval/loss" in r), {})
    checkpointing.log_resume(workdir, {
        "restored_step": start_step, "kept_metric_rows": len(kept),
        "skipped_corrupt": [s for s, _ in restored.skipped], "config_changes": changed})
    logging.info("resumed %s from the checkpoint at step %d (%d metric rows kept)", workdir,
                 start_step, len(kept))

  def save(done: int, *, final: bool = False) -> None:
    """Checkpoints the state after ``done`` updates (the loop state of step ``done``)."""
    forced = final and done % ck.every != 0
    metrics = {k: float(last_row[k]) for k in ("train/loss",) if k in last_row}
    metrics.update({k: float(v) for k, v in last_eval_loss.items()})
    mgr.save(done, _payload(state, probe_key, rel_guess),
             metadata={**static_meta, "data_position": _iterator_position(iterator)},
             metrics=metrics, force=forced, reason="end of run" if forced else None)

  writer = MetricWriter(workdir, resume_step=start_step if resuming else None)
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
      batch = full if full is not None else next(iterator)
      extra = {}
      if lanczos is not None and due(p.lanczos_every, step):
        extra["curv/lambda_max"] = lanczos(state.params, batch,
                                           jax.random.fold_in(probe_key, step))
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
        extra["curv/preconditioned_sharpness"] = precond(
            state.params, new_state.opt_state, batch, jax.random.fold_in(probe_key, step))
      metrics.update(extra)
      metrics = jax.device_get(metrics)
      finite = math.isfinite(float(metrics["train/loss"]))
      if step % config.log_every == 0 or extra or not finite or step == config.num_steps - 1:
        writer.write(step, metrics)
      last_row = {k: _to_python(v) for k, v in metrics.items()}
      if not finite:
        diverged = step
        break
      state = new_state
      bar.update(1)
      if step % 10 == 0 or step == config.num_steps - 1:
        bar.set_postfix(_postfix(last_row), refresh=False)
      if saving and step + 1 < config.num_steps and (step + 1) % ck.every == 0:
        save(step + 1)
    if diverged is None:
      last_eval = {k: _to_python(v)
                   for k, v in jax.device_get(eval_step(state.params, eval_batch)).items()}
      writer.write(config.num_steps, last_eval)
      if saving and mgr.latest_step() != config.num_steps:
        last_eval_loss = {"eval/loss": last_eval["eval/loss"]}
        save(config.num_steps, final=True)
  except BaseException:
    if mgr is not None:  # wait for a save in flight, but do not mask the error
      try:
        mgr.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.error("closing the checkpoint manager after an error: %s", e)
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
            "preconditioned": precond, "relative": relative}
  counts = {k: f._cache_size() for k, f in jitted.items() if f is not None}  # pylint: disable=protected-access
  compilations = max(counts.values())
  if compilations > 1:
    logging.warning("jitted functions compiled more than once (expected 1 each): %s; some "
                    "input changed shape, dtype or weak type between steps.", counts)
  if config.plots:
    from experiments import plots  # pylint: disable=g-import-not-at-top
    plots.make_plots(workdir)

  if diverged is not None:
    lr = last_row.get("train/lr", float("nan"))
    raise TrainingDiverged(
        f"training loss became non-finite ({last_row.get('train/loss')}) at step {diverged} "
        f"(learning rate {lr:.4g}, λ_c {last_row.get('curv/critical_sharpness', float('nan')):.4g}"
        f", 2/η {2 / lr if lr else float('inf'):.4g}). Metrics up to and including that step "
        f"are in {writer.path}; plots in {os.path.join(workdir, 'plots')}. Lower "
        f"optimizer.learning_rate or set optimizer.grad_clip.")

  summary = {
      "steps": steps_done,
      "resumed_from_step": start_step if resuming else None,
      "train/loss": last_row.get("train/loss"),
      **last_eval,
      "wall_seconds": wall,
      "steps_per_second": (steps_done - start_step) / wall if wall > 0 else float("inf"),
      "jit_compilations": compilations,
  }
  logging.info("finished %d steps (%d in this process) in %.1f s (%.1f steps/s); final %s",
               steps_done, steps_done - start_step, wall, summary["steps_per_second"], last_eval)
  return summary
