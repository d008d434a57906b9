r"""Knowledge distillation runner: a tiny GPT teacher → a smaller GPT student (issue 4 §4).

``distill_and_evaluate(config, workdir)`` runs two phases:

1. **Teacher.** If ``config.distill.teacher_dir`` is empty, the teacher (architecture and
   length in ``config.distill.teacher``) is trained with the ordinary runner
   (``experiments.trainer.train_and_evaluate``) into ``workdir/teacher`` — a normal run
   directory with its own config.json, metrics.jsonl, plots and Orbax checkpoints (so an
   interrupted teacher resumes like any run). Otherwise the teacher is loaded from
   ``teacher_dir``, any run directory written by the runner on the same data/vocabulary with
   ``model.name='gpt'`` (for example ``<an earlier distill run>/teacher``): its architecture is
   read from ``teacher_dir/config.json`` and its parameters from the newest checkpoint that
   verifies in ``teacher_dir/checkpoints`` (target-less Orbax restore of
   ``state["train"]["params"]``, mapped onto the freshly built teacher's parameter tree). The
   teacher is frozen afterwards.
2. **Student.** The student (``config.model``) trains with a pure jitted step: forward passes of
   student and teacher (intermediates collected with ``distill.collect_intermediates`` only when
   a feature/temporal term needs them), the loss terms of ``config.distill.method``, fused by
   ``config.distill.fusion``, and the optimizer of ``experiments.optim.make_optimizer`` (AdamW
   by the config; the λ_c probe sits in the chain before the learning-rate scale, as in the
   trainer, when ``probe.critical`` is True). The learned parts of the objective (feature
   projections / MMD bandwidths, the fusion's log-variances or gate network) are parameters in
   the same optimizer state as the student: one gradient of the fused total trains all of them.

Loss terms :math:`L_i` (all float32; ``ce`` and ``kd`` per sequence, the others per step):

* ``ce``: next-token cross-entropy of the student.
* ``kd``: ``distill._divergences.soft_target_kl`` — :math:`T^2\,\mathrm{KL}(P_T\|S_T)`;
  with fixed weights ``alpha·ce + (1 − alpha)·kd`` this is exactly Hinton's mix
  (``distill._divergences.hinton_loss``).
* ``features``: ``distill.FeatureDistiller`` over ``distill.feature_slices`` (uniform layer map,
  geometric depth weights, learned width projections).
* ``smoothness``: ``distill.smoothness_penalty`` on the student's last block output (linear growth).
* ``attention``: ``distill.attention_evolution_loss`` between the last student layer's attention
  and its mapped teacher layer's (heads averaged, window 4, nuclear norm).

Fusions (``distill.fusion``):

* ``fixed``: :math:`\sum_i w_i L_i` with the weights of the config (``distill.FixedFusion``).
* ``uncertainty``: Kendall et al.'s :math:`\sum_i e^{-s_i}L_i + s_i`
  (``distill.UncertaintyFusion``).
* ``gated``: ``distill.GatedFusion`` — a two-layer MLP maps per-sequence runtime features
  :math:`x_b` to softmax weights :math:`g(x_b)` over the terms,
  :math:`L = \frac1B\sum_b \sum_i g_i(x_b)\,L_i(b)`, floor ``gate.min_weight``, entropy bonus
  ``gate.entropy_weight``. The features (``distill.runtime_features``, see
  :func:`gate_feature_names`): the student's log-perplexity and normalised entropy (context
  entropy), the valid fraction, the teacher's entropy and :math:`\mathrm{KL}(p_t\|p_s)`, and the
  share of each target-character type of :data:`TOKEN_TYPES` (identifier, digit, whitespace,
  symbol: the "token type" of a character-level code model). ``distill/weight/<term>`` logs the
  batch mean of :math:`g_i`.

Methods: ``ce`` (ce), ``hinton`` (ce + kd), ``features`` (+ features), ``temporal``
(+ smoothness + attention; fixed weights), ``fused`` (the five terms of ``temporal`` with a
learned fusion: ``gated`` by the preset, ``uncertainty`` selectable; ``fixed`` is refused since
it would be ``temporal``).

**Adaptive controller** (``distill.adaptive=True``; the ``adaptive`` preset modifier): the
controller of ``distill._strategy`` (``distill.adaptive_controller``) runs on the host every
``controller.every`` steps, before that step, on metrics of the fixed eval batch and of the
last interval, and its decisions reach the jitted step as traced arguments, so nothing
recompiles:

* **Loss re-weighting.** The controller's loss weights :math:`c_i` (start 1) multiply the terms
  before the fusion, :math:`L_i \to c_i\,\kappa^{s[i\ne ce]}\,L_i` with stage :math:`s` and
  ``controller.stage_decay`` :math:`\kappa`. Rule ``generalization_gap``: when
  ``eval/loss − mean train CE of the interval`` > ``controller.gap_threshold``, multiply
  :math:`c_{kd}` by ``controller.gap_factor`` (soft targets regularise; Hinton et al. 2015),
  clipped to ``[1/max_scale, max_scale]``.
* **Clip mode.** ``optax.clip_by_global_norm`` is replaced by ``distill.clip_by_mode`` (global
  mode = the same maths); per-layer clipping when the largest layer-group gradient norm exceeds
  ``controller.clip_spread`` × their mean (``distill.ClipRule`` on ``clip/spread``).
* **Per-layer learning rates.** ``scale_by_learning_rate`` is replaced by
  ``distill.per_layer_learning_rates`` over the groups ``embed``, ``block<i>``, ``head``,
  ``objective`` (each on the config's schedule); a group whose mean relative update
  ‖Δθ_g‖/‖θ_g‖ stays below ``controller.stall_ratio`` for ``controller.stall_patience``
  evaluations restarts on a cosine decay from 0.3·η over a quarter of the run
  (``distill.StallRule``).
* **Stage transitions** when the three core metrics ``eval/loss``, ``eval/kd``,
  ``eval/accuracy`` (deterministic: the fixed eval batch) have stayed within
  ``controller.rtol`` (0.3%) of their mean for ``controller.window`` (10) evaluations; each
  stage multiplies the non-CE terms by ``stage_decay`` (the student leans on the labels once
  distillation has plateaued), up to ``controller.num_stages``.
* Not used: accumulation / micro-batching (``distill.accumulate_gradients``): with a fixed
  ``num_steps`` budget, k > 1 would cut the number of student updates by k and stretch the
  schedule, confounding the comparison with the other methods; the models fit in memory.

The controller's state (``distill.ControllerState``) is checkpointed with the student, its
decisions go to ``<workdir>/controller_audit.jsonl`` (``distill.AuditLog``: one JSON line per
re-weighting, clip-mode switch, learning-rate restart, stage transition or non-finite metric,
with ``step``), and the rows at controller steps carry ``controller/stage``,
``distill/scale/<term>``, ``clip/mode``, ``lr/<group>``.

Checkpoints and resume: the student phase saves Orbax checkpoints (``experiments.checkpointing``:
``convergence.TieredCheckpointManager``, per-leaf SHA-256) into ``<workdir>/checkpoints`` every
``checkpoint.every`` steps and at the end. A checkpoint at step ``s`` holds the state before
update ``s``: student and objective params (gate, log-variances, projections), the optimizer
state, the controller state, and in its metadata the config, the data-iterator position and the
controller's interval sums. Re-running the same command on the same workdir resumes from the
newest checkpoint that verifies, truncates ``metrics.jsonl`` and ``controller_audit.jsonl`` to
the rows before ``s`` and continues; the finished files equal an uninterrupted run's line for
line (tests/experiments/test_experiment_distill.py). A changed config is refused as in the
trainer (``checkpoint.allow_config_change``, ``checkpoint.resume=False`` moves the run aside).

Run directory: ``config.json``, ``metrics.jsonl`` (rows ``train/loss`` = the fused objective,
``distill/<term>``, ``distill/weight/<term>``, ``train/lr``, ``train/grad_norm``, the curvature
probe's ``curv/...`` when on; eval rows ``eval/loss`` (student CE), ``eval/perplexity``,
``eval/accuracy``, ``eval/kd`` (soft-target KL to the teacher on the eval batch),
``distill/teacher_eval_loss``), ``summary.json``, ``plots/distill.png``, ``checkpoints/``,
``resume_log.jsonl`` (one line per resume), ``controller_audit.jsonl`` (adaptive), ``teacher/``
(phase 1).

``python -m experiments.distillation compare --workdir=DIR [--presets=ce,hinton,...]
[--extra=smoke]`` runs every preset (``a+b`` combines presets, e.g. ``temporal+adaptive``; the
teacher is trained once, in ``DIR/<first>/teacher``, then shared via ``teacher_dir``), prints
the table of student eval loss / perplexity and writes ``DIR/comparison.json`` and
``DIR/comparison.png``. Re-running it on the same DIR resumes every run.
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
from experiments import checkpointing
from experiments import config_lib
from experiments import data as data_lib
from experiments import models
from experiments import optim

METHODS = ("ce", "hinton", "features", "temporal", "fused")
FUSIONS = ("fixed", "uncertainty", "gated")
TERMS = ("ce", "kd", "features", "smoothness", "attention")
METHOD_TERMS = {
    "ce": ("ce",),
    "hinton": ("ce", "kd"),
    "features": ("ce", "kd", "features"),
    "temporal": ("ce", "kd", "features", "smoothness", "attention"),
    "fused": ("ce", "kd", "features", "smoothness", "attention"),
}
TOKEN_TYPES = ("identifier", "digit", "whitespace", "symbol")  # gate feature: target char type
CORE_METRICS = ("eval/loss", "eval/kd", "eval/accuracy")  # the controller's stage metrics
AUDIT_LOG = "controller_audit.jsonl"
DISTILL_FIELDS = {  # field -> (type, check or None); the defaults live in configs/distill.py
    "method": (str, METHODS), "fusion": (str, FUSIONS), "teacher_dir": (str, None),
    "temperature": (float, "positive"), "alpha": (float, "unit"),
    "feature_weight": (float, "nonneg"), "smoothness_weight": (float, "nonneg"),
    "attention_weight": (float, "nonneg"), "feature_slices": (str, None),
    "attention_window": (int, "positive"),
    "gate.hidden": (int, "positive"), "gate.min_weight": (float, "nonneg"),
    "gate.temperature": (float, "positive"), "gate.entropy_weight": (float, "nonneg"),
    "adaptive": (bool, None),
    "controller.every": (int, "positive"), "controller.window": (int, "positive"),
    "controller.rtol": (float, "nonneg"), "controller.num_stages": (int, "positive"),
    "controller.stage_decay": (float, "unit"), "controller.gap_threshold": (float, None),
    "controller.gap_factor": (float, "positive"), "controller.max_scale": (float, "positive"),
    "controller.clip_spread": (float, "positive"), "controller.stall_ratio": (float, "nonneg"),
    "controller.stall_patience": (int, "positive"),
    "teacher.depth": (int, "positive"), "teacher.width": (int, "positive"),
    "teacher.num_heads": (int, "positive"), "teacher.mlp_ratio": (int, "positive"),
    "teacher.num_steps": (int, "positive"), "teacher.learning_rate": (float, "positive"),
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


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


def _check_field(key: str, v: Any, typ: type, check: Any) -> None:
  if typ is bool:
    if not isinstance(v, bool):
      raise ValueError(f"config.distill.{key} must be True or False, got {v!r}.")
    return
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


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The resolved config: everything but ``distill`` by ``config_lib.validate_config``, the
  ``distill`` block here (known keys, types, enumerations, ranges). Raises ``ValueError``."""
  raw = config.to_dict()
  if "distill" not in raw:
    raise ValueError("config has no `distill` block; use experiments.trainer instead.")
  block = raw.pop("distill")
  base = config_lib.validate_config(ml_collections.ConfigDict(raw))
  flat = checkpointing.flat_keys(block)
  unknown = sorted(set(flat) - set(DISTILL_FIELDS))
  missing = sorted(set(DISTILL_FIELDS) - set(flat))
  if unknown or missing:
    raise ValueError(f"config.distill: unknown keys {unknown}, missing keys {missing}; known: "
                     f"{sorted(DISTILL_FIELDS)}")
  for key, (typ, check) in DISTILL_FIELDS.items():
    _check_field(key, flat[key], typ, check)
  if base.model.name != "gpt" or base.data.name not in ("code", "prose", "text"):
    raise ValueError("distillation needs model.name='gpt' and a single text corpus "
                     "(data.name in 'code', 'prose', 'text').")
  if base.batch_size <= 0 or base.grad_accum_steps != 1:
    raise ValueError("distillation needs batch_size > 0 and grad_accum_steps=1.")
  if block["method"] == "fused" and block["fusion"] == "fixed":
    raise ValueError("config.distill.method='fused' needs a learned fusion: set "
                     "config.distill.fusion to 'gated' or 'uncertainty' (method='temporal' is "
                     "the same five terms with fixed weights).")
  k = len(METHOD_TERMS[block["method"]])
  if block["fusion"] == "gated" and not block["gate"]["min_weight"] < 1.0 / k:
    raise ValueError(f"config.distill.gate.min_weight={block['gate']['min_weight']!r} must be "
                     f"below 1/K = {1.0 / k:.4g} for the K={k} terms of method "
                     f"{block['method']!r}.")
  if block["adaptive"] and base.probe.critical:
    raise ValueError("config.distill.adaptive=True replaces the learning-rate scale by "
                     "per-layer rates, which the λ_c probe (probe.critical=True) cannot read; "
                     "turn one of them off.")
  if block["adaptive"] and block["controller"]["max_scale"] < 1.0:
    raise ValueError("config.distill.controller.max_scale must be >= 1 (weights are clipped "
                     f"to [1/max_scale, max_scale]), got {block['controller']['max_scale']!r}.")
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


