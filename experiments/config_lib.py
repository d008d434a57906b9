"""The experiment config schema: every field, its default, and validation with clear errors.

Config files (``configs/*.py``) start from :func:`default_config` and set what their experiment
needs, so every run's ``config.json`` lists every field. :func:`validate_config` checks the
result at the boundary of :func:`experiments.trainer.train_and_evaluate`: an unknown key, a
wrong type, a name outside an enumeration or a value out of range fails with a message naming
the field and the accepted values.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine", "warmup_stable_decay")
DECAY_SHAPES = ("linear", "cosine")
MODELS = ("mlp", "gpt")
ACTIVATIONS = ("tanh", "gelu", "relu")
DATASETS = ("digits", "code", "prose", "text", "mix")
LOSSES = ("mse", "cross_entropy")
VOCABS = ("ascii", "corpus")
CANDIDATE_MODES = ("min", "max")


def default_config() -> ml_collections.ConfigDict:
  """Every config field with its default (a locked ConfigDict: typos raise on assignment)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the model initialisation, the data split/shuffle and the Lanczos probes
  c.num_steps = 100  # optimizer steps
  c.batch_size = 0  # examples per step; 0 = full batch (the whole training set every step)
  c.grad_accum_steps = 1  # split every batch into this many equal chunks (same maths, less memory)
  c.full_batch_examples = 0  # full-batch mode: use the first N training examples (0 = all)
  c.loss = "mse"  # 'mse' (0.5·‖f(x) − onehot‖², digits) or 'cross_entropy'; text uses cross_entropy

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"  # 'mlp' (digits) or 'gpt' (text)
  c.model.widths = (200, 200)  # mlp: hidden layer widths
  c.model.activation = "tanh"  # mlp: 'tanh', 'gelu' or 'relu'
  c.model.depth = 2  # gpt: transformer blocks
  c.model.width = 64  # gpt: model dimension
  c.model.num_heads = 4  # gpt: attention heads (width must be divisible by it)
  c.model.mlp_ratio = 4  # gpt: block MLP hidden size / width

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # 'digits', 'code' (stdlib .py), 'prose' (pydoc topics), 'text', 'mix'
  c.data.eval_size = 297  # digits: held-out images (the rest, 1,500, are for training)
  c.data.subset_size = 0  # digits: train on the first N training images only (0 = all)
  c.data.standardize = True  # digits: zero-mean unit-variance features (else pixels/16)
  c.data.max_chars = 1_000_000  # text: characters read from each corpus
  c.data.context_length = 64  # text: tokens per training sequence
  c.data.eval_fraction = 0.1  # text: last fraction of each corpus held out for evaluation
  c.data.vocab = "ascii"  # text: 'ascii' (fixed, 98 ids) or 'corpus' (union of corpus chars)
  c.data.path = ""  # text: a user text file or folder (data.name='text')
  c.data.code_fraction = 0.5  # mix: fraction of each batch (and of the loss) that is code

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # 'sgd', 'momentum' (heavy ball), 'adam', 'adamw'
  c.optimizer.learning_rate = 0.1  # peak learning rate η
  c.optimizer.momentum = 0.9  # momentum: heavy-ball β (v ← g + βv)
  c.optimizer.b1 = 0.9  # adam/adamw: β1
  c.optimizer.b2 = 0.999  # adam/adamw: β2
  c.optimizer.eps = 1e-8  # adam/adamw: ε
  c.optimizer.weight_decay = 0.0  # adamw: decoupled weight decay γ (matrices only)
  c.optimizer.grad_clip = 0.0  # clip the gradient's global norm to this (0 = off)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"  # 'constant', 'warmup_cosine', 'warmup_stable_decay' (WSD)
  c.schedule.warmup_steps = 0  # linear warmup from η/warmup_steps to η
  c.schedule.decay_fraction = 0.2  # WSD: the last fraction of the run that decays
  c.schedule.decay_shape = "linear"  # WSD: 'linear' or 'cosine' decay
  c.schedule.end_fraction = 0.0  # final learning rate as a fraction of the peak

  c.probe = ml_collections.ConfigDict()
  c.probe.critical = True  # λ_c probe inside the optax chain (before the learning-rate scale)
  c.probe.every = 1  # measure λ_c every N steps (state carries the last value in between)
  c.probe.step_guess = 1.0  # first guess of η_c (later steps warm-start from the last η_c)
  c.probe.tol_power = 4  # bisect until 1 − lower/upper ≤ 2^−k
  c.probe.max_evals = 40  # cap on loss evaluations per search
  c.probe.directional = False  # also log ΔθᵀHΔθ/Δθᵀg (one extra HVP per measured step)
  c.probe.lanczos_every = 0  # λ_max(H) by Lanczos every N steps (0 = off)
  c.probe.lanczos_iters = 20  # Lanczos iterations (≥ 20 for the top eigenvalue)
  c.probe.preconditioned_every = 0  # adam/adamw: λ_max(P^-1/2 H P^-1/2) every N steps (0 = off)
  c.probe.relative_every = 0  # mix: the 2×2 relative-sharpness matrix every N steps (0 = off)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True  # save checkpoints to workdir/checkpoints (Orbax, per-leaf SHA-256)
  c.checkpoint.every = 100  # save every N steps, and always at the end of the run
  c.checkpoint.keep_preliminary = 3  # retention: latest N regular (preliminary) saves; -1 = all
  c.checkpoint.keep_observation = 3  # retention: latest N observation-tier saves; -1 = all
  c.checkpoint.keep_candidate = 3  # retention: best N candidates by candidate_metric; -1 = all
  c.checkpoint.candidate_metric = "eval/loss"  # ranks candidates: 'eval/loss' or 'train/loss'
  c.checkpoint.candidate_mode = "min"  # 'min' or 'max': which value of candidate_metric is best
  c.checkpoint.async_save = True  # write in a background thread while training continues
  c.checkpoint.resume = True  # continue from the latest valid checkpoint in workdir; False: move
  #   the old run aside to <workdir>.prev-<n> and start fresh
  c.checkpoint.allow_config_change = False  # resume even if fields that change the maths differ
  #   from the saved config (default: refuse, listing them)

  c.log_every = 1  # write metrics every N steps
  c.eval_every = 100  # evaluate every N steps (and at the end); 0 = only at the end
  c.eval_examples = 0  # evaluation examples/sequences (0 = the whole eval split)
  c.progress_bar = True  # tqdm progress bar with loss and λ_c
  c.plots = True  # write plots/*.png at the end (and on divergence)
  return c.lock()


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _suggest(name: str, options: Iterable[str]) -> str:
  close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


