r"""The distillation objective: its loss terms, their fusion, and the student's evaluation.

Each loss term is one entry of :data:`TERMS`: a function of the two models' forward pass
(:class:`Forward`) and the objective module, the intermediates it reads, and its weight under
the fixed fusion. Which terms a run uses is ``config_lib.METHOD_TERMS[distill.method]``; adding
a term is one entry here and one name in ``METHOD_TERMS`` (plus, for a fixed weight, its
``distill.<term>_weight`` field in ``config_lib``).

Terms (all float32; ``ce`` and ``kd`` per sequence ``[B]``, the others per batch):

* ``ce``: next-token cross-entropy of the student.
* ``kd``: :math:`T^2\,\mathrm{KL}(P_T\|S_T)` (``distill.soft_target_kl``); with the fixed
  weights ``alpha·ce + (1 − alpha)·kd`` this is Hinton et al.'s (2015, arXiv:1503.02531) mix.
* ``features``: ``distill.FeatureDistiller`` over ``distill.feature_slices`` (uniform layer
  map, geometric depth weights, learned width projections; MMD with median-heuristic
  bandwidths, Gretton et al. 2012).
* ``smoothness``: ``distill.smoothness_penalty`` on the student's last block output.
* ``attention``: ``distill.attention_evolution_loss`` between the last student layer's
  attention and its mapped teacher layer's (heads averaged, nuclear norm).

Fusions (``distill.fusion``): ``fixed`` :math:`\sum_i w_i L_i`; ``uncertainty``
:math:`\sum_i e^{-s_i}L_i + s_i` (Kendall et al. 2018, arXiv:1705.07115); ``gated``: a
two-layer MLP maps per-sequence runtime features :math:`x_b` to softmax weights,
:math:`L = \frac1B\sum_b\sum_i g_i(x_b)\,L_i(b)` (``distill.GatedFusion``; features:
:func:`gate_feature_names`). The adaptive controller's loss scales :math:`c_i` multiply the
terms before the fusion.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import distill
from experiments import config_lib
from experiments import data as data_lib

TOKEN_TYPES = ("identifier", "digit", "whitespace", "symbol")  # gate feature: target char type


class Forward(NamedTuple):
  """One forward pass of student and teacher: what the loss terms read.

  ``x``/``y``: inputs and next-token labels ``[B, T]``; ``*_logits`` ``[B, T, V]`` float32
  (``t_logits`` None when no term needs the teacher); ``*_feats``: slice → ``[L, B, T, D]``
  (``distill.collect_intermediates``), teacher values under ``stop_gradient``.
  """
  x: jax.Array
  y: jax.Array
  s_logits: jax.Array
  s_feats: dict
  t_logits: jax.Array | None
  t_feats: dict


class Setup(NamedTuple):
  """What a term's function is built from: the ``distill`` block and both architectures."""
  d: Any
  student: Any
  teacher: Any


class Term(NamedTuple):
  """A loss term: ``build(setup) -> fn(forward, objective_module) -> [B] or scalar``,
  ``slices(d)`` the intermediates it reads from both models, ``teacher`` whether it needs the
  teacher's forward pass, ``weight(d, terms)`` its weight under the fixed fusion."""
  build: Callable[[Setup], Callable[[Forward, Any], jax.Array]]
  weight: Callable[[Any, tuple[str, ...]], float]
  slices: Callable[[Any], tuple[str, ...]] = lambda d: ()
  teacher: bool = True


def _ce(setup):
  del setup
  return lambda fw, obj: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      fw.s_logits, fw.y), axis=1)


def _kd(setup):
  return lambda fw, obj: jnp.mean(distill.soft_target_kl(
      fw.s_logits, fw.t_logits, temperature=setup.d.temperature, reduction="none"), axis=1)


def _feature_slices(d) -> tuple[str, ...]:
  return tuple(config_lib.parse_feature_slices(d.feature_slices))


def _features(setup):
  slices = _feature_slices(setup.d)

  def fn(fw, obj):
    loss, _ = obj.distiller({k: fw.s_feats[k] for k in slices},
                            {k: fw.t_feats[k] for k in slices})
    return loss
  return fn


def _smoothness(setup):
  del setup
  return lambda fw, obj: distill.smoothness_penalty(fw.s_feats["block_out"][-1])


def _attention(setup):
  s, t = setup.student, setup.teacher
  t_last = distill.layer_map(s.depth, t.depth, "uniform")[-1]

  def fn(fw, obj):
    s_att = distill.attention_from_qkv(fw.s_feats["qkv"][-1], s.num_heads)
    t_att = distill.attention_from_qkv(fw.t_feats["qkv"][t_last], t.num_heads)
    return distill.attention_evolution_loss(
        s_att, t_att, window=min(setup.d.attention_window, fw.x.shape[1]), heads="mean")
  return fn


TERMS: dict[str, Term] = {
    "ce": Term(_ce, lambda d, terms: d.alpha if "kd" in terms else 1.0, teacher=False),
    "kd": Term(_kd, lambda d, terms: 1.0 - d.alpha),
    "features": Term(_features, lambda d, terms: d.feature_weight, slices=_feature_slices),
    "smoothness": Term(_smoothness, lambda d, terms: d.smoothness_weight,
                       slices=lambda d: ("block_out",), teacher=False),
    "attention": Term(_attention, lambda d, terms: d.attention_weight,
                      slices=lambda d: ("qkv",)),
}


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