def token_type_table(chars) -> np.ndarray:
  """Per vocabulary id, the index into :data:`TOKEN_TYPES` of its character: letters and
  ``_`` → identifier, digits → digit, whitespace → whitespace, anything else (the unknown
  character included) → symbol. int32 [V]."""
  def kind(c):
    if c.isalpha() or c == "_":
      return 0
    if c.isdigit():
      return 1
    if c.isspace():
      return 2
    return 3
  return np.asarray([kind(c) for c in chars], np.int32)


def vocab_chars(config) -> list[str]:
  """The characters of the run's vocabulary, by id (as ``experiments.data.make_vocab``)."""
  if config.data.vocab == "ascii":
    return data_lib.CharVocab.ascii().chars
  text = data_lib.corpus_text(config.data.name, config.data)
  return data_lib.CharVocab.from_texts([text]).chars


def gate_feature_names(terms) -> tuple[str, ...]:
  """The gate's input features for ``terms``, in order (``distill.runtime_features``)."""
  names = distill.runtime_feature_names(teacher=len(terms) > 1,
                                        num_token_types=len(TOKEN_TYPES))
  rename = {f"token_type_{i}": f"token_type_{t}" for i, t in enumerate(TOKEN_TYPES)}
  return tuple(rename.get(n, n) for n in names)


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
    if d.fusion == "gated":
      g = d.gate
      fusion = distill.GatedFusion(
          terms, len(gate_feature_names(terms)), hidden=g.hidden, min_weight=g.min_weight,
          temperature=g.temperature, entropy_weight=g.entropy_weight, rngs=rngs)
    elif d.fusion == "uncertainty":
      fusion = distill.UncertaintyFusion(terms)
    else:
      weights = {"ce": d.alpha if "kd" in terms else 1.0, "kd": 1.0 - d.alpha,
                 "features": d.feature_weight, "smoothness": d.smoothness_weight,
                 "attention": d.attention_weight}
      fusion = distill.FixedFusion({t: weights[t] for t in terms})
    self.fusion = nnx.data(fusion)


