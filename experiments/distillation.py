r"""Knowledge distillation runner: a tiny GPT teacher → a smaller GPT student (issue 4 §4).

``distill_and_evaluate(config, workdir)`` runs two phases:

1. **Teacher.** If ``config.distill.teacher_dir`` is empty, the teacher (architecture and
   length in ``config.distill.teacher``) is trained with the ordinary runner
   (``experiments.trainer.train_and_evaluate``) into ``workdir/teacher`` — a normal run
   directory with its own config.json, metrics.jsonl, plots and Orbax checkpoints. Otherwise the
   teacher is loaded from ``teacher_dir``, any run directory written by the runner on the same
   data/vocabulary with ``model.name='gpt'`` (for example ``<an earlier distill run>/teacher``):
   its architecture is read from ``teacher_dir/config.json`` and its parameters from the newest
   checkpoint that verifies in ``teacher_dir/checkpoints`` (target-less Orbax restore of
   ``state["train"]["params"]``, mapped onto the freshly built teacher's parameter tree). The
   teacher is frozen afterwards.
2. **Student.** The student (``config.model``) trains with a pure jitted step: forward passes of
   student and teacher (intermediates collected with ``distill.collect_intermediates`` only when
   a feature/temporal term needs them), the loss terms of ``config.distill.method``, fused
   (fixed weights or Kendall uncertainty weighting), and the optimizer of
   ``experiments.optim.make_optimizer`` (AdamW by the config; the λ_c probe sits in the chain
   before the learning-rate scale, as in the trainer, when ``probe.critical`` is True).
   The learned parts of the objective (feature projections / MMD bandwidths, fusion
   log-variances) are parameters in the same optimizer state as the student.

Loss terms (all float32):

* ``ce``: next-token cross-entropy of the student.
* ``kd``: ``distill._divergences.soft_target_kl`` — :math:`T^2\,\mathrm{KL}(P_T\|S_T)`;
  with fixed weights ``alpha·ce + (1 − alpha)·kd`` this is exactly Hinton's mix
  (``distill._divergences.hinton_loss``).
* ``features``: ``distill.FeatureDistiller`` over ``distill.feature_slices`` (uniform layer map,
  geometric depth weights, learned width projections).
* ``smoothness``: ``distill.smoothness_penalty`` on the student's last block output (linear growth).
* ``attention``: ``distill.attention_evolution_loss`` between the last student layer's attention
  and its mapped teacher layer's (heads averaged, window 4, nuclear norm).

Methods: ``ce`` (ce), ``hinton`` (ce + kd), ``features`` (+ features), ``temporal``
(+ smoothness + attention), ``fused`` (all five terms with ``distill.UncertaintyFusion``).

Run directory: ``config.json``, ``metrics.jsonl`` (rows ``train/loss`` = the fused objective,
``distill/<term>``, ``distill/weight/<term>``, ``train/lr``, ``train/grad_norm``, the curvature
probe's ``curv/...`` when on; eval rows ``eval/loss`` (student CE), ``eval/perplexity``,
``distill/teacher_eval_loss``), ``summary.json``, ``plots/distill.png``, ``teacher/`` (phase 1).

``python -m experiments.distillation compare --workdir=DIR [--presets=ce,hinton,...]
[--extra=smoke]`` runs every method (the teacher trained once, in ``DIR/<first>/teacher``, then
shared via ``teacher_dir``), prints the table of student eval loss / perplexity and writes
``DIR/comparison.json`` and ``DIR/comparison.png``.
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
import numpy as np
import optax
from flax import nnx

import curvature
import distill
from distill import _divergences
from experiments import config_lib
from experiments import data as data_lib
from experiments import models
from experiments import optim

METHODS = ("ce", "hinton", "features", "temporal", "fused")
FUSIONS = ("fixed", "uncertainty")
TERMS = ("ce", "kd", "features", "smoothness", "attention")
METHOD_TERMS = {
    "ce": ("ce",),
    "hinton": ("ce", "kd"),
    "features": ("ce", "kd", "features"),
    "temporal": ("ce", "kd", "features", "smoothness", "attention"),
    "fused": ("ce", "kd", "features", "smoothness", "attention"),
}
DISTILL_FIELDS = {  # field -> (type, check or None); the defaults live in configs/distill.py
    "method": (str, METHODS), "fusion": (str, FUSIONS), "teacher_dir": (str, None),
    "temperature": (float, "positive"), "alpha": (float, "unit"),
    "feature_weight": (float, "nonneg"), "smoothness_weight": (float, "nonneg"),
    "attention_weight": (float, "nonneg"), "feature_slices": (str, None),
    "attention_window": (int, "positive"),
    "teacher.depth": (int, "positive"), "teacher.width": (int, "positive"),
    "teacher.num_heads": (int, "positive"), "teacher.mlp_ratio": (int, "positive"),
    "teacher.num_steps": (int, "positive"), "teacher.learning_rate": (float, "positive"),
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def parse_slices(spec: str) -> dict[str, str]:
  """``"attn_out=cosine,block_out=l1"`` → ``{"attn_out": "cosine", "block_out": "l1"}``."""
  out = {}
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    name, _, kind = part.partition("=")
    if name not in distill.SLICES or kind not in distill.LOSS_KINDS:
      raise ValueError(f"config.distill.feature_slices entry {part!r} must be <slice>=<loss> "
                       f"with slice in {list(distill.SLICES)} and loss in "
                       f"{list(distill.LOSS_KINDS)}.")
    out[name] = kind
  if not out:
    raise ValueError("config.distill.feature_slices names no slice.")
  return out


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The resolved config: everything but ``distill`` by ``config_lib.validate_config``, the
  ``distill`` block here (known keys, types, enumerations, ranges). Raises ``ValueError``."""
  raw = config.to_dict()
  if "distill" not in raw:
    raise ValueError("config has no `distill` block; use experiments.trainer instead.")
  block = raw.pop("distill")
  base = config_lib.validate_config(ml_collections.ConfigDict(raw))
  flat = _flat(block)
  unknown = sorted(set(flat) - set(DISTILL_FIELDS))
  missing = sorted(set(DISTILL_FIELDS) - set(flat))
  if unknown or missing:
    raise ValueError(f"config.distill: unknown keys {unknown}, missing keys {missing}; known: "
                     f"{sorted(DISTILL_FIELDS)}")
  for key, (typ, check) in DISTILL_FIELDS.items():
    v = flat[key]
    if typ is str and not isinstance(v, str) or typ is not str and (
        isinstance(v, bool) or not isinstance(v, (int, float))):
      raise ValueError(f"config.distill.{key} must be {typ.__name__}, got {v!r}.")
    if typ is int and v != int(v):
      raise ValueError(f"config.distill.{key} must be an integer, got {v!r}.")
    if isinstance(check, tuple) and v not in check:
      raise ValueError(f"config.distill.{key}={v!r} is not one of {list(check)}.")
    if check == "positive" and not v > 0 or check == "nonneg" and not v >= 0 or (
        check == "unit" and not 0 <= v <= 1):
      raise ValueError(f"config.distill.{key}={v!r} out of range ({check}).")
  if base.model.name != "gpt" or base.data.name not in ("code", "prose", "text"):
    raise ValueError("distillation needs model.name='gpt' and a single text corpus "
                     "(data.name in 'code', 'prose', 'text').")
  if base.batch_size <= 0 or base.grad_accum_steps != 1:
    raise ValueError("distillation needs batch_size > 0 and grad_accum_steps=1.")
  parse_slices(block["feature_slices"])
  with base.unlocked():
    base.distill = ml_collections.ConfigDict(block)
  return base.lock()


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The runner config of the teacher: the base config with the teacher's model and length."""
  raw = config.to_dict()
  d = raw.pop("distill")
  t = d["teacher"]
  raw["num_steps"] = t["num_steps"]
  raw["optimizer"]["learning_rate"] = t["learning_rate"]
  raw["model"].update(depth=t["depth"], width=t["width"], num_heads=t["num_heads"],
                      mlp_ratio=t["mlp_ratio"])
  raw["checkpoint"]["enabled"] = True  # the student phase reads the params from here
  raw["checkpoint"]["resume"] = True
  raw["eval_every"] = 0
  return config_lib.validate_config(ml_collections.ConfigDict(raw))


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------


