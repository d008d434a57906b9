r"""Knowledge distillation runner: a tiny GPT teacher → a smaller GPT student.

``distill_and_evaluate(config, workdir)`` runs two phases:

1. **Teacher** (``experiments.distill_teacher``): trained by the ordinary trainer into
   ``workdir/teacher``, or loaded from ``config.distill.teacher_dir``; frozen afterwards.
2. **Student**: the training loop of every runner (``experiments.loop.run``) with this
   experiment's own pieces: the objective (``experiments.distill_objective``: the loss terms of
   ``config.distill.method``, fused by ``config.distill.fusion``), the jitted step
   (``experiments.distill_step``: one gradient of the fused total over the student and the
   objective's learned parts, the optimizer of ``experiments.optim``), and the hooks
   (``experiments.distill_run``): the student's evaluation, the adaptive controller
   (``experiments.distill_controller``, ``distill.adaptive=True``), the checkpoint policy
   (``loop.CheckpointPolicy``) and the progress bar.

Checkpoints and resume: the student phase saves Orbax checkpoints into
``<workdir>/checkpoints`` every ``checkpoint.every`` steps and at the end. A checkpoint at step
``s`` holds the state before update ``s``: student and objective params, the optimizer state,
the controller state, and in its metadata the config, the data-iterator position and the
controller's interval sums. Re-running the same command on the same workdir resumes from the
newest checkpoint that verifies, truncates ``metrics.jsonl`` and ``controller_audit.jsonl`` to
the rows before ``s`` and continues; the finished files equal an uninterrupted run's line for
line. A changed config is refused as in the trainer (``checkpoint.allow_config_change``;
``checkpoint.resume=False`` moves the run aside).

Run directory: ``config.json``, ``metrics.jsonl`` (rows ``train/loss`` = the fused objective,
``distill/<term>``, ``distill/weight/<term>``, ``train/lr``, ``train/grad_norm``, the
curvature probe's ``curv/...`` when on; eval rows ``eval/loss`` (student CE),
``eval/perplexity``, ``eval/accuracy``, ``eval/kd``, ``distill/teacher_eval_loss``),
``summary.json``, ``plots/distill.png``, ``checkpoints/``, ``resume_log.jsonl``,
``controller_audit.jsonl`` (adaptive), ``teacher/`` (phase 1).

``python -m experiments.run --config=configs/distill.py:smoke --compare=all --workdir=DIR``
runs several presets with one teacher (:func:`compare`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from experiments import checkpointing
from experiments import config_lib
from experiments import data as data_lib
from experiments import distill_controller
from experiments import distill_objective
from experiments import distill_run
from experiments import distill_step
from experiments import distill_teacher
from experiments import loop
from experiments import models
from experiments import optim
from experiments import records


class StudentPhase:
  """The student phase's pieces, built from the config and the frozen teacher.

  ``step`` (jitted ``(state, batch) -> (state, metrics)`` through :meth:`step_fn`),
  ``state`` (``distill_step.StudentState``), ``evaluation`` and ``controller`` (hooks; the
  controller None unless ``distill.adaptive``), ``iterator`` (the training batches).
  """

  def __init__(self, config, workdir: str, dataset, teacher):
    t_graph, self.t_params, t_cfg, self.teacher_info = teacher
    self.config, self.workdir, self.dataset = config, workdir, dataset
    d = config.distill
    terms = config_lib.METHOD_TERMS[d.method]
    s_graph, s_params = models.split_params(models.build_model(config.model, dataset,
                                                               config.seed))
    obj = distill_objective.Objective(config, config.model, t_cfg,
                                      nnx.Rngs(params=config.seed + 2))
    o_graph, o_params, o_rest = nnx.split(obj, nnx.Param, ...)
    params = {"student": s_params, "objective": nnx.to_pure_dict(o_params)}
    self.student_params = models.count_params(s_params)
    logging.info("student %d params, teacher %d params, method %s, fusion %s, adaptive %s",
                 self.student_params, self.teacher_info["teacher_params"], d.method, d.fusion,
                 d.adaptive)
    schedule = optim.make_schedule(config)
    tx = distill_step.make_optimizer(config, schedule, params)
    types = None
    if d.fusion == "gated":
      types = distill_objective.token_type_table(distill_objective.vocab_chars(config))
      if len(types) != dataset.num_classes:
        raise ValueError(f"the vocabulary has {len(types)} characters, the dataset "
                         f"{dataset.num_classes} ids.")
    objective = distill_objective.make_objective(config, s_graph, t_graph, o_graph, o_rest,
                                                 config.model, t_cfg, types)
    self.step = jax.jit(distill_step.make_step(
        objective, tx, schedule, directional=config.probe.directional,
        layer_labels=distill_controller.layer_labels if d.adaptive else None))
    self.state = loop.canonical(distill_step.StudentState(jnp.int32(0), params,
                                                          tx.init(params)))
    self.t_params = jax.device_put(self.t_params)
    self.iterator = dataset.iterator(config.batch_size, config.seed)
    eval_batch = jax.device_put(dataset.eval_batch(config.eval_examples))
    t_logits = jax.jit(distill_objective.make_teacher_logits(t_graph))(
        self.t_params, eval_batch["tokens"])
    self.teacher_eval_loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        t_logits, eval_batch["tokens"][:, 1:])))
    self.evaluation = distill_run.StudentEval(
        jax.jit(distill_objective.make_eval(s_graph, d.temperature)), eval_batch, t_logits,
        self.teacher_eval_loss, config.eval_every)
    self.controller = None
    if d.adaptive:
      groups = sorted(set(jax.tree.leaves(distill_controller.layer_labels(params))))
      self.controller = distill_run.Controller(config, terms, groups, self.evaluation,
                                               workdir)

  def step_fn(self, state, batch):
    decisions = None if self.controller is None else self.controller.decisions
    return self.step(state, self.t_params, batch, decisions)

  def next_batch(self):
    return next(self.iterator)

  def payload(self, state) -> dict[str, Any]:
    """What a checkpoint holds (and a resume restores)."""
    out = {"params": state.params, "opt_state": state.opt_state}
    if self.controller is not None:
      out["controller"] = self.controller.state
    return out

  def metadata(self, step: int) -> dict[str, Any]:
    """Checkpoint metadata after ``step``: the data position and the controller's interval.

    The current values are those after ``step``: the checkpoint policy keeps the loop from
    drawing the next batch (or running the controller) before it saves (``sync``).
    """
    del step
    interval = {"count": 0, "sums": {}} if self.controller is None else (
        self.controller.interval)
    return {"config": checkpointing.config_json(self.config), "data": self.dataset.info,
            "versions": checkpointing.versions(),
            "data_position": dict(self.iterator.get_state()._asdict()), "interval": interval}

  def restore(self, resumed: distill_run.Resumed) -> None:
    # Host copies made device arrays again, as uncommitted as a fresh state's: the jitted
    # step then finds the program it compiled for a fresh run (committed restored leaves
    # beside the uncommitted step counter would compile a second one).
    a = jax.device_get(resumed.arrays)
    self.state = loop.canonical(distill_step.StudentState(
        jnp.int32(resumed.step), a["params"], a["opt_state"]))
    self.iterator.set_state(resumed.metadata["data_position"])
    if self.controller is not None:
      self.controller.restore(a["controller"], resumed.metadata["interval"])

  def train(self, resuming: bool) -> tuple[loop.LoopEnd, dict[str, Any], int]:
    """Resume if asked, run the loop, the final evaluation and save.

    Returns ``(end, final_eval, start_step)``.
    """
    config, ck, workdir = self.config, self.config.checkpoint, self.workdir
    mgr = checkpointing.make_manager(config, workdir) if (ck.enabled or resuming) else None
    rows: list[dict] = []
    start_step = 0
    if resuming:
      resumed = distill_run.resume(config, workdir, mgr, self.payload(self.state),
                                   self.dataset.info)
      self.restore(resumed)
      start_step, rows = resumed.step, resumed.rows
    elif os.path.exists(os.path.join(workdir, distill_controller.AUDIT_LOG)):
      os.remove(os.path.join(workdir, distill_controller.AUDIT_LOG))  # a fresh audit log
    policy = loop.CheckpointPolicy(
        mgr, every=ck.every, num_steps=config.num_steps, payload=self.payload,
        metadata=self.metadata, enabled=ck.enabled,
        last_eval=next(({"eval/loss": r["eval/loss"]} for r in reversed(rows)
                        if "eval/loss" in r), {}))
    writer = records.MetricWriter(workdir, tensorboard=False,
                                  resume_step=start_step if resuming else None)
    bar = loop.ProgressBar(total=config.num_steps, initial=start_step,
                           enabled=config.progress_bar,
                           desc=os.path.basename(os.path.normpath(workdir)))
    hooks = [h for h in (self.controller, self.evaluation, policy, bar) if h is not None]
    end, final = loop.run_to_end(
        self.state, range(start_step, config.num_steps), final_eval=self.evaluation.final,
        policy=policy, mgr=mgr, closers=(bar, writer), step_fn=self.step_fn,
        next_batch=self.next_batch, hooks=hooks, writer=writer, log_every=config.log_every)
    if end.stopped_at is not None:
      raise FloatingPointError(f"distillation objective non-finite at step {end.stopped_at}; "
                               f"see {writer.path}.")
    return end, final, start_step


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or load) the teacher, distil the student and write the run directory ``workdir``.

  If ``workdir/checkpoints`` holds a checkpoint of the student phase, the run resumes from
  the newest one that verifies (see the module docstring; ``checkpoint.resume=False`` moves
  the old run aside instead).

  Returns a summary: method, fusion, adaptive, student/teacher eval loss and perplexity,
  parameter counts, wall seconds of both phases, ``resumed_from_step`` (None for a fresh run),
  ``jit_compilations`` of the student step (1 = nothing recompiled) and, adaptive, the final
  controller stage and the number of audit records.
  Raises ``ValueError`` on a bad config, ``FloatingPointError`` if the objective diverges,
  ``experiments.checkpointing.ResumeRefused`` if the workdir holds another run.
  """
  if "distill" not in config:
    raise ValueError("config has no `distill` block; use experiments.trainer instead.")
  config = config_lib.validate_config(config)
  start = time.perf_counter()
  resuming = checkpointing.prepare_workdir(config, workdir)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  records.write_config(config, workdir)
  dataset = data_lib.load_dataset(config.data, config.seed)
  teacher = distill_teacher.get_teacher(config, workdir, dataset)
  teacher_seconds = time.perf_counter() - start
  phase = StudentPhase(config, workdir, dataset, teacher)
  _, final, start_step = phase.train(resuming)
  d = config.distill
  summary = {
      "method": d.method, "fusion": d.fusion, "adaptive": d.adaptive,
      "eval/loss": final["eval/loss"], "eval/perplexity": final["eval/perplexity"],
      "eval/accuracy": final["eval/accuracy"],
      "teacher/eval_loss": phase.teacher_eval_loss,
      "teacher/eval_perplexity": math.exp(phase.teacher_eval_loss),
      "student_params": phase.student_params, **phase.teacher_info,
      "teacher_seconds": teacher_seconds, "wall_seconds": time.perf_counter() - start,
      "resumed_from_step": start_step if resuming else None,
      "jit_compilations": phase.step._cache_size(),  # pylint: disable=protected-access
  }
  if phase.controller is not None:
    summary["controller/stage"] = int(phase.controller.state.stage)
    summary["controller/audit_records"] = len(records.read_audit(
        workdir, name=distill_controller.AUDIT_LOG))
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  if config.plots:
    from experiments import plots  # pylint: disable=g-import-not-at-top
    plots.make_plots(workdir)
  logging.info("distillation summary: %s", summary)
  return summary