def make_objective(config, s_graph, t_graph, o_graph, o_rest, student_cfg, teacher_cfg,
                   token_types: np.ndarray | None = None):
  r"""``objective(params, teacher_params, batch, loss_scales=None) -> (total, aux)`` with params
  ``{"student": ..., "objective": ...}``.

  ``loss_scales`` (``{term: c_i}``, the adaptive controller's) multiply the terms before the
  fusion: ``fusion({i: c_i L_i}, features)``. ``token_types`` (int [V], see
  :func:`token_type_table`) is needed by the gated fusion.
  """
  d = config.distill
  terms = METHOD_TERMS[d.method]
  need_feats = any(t in terms for t in ("features", "smoothness", "attention"))
  slices = tuple(parse_slices(d.feature_slices)) if "features" in terms else ()
  collect = tuple(dict.fromkeys(slices + (("block_out", "qkv") if "attention" in terms else ())))
  t_map = distill.layer_map(student_cfg.depth, teacher_cfg.depth, "uniform")
  gated = d.fusion == "gated"
  if gated and token_types is None:
    raise ValueError("fusion='gated' needs `token_types` (token_type_table of the vocabulary).")
  types = None if token_types is None else jnp.asarray(token_types, jnp.int32)

  def objective(params, teacher_params, batch, loss_scales=None):
    tokens = batch["tokens"]
    x, y = tokens[:, :-1], tokens[:, 1:]
    student = nnx.merge(s_graph, params["student"])
    if need_feats:
      s_logits, s_feats = distill.collect_intermediates(student, x, slices=collect)
    else:
      s_logits, s_feats = student(x), {}
    # ce and kd per sequence ([B]): the gate weighs each sequence's terms by its own features;
    # the other fusions take their mean (= the mean over tokens, every sequence has T tokens).
    values = {"ce": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        s_logits.astype(jnp.float32), y), axis=1)}
    t_logits = None
    if len(terms) > 1:
      teacher = nnx.merge(t_graph, jax.lax.stop_gradient(teacher_params))
      if need_feats:
        t_logits, t_feats = distill.collect_intermediates(teacher, x, slices=collect)
      else:
        t_logits, t_feats = teacher(x), {}
      t_logits = jax.lax.stop_gradient(t_logits)
      t_feats = jax.lax.stop_gradient(t_feats)
      values["kd"] = jnp.mean(_divergences.soft_target_kl(
          s_logits, t_logits, temperature=d.temperature, reduction="none"), axis=1)
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
    fused = values if loss_scales is None else {
        k: loss_scales[k] * v for k, v in values.items()}
    features = None
    if gated:
      features = distill.runtime_features(
          s_logits, y, teacher_logits=t_logits, token_types=types[y],
          num_token_types=len(TOKEN_TYPES))
    total, weights = obj.fusion(fused, features)
    aux = {f"distill/{k}": jnp.mean(v) for k, v in values.items()}
    aux.update({f"distill/weight/{k}": jnp.mean(v) for k, v in weights.items()})
    if loss_scales is not None:
      aux.update({f"distill/scale/{k}": jnp.asarray(v, jnp.float32)
                  for k, v in loss_scales.items()})
    return total, aux
  return objective