def load_params(run_dir: str, template: Any) -> Any:
  """The params of the newest verified checkpoint in ``run_dir/checkpoints``, as ``template``.

  The checkpoint is restored without a target (Orbax then gives dicts with string keys); each
  leaf of ``template`` (the freshly built model's params) is looked up by its path.
  """
  import convergence  # pylint: disable=g-import-not-at-top
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  ckdir = checkpointing.checkpoint_dir(run_dir)
  if not checkpointing.has_checkpoints(run_dir):
    raise FileNotFoundError(f"no checkpoints in {ckdir!r} (config.distill.teacher_dir must be "
                            "a run directory written by the runner with checkpoints on).")
  mgr = convergence.TieredCheckpointManager(ckdir, async_save=False)
  try:
    state = mgr.restore_latest_valid().state
  finally:
    mgr.close()
  train = state["train"]
  tree = train["params"] if isinstance(train, dict) else train[1]

  def lookup(path, leaf):
    node = tree
    for entry in path:
      key = getattr(entry, "key", getattr(entry, "idx", None))
      node = node[str(key)] if isinstance(node, dict) and str(key) in node else node[key]
    arr = np.asarray(node)
    if arr.shape != leaf.shape:
      raise ValueError(f"teacher checkpoint leaf {jax.tree_util.keystr(path)} has shape "
                       f"{arr.shape}, the teacher config builds {leaf.shape}.")
    return jnp.asarray(arr, leaf.dtype)
  return jax.tree_util.tree_map_with_path(lookup, template)