def compare(configs: dict[str, ml_collections.ConfigDict], workdir: str) -> dict[str, dict]:
  """Runs ``configs`` (preset name → config) into ``workdir/<name>``, training the teacher
  once (the first run's, shared through ``distill.teacher_dir``); writes
  ``workdir/comparison.json`` and ``comparison.png`` and returns ``{name: summary}``.
  Re-running it on the same ``workdir`` resumes every run."""
  results, teacher_dir = {}, ""
  for name, cfg in configs.items():
    if teacher_dir:
      cfg = ml_collections.ConfigDict(cfg.to_dict())
      cfg.distill.teacher_dir = teacher_dir
    results[name] = distill_and_evaluate(cfg, os.path.join(workdir, name))
    teacher_dir = results[name]["teacher_dir"]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  from experiments import plots  # pylint: disable=g-import-not-at-top
  plots.plot_comparison(results, os.path.join(workdir, "comparison.png"))
  return results


def format_table(results: dict[str, dict]) -> str:
  """The comparison as a text table (student seconds exclude the teacher phase)."""
  first = next(iter(results.values()))
  lines = [f"{'preset':<18} {'eval loss':>10} {'perplexity':>11} {'accuracy':>9} "
           f"{'seconds':>8}"]
  for n, r in results.items():
    lines.append(f"{n:<18} {r['eval/loss']:>10.4f} {r['eval/perplexity']:>11.3f} "
                 f"{r['eval/accuracy']:>9.4f} {r['wall_seconds'] - r['teacher_seconds']:>8.1f}")
  lines.append(f"{'teacher':<18} {first['teacher/eval_loss']:>10.4f} "
               f"{first['teacher/eval_perplexity']:>11.3f}")
  return "\n".join(lines)