def make_step(objective, tx, schedule, *, directional: bool = False, layer_labels=None):
  """``step(step, params, opt_state, teacher_params, batch, decisions=None)
  -> (params, opt_state, metrics)``.

  ``decisions`` (adaptive runs): ``{"loss_scales", "clip_mode", "lr_scales", "lr_restarts"}``
  from :func:`controller_decisions`, traced values: a new decision recompiles nothing. The
  last three go to ``tx.update`` as extra args (``distill.clip_by_mode``,
  ``distill.per_layer_learning_rates``); the step then also returns the strategy metrics
  (``clip/*``, ``lr/<group>``) and ``update_ratio/<group>`` (``layer_labels`` groups).
  """
  def step(t, params, opt_state, teacher_params, batch, decisions=None):
    scales = None if decisions is None else decisions["loss_scales"]

    def loss_fn(p):
      return objective(p, teacher_params, batch, scales)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra = {} if decisions is None else {
        k: decisions[k] for k in ("clip_mode", "lr_scales", "lr_restarts")}
    updates, new_opt_state = tx.update(
        grads, opt_state, params, value=loss, grad=grads,
        value_fn=lambda p: loss_fn(p)[0], **extra)
    new_params = optax.apply_updates(params, updates)
    metrics = {"train/loss": loss, "train/lr": jnp.asarray(schedule(t), jnp.float32),
               "train/grad_norm": optax.tree.norm(grads),
               "train/update_norm": optax.tree.norm(updates), **aux}
    if decisions is not None:
      metrics.update(distill.strategy_metrics(new_opt_state))
      metrics.update(distill.update_ratios(updates, params, layer_labels))
    probes = curvature.probe_metrics(new_opt_state)
    if not directional:
      probes.pop("curv/directional_sharpness", None)
    metrics.update(probes)
    return new_params, new_opt_state, metrics
  return step