def _enum(cfg_flat: dict, key: str, accepted: tuple[str, ...]) -> None:
  value = cfg_flat[key]
  if value not in accepted:
    raise ValueError(f"config.{key}={value!r} is not one of {list(accepted)}."
                     f"{_suggest(str(value), accepted)}")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Check ``config`` against :func:`default_config` and return the resolved config.

  Missing fields take their defaults; unknown fields, wrong types, names outside the accepted
  enumerations and out-of-range values raise ``ValueError`` naming the field.
  """
  defaults = default_config()
  flat_default = _flatten(defaults)
  flat = _flatten(config)
  unknown = sorted(set(flat) - set(flat_default))
  if unknown:
    key = unknown[0]
    raise ValueError(f"unknown config key 'config.{key}'.{_suggest(key, flat_default)} "
                     f"Known keys: {sorted(flat_default)}")
  resolved = defaults
  with resolved.unlocked():
    for key, value in flat.items():
      default = flat_default[key]
      if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"config.{key} must be a bool, got {value!r}.")
      if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
          raise ValueError(f"config.{key} must be a number, got {value!r}.")
        if isinstance(default, int) and not isinstance(default, bool) and value != int(value):
          raise ValueError(f"config.{key} must be an integer, got {value!r}.")
        value = type(default)(value)
      if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"config.{key} must be a string, got {value!r}.")
      if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)):
          raise ValueError(f"config.{key} must be a tuple, e.g. {default!r}; got {value!r}.")
        value = tuple(value)
      node = resolved
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  f = _flatten(resolved)
  _enum(f, "optimizer.name", OPTIMIZERS)
  _enum(f, "schedule.name", SCHEDULES)
  _enum(f, "schedule.decay_shape", DECAY_SHAPES)
  _enum(f, "model.name", MODELS)
  _enum(f, "model.activation", ACTIVATIONS)
  _enum(f, "data.name", DATASETS)
  _enum(f, "data.vocab", VOCABS)
  _enum(f, "loss", LOSSES)
  _enum(f, "checkpoint.candidate_mode", CANDIDATE_MODES)

  def need(cond: bool, key: str, what: str):
    if not cond:
      raise ValueError(f"config.{key}={f[key]!r}: {what}.")

  need(f["num_steps"] >= 1, "num_steps", "must be >= 1")
  need(f["batch_size"] >= 0, "batch_size", "must be >= 0 (0 = full batch)")
  need(f["grad_accum_steps"] >= 1, "grad_accum_steps", "must be >= 1")
  need(f["batch_size"] % f["grad_accum_steps"] == 0, "batch_size",
       f"must be a multiple of grad_accum_steps={f['grad_accum_steps']}")
  need(f["full_batch_examples"] >= 0, "full_batch_examples", "must be >= 0 (0 = all)")
  need(f["optimizer.learning_rate"] > 0, "optimizer.learning_rate", "must be > 0")
  need(0 <= f["optimizer.momentum"] < 1, "optimizer.momentum", "must be in [0, 1)")
  need(0 <= f["optimizer.b1"] < 1, "optimizer.b1", "must be in [0, 1)")
  need(0 <= f["optimizer.b2"] < 1, "optimizer.b2", "must be in [0, 1)")
  need(f["optimizer.eps"] >= 0, "optimizer.eps", "must be >= 0")
  need(f["optimizer.weight_decay"] >= 0, "optimizer.weight_decay", "must be >= 0")
  need(f["optimizer.weight_decay"] == 0 or f["optimizer.name"] == "adamw",
       "optimizer.weight_decay", "decoupled weight decay is only applied by optimizer 'adamw'")
  need(f["optimizer.grad_clip"] >= 0, "optimizer.grad_clip", "must be >= 0 (0 = off)")
  need(0 <= f["schedule.warmup_steps"] < f["num_steps"] or f["schedule.warmup_steps"] == 0,
       "schedule.warmup_steps", f"must be in [0, num_steps={f['num_steps']})")
  need(0 < f["schedule.decay_fraction"] <= 1, "schedule.decay_fraction", "must be in (0, 1]")
  need(0 <= f["schedule.end_fraction"] <= 1, "schedule.end_fraction", "must be in [0, 1]")
  need(len(f["model.widths"]) >= 1 and all(int(w) >= 1 for w in f["model.widths"]),
       "model.widths", "must be a non-empty tuple of positive ints")
  for key in ("model.depth", "model.width", "model.num_heads", "model.mlp_ratio",
              "data.context_length", "data.max_chars", "probe.every", "probe.tol_power",
              "probe.lanczos_iters"):
    need(f[key] >= 1, key, "must be >= 1")
  need(f["model.width"] % f["model.num_heads"] == 0, "model.width",
       f"must be divisible by model.num_heads={f['model.num_heads']}")
  need(0 < f["data.eval_fraction"] < 1, "data.eval_fraction", "must be in (0, 1)")
  need(0 < f["data.code_fraction"] < 1, "data.code_fraction", "must be in (0, 1)")
  need(f["probe.step_guess"] > 0, "probe.step_guess", "must be > 0")
  need(f["probe.max_evals"] >= 2, "probe.max_evals", "must be >= 2")
  for key in ("probe.lanczos_every", "probe.preconditioned_every", "probe.relative_every",
              "eval_every", "eval_examples"):
    need(f[key] >= 0, key, "must be >= 0 (0 = off / all)")
  need(f["log_every"] >= 1, "log_every", "must be >= 1")
  need(f["checkpoint.every"] >= 1, "checkpoint.every", "must be >= 1 (steps between saves)")
  for key in ("checkpoint.keep_preliminary", "checkpoint.keep_observation",
              "checkpoint.keep_candidate"):
    need(f[key] >= -1, key, "must be >= 0, or -1 to keep all")
  need(bool(f["checkpoint.candidate_metric"].strip()), "checkpoint.candidate_metric",
       "must name a metric, e.g. 'eval/loss'")
  need(f["probe.preconditioned_every"] == 0 or f["optimizer.name"] in ("adam", "adamw"),
       "probe.preconditioned_every", "preconditioned sharpness needs optimizer 'adam' or 'adamw'")
  need(f["probe.relative_every"] == 0 or f["data.name"] == "mix", "probe.relative_every",
       "the relative-sharpness matrix needs data.name='mix' (two tasks)")
  is_text = f["data.name"] != "digits"
  need(not is_text or f["model.name"] == "gpt", "model.name",
       f"data.name={f['data.name']!r} is text and needs model.name='gpt'")
  need(is_text or f["model.name"] == "mlp", "model.name",
       "data.name='digits' is images and needs model.name='mlp'")
  need(not is_text or f["loss"] == "cross_entropy", "loss",
       "text data needs loss='cross_entropy'")
  need(f["data.name"] != "text" or bool(f["data.path"]), "data.path",
       "data.name='text' needs a file or folder path")
  return resolved.lock()


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Load ``path/to/config.py[:arg]`` like ``--config`` does, apply ``overrides``, validate.

  ``overrides`` maps dotted keys (``"optimizer.learning_rate"``) to values; an unknown key
  raises ``ValueError`` naming it. Handy in notebooks and tests.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location("_losslab_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  flat_known = _flatten(config)
  for key, value in (overrides or {}).items():
    if key not in flat_known:
      raise ValueError(f"unknown config key 'config.{key}'.{_suggest(key, flat_known)}")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    with config.unlocked():
      node[leaf] = value
  return validate_config(config)