def _gpt(model_cfg, dataset, seed):
  return models.build_model(model_cfg, dataset, seed)


def get_teacher(config, workdir: str, dataset) -> tuple[Any, dict, Any, dict]:
  """``(graphdef, params, model_config, info)``: train (or load) and return the teacher."""
  d = config.distill
  if d.teacher_dir:
    run_dir = d.teacher_dir
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
      saved = json.load(f)
    model_cfg = ml_collections.ConfigDict(saved["model"])
    if model_cfg.name != "gpt":
      raise ValueError(f"teacher_dir {run_dir!r} holds a {model_cfg.name!r} model, not a gpt.")
    for k in ("name", "vocab", "context_length", "max_chars", "eval_fraction", "path"):
      if saved["data"].get(k) != config.data[k]:
        raise ValueError(f"teacher_dir {run_dir!r} was trained with data.{k}="
                         f"{saved['data'].get(k)!r}, this run uses {config.data[k]!r}.")
    info = {"teacher_dir": run_dir, "trained_here": False}
  else:
    run_dir = os.path.join(workdir, "teacher")
    tcfg = teacher_config(config)
    from experiments import trainer  # pylint: disable=g-import-not-at-top
    summary = trainer.train_and_evaluate(tcfg, run_dir)
    model_cfg = tcfg.model
    info = {"teacher_dir": run_dir, "trained_here": True,
            "teacher_train_seconds": summary.get("wall_seconds")}
  graphdef, template = models.split_params(_gpt(model_cfg, dataset, config.seed + 1))
  params = load_params(run_dir, template)
  info["teacher_params"] = models.count_params(params)
  return graphdef, params, model_cfg, info


# --------------------------------------------------------------------------------------------
# Student objective and step (pure)
# --------------------------------------------------------------------------------------------