def make_eval(s_graph, temperature: float):
  """``eval(student_params, batch, teacher_logits) -> {eval/loss, eval/perplexity,
  eval/accuracy, eval/kd}`` (``eval/kd``: the soft-target KL to the teacher's logits)."""
  def ev(student_params, batch, teacher_logits):
    tokens = batch["tokens"]
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits = nnx.merge(s_graph, student_params)(x).astype(jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return {"eval/loss": loss, "eval/perplexity": jnp.exp(loss),
            "eval/accuracy": jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32)),
            "eval/kd": _divergences.soft_target_kl(logits, teacher_logits,
                                                   temperature=temperature)}
  return ev


def make_teacher_logits(t_graph):
  """``(teacher_params, tokens) -> float32 logits`` of the inputs ``tokens[:, :-1]``."""
  def fn(teacher_params, tokens):
    return nnx.merge(t_graph, teacher_params)(tokens[:, :-1]).astype(jnp.float32)
  return fn


# --------------------------------------------------------------------------------------------
# Adaptive controller (distill._strategy)
# --------------------------------------------------------------------------------------------


def layer_group(path) -> str:
  """The layer group of a parameter path in ``{"student": ..., "objective": ...}``:
  ``embed`` (token and position tables), ``block<i>``, ``head`` (final norm and output
  projection), ``objective`` (projections, kernels, fusion)."""
  keys = [str(getattr(e, "key", getattr(e, "idx", e))) for e in path]
  if keys[0] != "student":
    return "objective"
  if keys[1] in ("embed", "pos"):
    return "embed"
  if keys[1] == "blocks":
    return f"block{keys[2]}"
  return "head"


def layer_labels(tree):
  """``tree`` with every leaf replaced by its :func:`layer_group` (optax label convention)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: layer_group(path), tree)


def make_adaptive_optimizer(config, schedule, groups) -> optax.GradientTransformationExtraArgs:
  r"""The config's optimizer with the controller's switches:
  ``chain(clip_by_mode(grad_clip), preconditioner, per_layer_learning_rates)``.

  ``preconditioner`` is ``experiments.optim``'s (Adam/AdamW moments, decoupled weight decay),
  so with the decisions at their initial values (global clipping, scales 1, no restart) this
  is the update of ``optim.make_optimizer``: :math:`-\eta_t\,\mathrm{precond}(\mathrm{clip}(g))`.
  A restarted group follows a cosine decay from :math:`0.3\eta` to the schedule's end value
  over a quarter of the run.
  """
  o = config.optimizer
  raw = config.to_dict()
  raw["optimizer"]["grad_clip"] = 0.0
  preconditioner = optim.make_optimizer(ml_collections.ConfigDict(raw), schedule).preconditioner
  peak = float(o.learning_rate)
  restart = optax.cosine_decay_schedule(
      0.3 * peak, max(config.num_steps // 4, 1),
      alpha=min(1.0, float(config.schedule.end_fraction) / 0.3))
  lrs = distill.per_layer_learning_rates(
      {g: schedule for g in groups}, layer_labels,
      restart_schedules={g: restart for g in groups})
  parts = [distill.clip_by_mode(o.grad_clip, layer_labels=layer_labels)] if o.grad_clip > 0 else []
  return optax.chain(*parts, preconditioner, lrs)


def make_controller(config, terms, groups) -> tuple[distill.Controller, list[str]]:
  """``(controller, rule_names)``: ``distill.adaptive_controller`` with this runner's rules
  (see the module docstring). Loss weights start at 1: they scale the fusion's inputs."""
  c = config.distill.controller
  rules, names = [], []
  if "kd" in terms:
    rules.append(distill.ReweightRule("controller/generalization_gap", c.gap_threshold,
                                      {"kd": c.gap_factor}))
    names.append("generalization_gap")
  clip_rule = (distill.ClipRule(per_layer_above=c.clip_spread)
               if config.optimizer.grad_clip > 0 else None)
  controller = distill.adaptive_controller(
      loss_weights={t: 1.0 for t in terms}, core_metrics=CORE_METRICS, window=c.window,
      rtol=c.rtol, min_stable=len(CORE_METRICS), num_stages=c.num_stages,
      reweight_rules=rules, weight_bounds=(1.0 / c.max_scale, c.max_scale),
      clip_rule=clip_rule, lr_groups=groups,
      stall_rule=distill.StallRule(c.stall_ratio, c.stall_patience))
  return controller, names