def _slice_dims(m) -> dict[str, int]:
  return {"attn_out": m.width, "norm_out": m.width, "pre_act": m.mlp_ratio * m.width,
          "block_out": m.width}


class Objective(nnx.Module):
  """The learned parts of the objective: feature projections and the fusion.

  Every ``nnx.Param`` here is trained with the student by descent on the fused total; the
  MMD kernels of the feature term take their bandwidths from the median heuristic and hold no
  parameter (minimising MMD over its bandwidths would collapse the kernel).
  """

  def __init__(self, config, student_cfg, teacher_cfg, rngs: nnx.Rngs):
    d = config.distill
    terms = config_lib.METHOD_TERMS[d.method]
    distiller = None
    if "features" in terms:
      distiller = distill.FeatureDistiller(
          _slice_dims(student_cfg), _slice_dims(teacher_cfg),
          num_student_layers=student_cfg.depth, num_teacher_layers=teacher_cfg.depth,
          slice_losses=config_lib.parse_feature_slices(d.feature_slices), rngs=rngs)
    self.distiller = nnx.data(distiller)
    if d.fusion == "gated":
      g = d.gate
      fusion = distill.GatedFusion(
          terms, len(gate_feature_names(terms)), hidden=g.hidden, min_weight=g.min_weight,
          temperature=g.temperature, entropy_weight=g.entropy_weight, rngs=rngs)
    elif d.fusion == "uncertainty":
      fusion = distill.UncertaintyFusion(terms)
    else:
      fusion = distill.FixedFusion({t: TERMS[t].weight(d, terms) for t in terms})
    self.fusion = nnx.data(fusion)


def _forward(s_graph, t_graph, collect, use_teacher, params, teacher_params, tokens) -> Forward:
  x, y = tokens[:, :-1], tokens[:, 1:]

  def run(model):
    if collect:
      return distill.collect_intermediates(model, x, slices=collect)
    return model(x), {}
  s_logits, s_feats = run(nnx.merge(s_graph, params["student"]))
  t_logits, t_feats = None, {}
  if use_teacher:
    t_logits, t_feats = jax.lax.stop_gradient(
        run(nnx.merge(t_graph, jax.lax.stop_gradient(teacher_params))))
    t_logits = t_logits.astype(jnp.float32)
  return Forward(x, y, s_logits.astype(jnp.float32), s_feats, t_logits, t_feats)


def make_objective(config, s_graph, t_graph, o_graph, o_rest, student_cfg, teacher_cfg,
                   token_types: np.ndarray | None = None):
  r"""``objective(params, teacher_params, batch, loss_scales=None) -> (total, aux)`` with params
  ``{"student": ..., "objective": ...}``.

  ``loss_scales`` (``{term: c_i}``, the adaptive controller's) multiply the terms before the
  fusion: ``fusion({i: c_i L_i}, features)``. ``token_types`` (int [V], see
  :func:`token_type_table`) is needed by the gated fusion. ``aux`` holds ``distill/<term>``
  (batch means), ``distill/weight/<term>`` and, with scales, ``distill/scale/<term>``.
  """
  d = config.distill
  terms = config_lib.METHOD_TERMS[d.method]
  setup = Setup(d, student_cfg, teacher_cfg)
  fns = {t: TERMS[t].build(setup) for t in terms}
  collect = tuple(dict.fromkeys(s for t in terms for s in TERMS[t].slices(d)))
  use_teacher = any(TERMS[t].teacher for t in terms)
  gated = d.fusion == "gated"
  if gated and token_types is None:
    raise ValueError("fusion='gated' needs `token_types` (token_type_table of the vocabulary).")
  types = None if token_types is None else jnp.asarray(token_types, jnp.int32)

  def objective(params, teacher_params, batch, loss_scales=None):
    fw = _forward(s_graph, t_graph, collect, use_teacher, params, teacher_params,
                  batch["tokens"])
    obj = nnx.merge(o_graph, params["objective"], o_rest)
    values = {t: fn(fw, obj) for t, fn in fns.items()}
    fused = values if loss_scales is None else {
        k: loss_scales[k] * v for k, v in values.items()}
    features = None
    if gated:
      features = distill.runtime_features(
          fw.s_logits, fw.y, teacher_logits=fw.t_logits, token_types=types[fw.y],
          num_token_types=len(TOKEN_TYPES))
    total, weights = obj.fusion(fused, features)
    aux = {f"distill/{k}": jnp.mean(v) for k, v in values.items()}
    aux.update({f"distill/weight/{k}": jnp.mean(v) for k, v in weights.items()})
    if loss_scales is not None:
      aux.update({f"distill/scale/{k}": jnp.asarray(v, jnp.float32)
                  for k, v in loss_scales.items()})
    return total, aux
  return objective


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
            "eval/kd": distill.soft_target_kl(logits, teacher_logits, temperature=temperature)}
  return ev


def make_teacher_logits(t_graph):
  """``(teacher_params, tokens) -> float32 logits`` of the inputs ``tokens[:, :-1]``."""
  def fn(teacher_params, tokens):
    return nnx.merge(t_graph, teacher_params)(tokens[:, :-1]).astype(jnp.float32)
  return fn