class Objective(nnx.Module):
  """The learned parts of the objective: feature projections/kernels and the fusion."""

  def __init__(self, config, student_cfg, teacher_cfg, rngs: nnx.Rngs):
    d = config.distill
    terms = METHOD_TERMS[d.method]
    distiller = None
    if "features" in terms:
      slices = parse_slices(d.feature_slices)

      def dims(m):
        return {"attn_out": m.width, "norm_out": m.width, "pre_act": m.mlp_ratio * m.width,
                "block_out": m.width}
      distiller = distill.FeatureDistiller(
          dims(student_cfg), dims(teacher_cfg), num_student_layers=student_cfg.depth,
          num_teacher_layers=teacher_cfg.depth, slice_losses=slices, rngs=rngs)
    self.distiller = nnx.data(distiller)
    if d.method == "fused" or d.fusion == "uncertainty":
      fusion = distill.UncertaintyFusion(terms)
    else:
      weights = {"ce": d.alpha if "kd" in terms else 1.0, "kd": 1.0 - d.alpha,
                 "features": d.feature_weight, "smoothness": d.smoothness_weight,
                 "attention": d.attention_weight}
      fusion = distill.FixedFusion({t: weights[t] for t in terms})
    self.fusion = nnx.data(fusion)


def make_objective(config, s_graph, t_graph, o_graph, o_rest, student_cfg, teacher_cfg):
  """``objective(params, teacher_params, batch) -> (total, aux)`` with params
  ``{"student": ..., "objective": ...}``."""
  d = config.distill
  terms = METHOD_TERMS[d.method]
  need_feats = any(t in terms for t in ("features", "smoothness", "attention"))
  slices = tuple(parse_slices(d.feature_slices)) if "features" in terms else ()
  collect = tuple(dict.fromkeys(slices + (("block_out", "qkv") if "attention" in terms else ())))
  t_map = distill.layer_map(student_cfg.depth, teacher_cfg.depth, "uniform")

  def objective(params, teacher_params, batch):
    tokens = batch["tokens"]
    x, y = tokens[:, :-1], tokens[:, 1:]
    student = nnx.merge(s_graph, params["student"])
    if need_feats:
      s_logits, s_feats = distill.collect_intermediates(student, x, slices=collect)
    else:
      s_logits, s_feats = student(x), {}
    values = {"ce": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        s_logits.astype(jnp.float32), y))}
    if len(terms) > 1:
      teacher = nnx.merge(t_graph, jax.lax.stop_gradient(teacher_params))
      if need_feats:
        t_logits, t_feats = distill.collect_intermediates(teacher, x, slices=collect)
      else:
        t_logits, t_feats = teacher(x), {}
      t_logits = jax.lax.stop_gradient(t_logits)
      t_feats = jax.lax.stop_gradient(t_feats)
      values["kd"] = _divergences.soft_target_kl(s_logits, t_logits, temperature=d.temperature)
    obj = nnx.merge(o_graph, params["objective"], o_rest)
    if "features" in terms:
      values["features"], _ = obj.distiller({k: s_feats[k] for k in slices},
                                             {k: t_feats[k] for k in slices})
    if "smoothness" in terms:
      values["smoothness"] = distill.smoothness_penalty(s_feats["block_out"][-1])
    if "attention" in terms:
      s_att = distill.attention_from_qkv(s_feats["qkv"][-1], student_cfg.num_heads)
      t_att = distill.attention_from_qkv(t_feats["qkv"][t_map[-1]], teacher_cfg.num_heads)
      values["attention"] = distill.attention_evolution_loss(
          s_att, t_att, window=min(d.attention_window, x.shape[1]), heads="mean")
    total, weights = obj.fusion(values)
    aux = {f"distill/{k}": v for k, v in values.items()}
    aux.update({f"distill/weight/{k}": v for k, v in weights.items()})
    return total, aux
  return objective


def make_step(objective, tx, schedule, *, directional: bool = False):
  """``step(step, params, opt_state, teacher_params, batch) -> (params, opt_state, metrics)``."""
  def step(t, params, opt_state, teacher_params, batch):
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(
        params, teacher_params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params, value=loss, grad=grads,
        value_fn=lambda p: objective(p, teacher_params, batch)[0])
    params = optax.apply_updates(params, updates)
    metrics = {"train/loss": loss, "train/lr": jnp.asarray(schedule(t), jnp.float32),
               "train/grad_norm": optax.tree.norm(grads),
               "train/update_norm": optax.tree.norm(updates), **aux}
    probes = curvature.probe_metrics(opt_state)
    if not directional:
      probes.pop("curv/directional_sharpness", None)
    metrics.update(probes)
    return params, opt_state, metrics
  return step