def controller_decisions(state, terms, stage_decay: float) -> dict[str, Any]:
  r"""The step's ``decisions`` from a (host) controller state, as NumPy values.

  ``loss_scales[i]`` = :math:`c_i\,\kappa^{s}` for the non-CE terms and :math:`c_{ce}` for CE
  (stage :math:`s`, ``stage_decay`` :math:`\kappa`).
  """
  stage = int(np.asarray(state.stage))
  decay = np.float32(stage_decay) ** stage
  scales = {t: np.float32(np.asarray(state.loss_weights[t], np.float32)
                          * (np.float32(1.0) if t == "ce" else decay)) for t in terms}
  return {"loss_scales": scales,
          "clip_mode": np.asarray(state.clip_mode, np.int32),
          "lr_scales": {g: np.asarray(v, np.float32) for g, v in state.lr_scales.items()},
          "lr_restarts": {g: np.asarray(v, np.int32) for g, v in state.lr_restarts.items()}}


def interval_keys(metrics: dict) -> list[str]:
  """The step metrics the controller averages over its interval."""
  return [k for k in metrics if k in ("distill/ce", "clip/spread")
          or k.startswith("update_ratio/")]


def controller_inputs(controller, ev: dict, interval: dict) -> dict[str, np.float32]:
  """The controller's metrics: the eval metrics ``ev`` at this step and the interval means
  (``interval = {"count": n, "sums": {name: sum}}``); ``controller/generalization_gap`` =
  ``eval/loss`` − mean train CE."""
  n = interval["count"]
  means = {k: v / n for k, v in interval["sums"].items()}
  out = {k: float(ev[k]) for k in CORE_METRICS}
  out["controller/generalization_gap"] = float(ev["eval/loss"]) - means["distill/ce"]
  out.update({k: v for k, v in means.items() if k != "distill/ce"})
  return {k: np.float32(out[k]) for k in controller.metric_names}


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


def _py(v):
  v = np.asarray(v)
  return int(v) if np.issubdtype(v.dtype, np.integer) else float(v)


def _canonical(tree):
  # Strong-typed device arrays (as the trainer's): a restored state must have the avals of a
  # fresh one, or the jitted step would compile a second time.
  return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), tree)


class MetricsFile:
  """``metrics.jsonl``: one JSON row per :meth:`write`; appends when resuming."""

  def __init__(self, path: str, *, append: bool):
    self.path = path
    self._file = open(path, "a" if append else "w", encoding="utf-8")

  def write(self, step: int, metrics: dict) -> None:
    row = {"step": int(step), **{k: _py(v) for k, v in sorted(metrics.items())}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


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
  config = validate(config)
  d = config.distill
  ck = config.checkpoint
  start = time.perf_counter()
  resuming = checkpointing.prepare_workdir(config, workdir)
  config_path = os.path.join(workdir, "config.json")
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  dataset = data_lib.load_dataset(config.data, config.seed)
  t_graph, t_params, t_cfg, info = get_teacher(config, workdir, dataset)
  teacher_seconds = time.perf_counter() - start

  terms = METHOD_TERMS[d.method]
  student = _gpt(config.model, dataset, config.seed)
  s_graph, s_params = models.split_params(student)
  obj_module = Objective(config, config.model, t_cfg, nnx.Rngs(params=config.seed + 2))
  o_graph, o_params, o_rest = nnx.split(obj_module, nnx.Param, ...)
  params = {"student": s_params, "objective": nnx.to_pure_dict(o_params)}
  logging.info("student %d params, teacher %d params, method %s, fusion %s, adaptive %s",
               models.count_params(s_params), info["teacher_params"], d.method, d.fusion,
               d.adaptive)

  schedule = optim.make_schedule(config)
  ctrl_state = controller = audit = ctrl_update = None
  if d.adaptive:
    groups = sorted(set(jax.tree.leaves(layer_labels(params))))
    tx = make_adaptive_optimizer(config, schedule, groups)
    controller, rule_names = make_controller(config, terms, groups)
    ctrl_state = jax.device_get(controller.init())
    ctrl_update = jax.jit(controller.update)
    audit = distill.AuditLog(os.path.join(workdir, AUDIT_LOG), rule_names=rule_names)
  else:
    tx = optim.make_optimizer(config, schedule).tx
  token_types = token_type_table(vocab_chars(config)) if d.fusion == "gated" else None
  if token_types is not None and len(token_types) != dataset.num_classes:
    raise ValueError(f"the vocabulary has {len(token_types)} characters, the dataset "
                     f"{dataset.num_classes} ids.")
  objective = make_objective(config, s_graph, t_graph, o_graph, o_rest, config.model, t_cfg,
                             token_types)
  step_fn = jax.jit(make_step(objective, tx, schedule, directional=config.probe.directional,
                              layer_labels=layer_labels if d.adaptive else None))
  eval_fn = jax.jit(make_eval(s_graph, d.temperature))
  opt_state = _canonical(tx.init(params))
  params = _canonical(params)
  iterator = dataset.iterator(config.batch_size, config.seed)
  eval_batch = jax.device_put(dataset.eval_batch(config.eval_examples))
  t_params = jax.device_put(t_params)
  t_eval_logits = jax.jit(make_teacher_logits(t_graph))(t_params, eval_batch["tokens"])
  teacher_eval_loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      t_eval_logits, eval_batch["tokens"][:, 1:])))
  interval: dict[str, Any] = {"count": 0, "sums": {}}

  def payload():
    out = {"params": params, "opt_state": opt_state}
    if ctrl_state is not None:
      out["controller"] = ctrl_state
    return out

  # ---- checkpoints: resume, then save every ck.every steps and at the end
  static_meta = {"config": checkpointing.config_json(config), "data": dataset.info,
                 "versions": checkpointing.versions()}
  mgr = checkpointing.make_manager(config, workdir) if (ck.enabled or resuming) else None
  path = os.path.join(workdir, "metrics.jsonl")
  audit_path = os.path.join(workdir, AUDIT_LOG)
  start_step = 0
  last_eval_loss: dict[str, float] = {}
  if resuming:
    try:
      restored = checkpointing.restore(mgr, checkpointing.abstract(payload()),
                                       max_step=config.num_steps, workdir=workdir)
      meta = restored.metadata
      changed = checkpointing.check_config(meta["config"], config, workdir=workdir,
                                           where=f"checkpoint at step {restored.step}")
      checkpointing.check_data(meta["data"], dataset.info, workdir=workdir,
                               allow=ck.allow_config_change)
      start_step = restored.step
      params = _canonical(restored.state["params"])
      opt_state = _canonical(restored.state["opt_state"])
      if ctrl_state is not None:
        ctrl_state = jax.device_get(restored.state["controller"])
      iterator.set_state(meta["data_position"])
      interval = meta["interval"]
      kept = checkpointing.truncate_metrics(path, start_step)
      if os.path.exists(audit_path):
        checkpointing.truncate_metrics(audit_path, start_step)
    except BaseException:
      mgr.close()
      raise
    rows = [json.loads(line) for line in kept]
    last_eval_loss = next(({"eval/loss": r["eval/loss"]} for r in reversed(rows)
                           if "eval/loss" in r), {})
    checkpointing.log_resume(workdir, {
        "restored_step": start_step, "kept_metric_rows": len(kept),
        "skipped_corrupt": [s for s, _ in restored.skipped], "config_changes": changed})
    logging.info("resumed %s from the student checkpoint at step %d (%d metric rows kept)",
                 workdir, start_step, len(kept))
  elif os.path.exists(audit_path):
    os.remove(audit_path)  # a fresh run: the audit log starts empty, like metrics.jsonl

  def save(done: int, *, force: bool = False, reason: str | None = None) -> None:
    """Checkpoints the state after ``done`` updates."""
    mgr.save(done, payload(),
             metadata={**static_meta, "data_position": dict(iterator.get_state()._asdict()),
                       "interval": interval},
             metrics={k: float(v) for k, v in last_eval_loss.items()}, force=force,
             reason=reason)

  writer = MetricsFile(path, append=resuming)
  teacher_row = {"distill/teacher_eval_loss": teacher_eval_loss}
  last: dict[str, Any] = {}
  try:
    for t in range(start_step, config.num_steps):
      extra: dict[str, Any] = {}
      ev = None
      if controller is not None and t > 0 and t % d.controller.every == 0:
        ev = jax.device_get(eval_fn(params["student"], eval_batch, t_eval_logits))
        inputs = controller_inputs(controller, ev, interval)
        new_state = jax.device_get(ctrl_update(ctrl_state, inputs))
        audit.write(ctrl_state, new_state, inputs, step=t)
        ctrl_state = new_state
        interval = {"count": 0, "sums": {}}
        extra.update(ev)
        extra.update({k: v for k, v in inputs.items() if k.startswith("controller/")})
        extra["controller/stage"] = np.int32(ctrl_state.stage)
      if config.eval_every and t % config.eval_every == 0:
        if ev is None:
          ev = jax.device_get(eval_fn(params["student"], eval_batch, t_eval_logits))
        extra.update(ev)
        extra.update(teacher_row)
      if ev is not None:
        last_eval_loss = {"eval/loss": float(ev["eval/loss"])}
      decisions = (None if ctrl_state is None else
                   controller_decisions(ctrl_state, terms, d.controller.stage_decay))
      params, opt_state, metrics = step_fn(jnp.int32(t), params, opt_state, t_params,
                                           next(iterator), decisions)
      metrics = jax.device_get({**metrics, **extra})
      if not math.isfinite(float(metrics["train/loss"])):
        writer.write(t, metrics)
        raise FloatingPointError(f"distillation objective non-finite at step {t}; see {path}.")
      if controller is not None:
        interval["count"] += 1
        for k in interval_keys(metrics):
          interval["sums"][k] = interval["sums"].get(k, 0.0) + float(metrics[k])
      if t % config.log_every == 0 or extra or t == config.num_steps - 1:
        writer.write(t, metrics)
      done = t + 1
      if mgr is not None and ck.enabled and done < config.num_steps and done % ck.every == 0:
        save(done)
    last = {k: _py(v) for k, v in
            jax.device_get(eval_fn(params["student"], eval_batch, t_eval_logits)).items()}
    last.update(teacher_row)
    writer.write(config.num_steps, last)
    if mgr is not None and ck.enabled and mgr.latest_step() != config.num_steps:
      last_eval_loss = {"eval/loss": last["eval/loss"]}
      end = config.num_steps % ck.every != 0
      save(config.num_steps, force=end, reason="end of run" if end else None)
  except BaseException:
    if mgr is not None:  # wait for a save in flight, but do not mask the error
      checkpointing.close_after_error(mgr)
      mgr = None
    raise
  finally:
    writer.close()
  if mgr is not None:
    mgr.close()  # waits for the last asynchronous save; raises if it failed

  wall = time.perf_counter() - start
  summary = {
      "method": d.method, "fusion": d.fusion, "adaptive": d.adaptive,
      "eval/loss": last["eval/loss"], "eval/perplexity": last["eval/perplexity"],
      "eval/accuracy": last["eval/accuracy"],
      "teacher/eval_loss": teacher_eval_loss,
      "teacher/eval_perplexity": math.exp(teacher_eval_loss),
      "student_params": models.count_params(s_params), **info,
      "teacher_seconds": teacher_seconds, "wall_seconds": wall,
      "resumed_from_step": start_step if resuming else None,
      "jit_compilations": step_fn._cache_size(),  # pylint: disable=protected-access
  }
  if ctrl_state is not None:
    summary["controller/stage"] = int(ctrl_state.stage)
    records = 0
    if os.path.exists(audit_path):
      with open(audit_path, encoding="utf-8") as f:
        records = sum(1 for _ in f)
    summary["controller/audit_records"] = records
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
  """``run_dir/plots/distill.png``: the loss terms over steps, the eval loss vs the teacher,
  and the fusion weights per term (the gate's batch means for ``fusion='gated'``)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from experiments import plots  # pylint: disable=g-import-not-at-top
  rows = plots.read_metrics(run_dir)
  cfg = plots.read_config(run_dir)
  fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
  for key in ["train/loss"] + [f"distill/{t}" for t in TERMS]:
    s, v = plots.series(rows, key)
    if len(s):
      a1.plot(s, v, label=key, lw=1)
  a1.set_yscale("symlog", linthresh=1e-3)
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
  for t in TERMS:
    s, v = plots.series(rows, f"distill/weight/{t}")
    if len(s):
      a3.plot(s, v, label=t, lw=1)
    s, v = plots.series(rows, f"distill/scale/{t}")
    if len(s):
      a3.plot(s, v, ls="--", lw=1, label=f"controller scale {t}")
  a3.set_xlabel("step")
  a3.set_title("fusion weight per term")
  a3.legend(fontsize=7)
  d = cfg.get("distill", {})
  fig.suptitle(f"distillation: method={d.get('method')}, fusion={d.get('fusion')}, "
               f"adaptive={d.get('adaptive')}")
  fig.tight_layout()
  out = os.path.join(run_dir, "plots", "distill.png")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def plot_comparison(results: dict[str, dict], path: str) -> None:
  """Bars of student eval loss and perplexity per preset, the teacher as a dashed line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, key, tkey in ((axes[0], "eval/loss", "teacher/eval_loss"),
                        (axes[1], "eval/perplexity", "teacher/eval_perplexity")):
    vals = [results[n][key] for n in names]
    bars = ax.bar(names, vals, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(results[names[0]][tkey], color="k", ls="--", label="teacher")
    lo = min(vals + [results[names[0]][tkey]])
    ax.set_ylim(lo * 0.95, max(vals) * 1.02)
    ax.set_title(f"student {key}")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def compare(workdir: str, presets: list[str], extra: str = "", overrides=None) -> dict:
  """Run ``configs/distill.py:<preset>[,extra]`` for every preset (``a+b`` = presets a and b
  together, e.g. ``temporal+adaptive``); the teacher is trained once and shared."""
  mod = config_lib.config_module(
      os.path.join(os.path.dirname(__file__), "..", "configs", "distill.py"))
  results, teacher_dir = {}, ""
  for name in presets:
    cfg = mod.get_config(",".join(p for p in name.split("+") + extra.split(",") if p))
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


DEFAULT_PRESETS = METHODS + ("temporal+adaptive",)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Compare distillation methods.")
  parser.add_argument("mode", choices=["compare"])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                      help="comma list; a+b combines presets (e.g. temporal+adaptive)")
  parser.add_argument("--extra", default="smoke", help="preset added to each, e.g. 'smoke'")
  args = parser.parse_args(argv)
  results = compare(args.workdir, [p for p in args.presets.split(",") if p], args.extra)
  print(format_table(results))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