def make_eval(s_graph, t_graph):
  def ev(student_params, teacher_params, batch):
    tokens = batch["tokens"]
    x, y = tokens[:, :-1], tokens[:, 1:]

    def ce(graph, p):
      logits = nnx.merge(graph, p)(x).astype(jnp.float32)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    loss = ce(s_graph, student_params)
    return {"eval/loss": loss, "eval/perplexity": jnp.exp(loss),
            "distill/teacher_eval_loss": ce(t_graph, teacher_params)}
  return ev


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


def _py(v):
  v = np.asarray(v)
  return int(v) if np.issubdtype(v.dtype, np.integer) else float(v)


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or load) the teacher, distil the student and write the run directory ``workdir``.

  Returns a summary: method, student/teacher eval loss and perplexity, parameter counts, wall
  seconds of both phases, ``jit_compilations`` of the student step (1 = nothing recompiled).
  Raises ``ValueError`` on a bad config, ``FloatingPointError`` if the objective diverges.
  """
  config = validate(config)
  start = time.perf_counter()
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  dataset = data_lib.load_dataset(config.data, config.seed)
  t_graph, t_params, t_cfg, info = get_teacher(config, workdir, dataset)
  teacher_seconds = time.perf_counter() - start

  student = _gpt(config.model, dataset, config.seed)
  s_graph, s_params = models.split_params(student)
  obj_module = Objective(config, config.model, t_cfg, nnx.Rngs(params=config.seed + 2))
  o_graph, o_params, o_rest = nnx.split(obj_module, nnx.Param, ...)
  params = {"student": s_params, "objective": nnx.to_pure_dict(o_params)}
  logging.info("student %d params, teacher %d params, method %s",
               models.count_params(s_params), info["teacher_params"], config.distill.method)

  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule).tx
  objective = make_objective(config, s_graph, t_graph, o_graph, o_rest, config.model, t_cfg)
  step_fn = jax.jit(make_step(objective, tx, schedule, directional=config.probe.directional))
  eval_fn = jax.jit(make_eval(s_graph, t_graph))
  opt_state = tx.init(params)
  iterator = dataset.iterator(config.batch_size, config.seed)
  eval_batch = jax.device_put(dataset.eval_batch(config.eval_examples))
  t_params = jax.device_put(t_params)

  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  with open(path, "w", encoding="utf-8") as f:
    def write(step, metrics):
      row = {"step": int(step), **{k: _py(v) for k, v in sorted(metrics.items())}}
      f.write(json.dumps(row) + "\n")
      f.flush()
    for t in range(config.num_steps):
      extra = {}
      if config.eval_every and t % config.eval_every == 0:
        extra = eval_fn(params["student"], t_params, eval_batch)
      params, opt_state, metrics = step_fn(jnp.int32(t), params, opt_state, t_params,
                                           next(iterator))
      metrics = jax.device_get({**metrics, **extra})
      if not math.isfinite(float(metrics["train/loss"])):
        write(t, metrics)
        raise FloatingPointError(f"distillation objective non-finite at step {t}; see {path}.")
      if t % config.log_every == 0 or extra or t == config.num_steps - 1:
        write(t, metrics)
    last = {k: _py(v) for k, v in
            jax.device_get(eval_fn(params["student"], t_params, eval_batch)).items()}
    write(config.num_steps, last)
  wall = time.perf_counter() - start
  summary = {
      "method": config.distill.method,
      "eval/loss": last["eval/loss"], "eval/perplexity": last["eval/perplexity"],
      "teacher/eval_loss": last["distill/teacher_eval_loss"],
      "teacher/eval_perplexity": math.exp(last["distill/teacher_eval_loss"]),
      "student_params": models.count_params(s_params), **info,
      "teacher_seconds": teacher_seconds, "wall_seconds": wall,
      "jit_compilations": step_fn._cache_size(),  # pylint: disable=protected-access
  }
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  if config.plots:
    plot_run(workdir)
  logging.info("distillation summary: %s", summary)
  return summary


# --------------------------------------------------------------------------------------------
# Plots and comparison
# --------------------------------------------------------------------------------------------


def plot_run(run_dir: str) -> str:
  """``run_dir/plots/distill.png``: the loss terms over steps and the eval loss vs the teacher."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from experiments import plots  # pylint: disable=g-import-not-at-top
  rows = plots.read_metrics(run_dir)
  cfg = plots.read_config(run_dir)
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  for key in ["train/loss"] + [f"distill/{t}" for t in TERMS]:
    s, v = plots.series(rows, key)
    if len(s):
      a1.plot(s, v, label=key, lw=1)
  a1.set_yscale("log")
  a1.set_xlabel("step")
  a1.set_title("training objective and its terms")
  a1.legend(fontsize=7)
  for key, label in (("eval/loss", "student eval CE"),
                     ("distill/teacher_eval_loss", "teacher eval CE")):
    s, v = plots.series(rows, key)
    if len(s):
      a2.plot(s, v, "o-", label=label, ms=3)
  a2.set_xlabel("step")
  a2.set_title("eval cross-entropy (nats/char)")
  a2.legend(fontsize=7)
  fig.suptitle(f"distillation: method={cfg.get('distill', {}).get('method')}")
  fig.tight_layout()
  out = os.path.join(run_dir, "plots", "distill.png")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def plot_comparison(results: dict[str, dict], path: str) -> None:
  """Bars of student eval loss and perplexity per method, the teacher as a dashed line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, tkey in ((axes[0], "eval/loss", "teacher/eval_loss"),
                        (axes[1], "eval/perplexity", "teacher/eval_perplexity")):
    vals = [results[n][key] for n in names]
    ax.bar(names, vals, color="tab:blue")
    ax.axhline(results[names[0]][tkey], color="k", ls="--", label="teacher")
    lo = min(vals + [results[names[0]][tkey]])
    ax.set_ylim(lo * 0.95, max(vals) * 1.02)
    ax.set_title(f"student {key}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def compare(workdir: str, presets: list[str], extra: str = "", overrides=None) -> dict:
  """Run ``configs/distill.py:<preset>[,extra]`` for every preset; teacher trained once."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "distill_config", os.path.join(os.path.dirname(__file__), "..", "configs", "distill.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  results, teacher_dir = {}, ""
  for name in presets:
    cfg = mod.get_config(",".join(p for p in (name, extra) if p))
    for key, value in (overrides or {}).items():
      node = cfg
      *head, leaf = key.split(".")
      for h in head:
        node = node[h]
      node[leaf] = value
    if teacher_dir:
      cfg.distill.teacher_dir = teacher_dir
    results[name] = distill_and_evaluate(cfg, os.path.join(workdir, name))
    teacher_dir = results[name]["teacher_dir"]
  with open(os.path.join(workdir, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  plot_comparison(results, os.path.join(workdir, "comparison.png"))
  return results


def format_table(results: dict[str, dict]) -> str:
  first = next(iter(results.values()))
  lines = [f"{'method':<10} {'eval loss':>10} {'perplexity':>11} {'seconds':>8}"]
  for n, r in results.items():
    lines.append(f"{n:<10} {r['eval/loss']:>10.4f} {r['eval/perplexity']:>11.3f} "
                 f"{r['wall_seconds'] - r['teacher_seconds']:>8.1f}")
  lines.append(f"{'teacher':<10} {first['teacher/eval_loss']:>10.4f} "
               f"{first['teacher/eval_perplexity']:>11.3f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Compare distillation methods.")
  parser.add_argument("mode", choices=["compare"])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--presets", default=",".join(METHODS))
  parser.add_argument("--extra", default="smoke", help="preset added to each, e.g. 'smoke'")
  args = parser.parse_args(argv)
  results = compare(args.workdir, [p for p in args.presets.split(",") if p], args.extra)
  print(format_table(results))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
