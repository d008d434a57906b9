"""The experiment config schema: every field, its default, and validation with clear errors.

Config files (``configs/*.py``) start from :func:`default_config` and set what their experiment
needs, so every run's ``config.json`` lists every field; a distillation config
(``default_config(distill=True)``) also has the ``distill`` block of :func:`_distill_fields`.
:func:`validate_config` checks the result at the boundary of the runners
(``experiments.trainer.train_and_evaluate``, ``experiments.distillation.distill_and_evaluate``)
and of the command line: an unknown key, a wrong type, a name outside an enumeration or a value
out of range fails with a message naming the field and the accepted values.

This module imports no runner and no JAX, so ``python -m experiments.run --dry_run`` validates
a config without starting either.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping

import ml_collections

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine", "warmup_stable_decay", "two_stage")
DECAY_SHAPES = ("linear", "cosine")
MODELS = ("mlp", "gpt")
ACTIVATIONS = ("tanh", "gelu", "relu")
DATASETS = ("digits", "code", "prose", "text", "mix")
LOSSES = ("mse", "cross_entropy")
VOCABS = ("ascii", "corpus")
CANDIDATE_MODES = ("min", "max")
MONITOR_NODES = ("structural", "functional", "generalisation")  # nodes evidence can feed
ANOMALY_REASONS = ("nonfinite", "spike", "level_shift", "unstable_lr")  # convergence.REASON_NAMES
PRECISION_DTYPES = ("float32", "bfloat16")
LOSS_SCALES = ("none", "dynamic")  # or a positive number as a string: a static scale

# The distillation experiment (``distill`` block). A method names its loss terms; the terms
# themselves are computed by ``experiments.distill_objective`` (one entry per term there).
DISTILL_METHODS = ("ce", "hinton", "features", "temporal", "fused")
DISTILL_FUSIONS = ("fixed", "uncertainty", "gated")
DISTILL_TERMS = ("ce", "kd", "features", "smoothness", "attention")
METHOD_TERMS = {
    "ce": ("ce",),
    "hinton": ("ce", "kd"),
    "features": ("ce", "kd", "features"),
    "temporal": DISTILL_TERMS,
    "fused": DISTILL_TERMS,  # the five terms of 'temporal' with a learned fusion
}
# distill.SLICES and distill.LOSS_KINDS, repeated here so that validating a config imports no
# JAX (tests/experiments/test_experiment_config.py checks that they agree).
FEATURE_SLICES = ("attn_out", "norm_out", "pre_act", "block_out")
FEATURE_LOSSES = ("cosine", "mmd", "l1")


def default_config(distill: bool = False) -> ml_collections.ConfigDict:
  """Every config field with its default (a locked ConfigDict: typos raise on assignment).

  ``distill=True`` adds the ``distill`` block of the distillation experiment
  (``configs/distill.py``, ``experiments.distillation``).
  """
  c = ml_collections.ConfigDict()
  for add in (_run_fields, _model_fields, _precision_fields, _data_fields, _optimizer_fields,
              _schedule_fields, _probe_fields, _checkpoint_fields, _monitor_fields,
              _parallel_fields):
    add(c)
  if distill:
    _distill_fields(c)
  return c.lock()


def _run_fields(c: ml_collections.ConfigDict) -> None:
  """The run: seed, length, batch, loss; logging, evaluation and plots."""
  c.seed = 0  # seeds the model initialisation, the data split/shuffle and the Lanczos probes
  c.num_steps = 100  # optimizer steps
  c.batch_size = 0  # examples per step; 0 = full batch (the whole training set every step)
  c.grad_accum_steps = 1  # split every batch into this many equal chunks (same maths, less memory)
  c.full_batch_examples = 0  # full-batch mode: use the first N training examples (0 = all)
  c.loss = "mse"  # 'mse' (0.5·‖f(x) − onehot‖², digits) or 'cross_entropy'; text uses cross_entropy
  c.log_every = 1  # write metrics every N steps
  c.eval_every = 100  # evaluate every N steps (and at the end); 0 = only at the end
  c.eval_examples = 0  # evaluation examples/sequences (0 = the whole eval split)
  c.progress_bar = True  # tqdm progress bar with loss and λ_c
  c.plots = True  # write plots/*.png at the end (and on divergence)


def _model_fields(c: ml_collections.ConfigDict) -> None:
  """The network: an MLP (digits) or a decoder-only GPT (text)."""
  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"  # 'mlp' (digits) or 'gpt' (text)
  c.model.widths = (200, 200)  # mlp: hidden layer widths
  c.model.activation = "tanh"  # mlp: 'tanh', 'gelu' or 'relu'
  c.model.depth = 2  # gpt: transformer blocks
  c.model.width = 64  # gpt: model dimension
  c.model.num_heads = 4  # gpt: attention heads (width must be divisible by it)
  c.model.mlp_ratio = 4  # gpt: block MLP hidden size / width


def _precision_fields(c: ml_collections.ConfigDict) -> None:
  """Mixed precision: compute dtype and loss scaling (``experiments.precision``)."""
  c.precision = ml_collections.ConfigDict()  # mixed precision (experiments.precision)
  c.precision.compute_dtype = "float32"  # 'float32' or 'bfloat16': the models' matrix products;
  #   parameters and optimizer state stay float32, losses are reduced in float32
  c.precision.loss_scale = "none"  # 'none', 'dynamic' (halve on non-finite gradients and skip
  #   the update, double after growth_interval finite steps) or a positive number as a string,
  #   e.g. '1024': a static scale
  c.precision.initial_scale = 2.0 ** 15  # dynamic: the first loss scale
  c.precision.growth_interval = 2000  # dynamic: finite steps in a row before the scale doubles
  c.precision.probe_dtype = "float32"  # compute dtype of the probes' forward passes (λ_c
  #   searches, HVPs); 'float32' whatever compute_dtype, 'bfloat16' only to study its error


def _data_fields(c: ml_collections.ConfigDict) -> None:
  """The dataset and its split."""
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
  c.data.code_fraction = 0.5  # mix (and a switch_step's stage 2): fraction of each batch
  #   (and of the loss) that is code
  c.data.switch_step = 0  # code or prose: from this step on every batch is the code/prose mix
  #   (code_fraction code, rows of one token array) instead of data.name alone; 0 = one data
  #   set throughout. With schedule 'two_stage' it must be the schedule's stage-2 start


def _optimizer_fields(c: ml_collections.ConfigDict) -> None:
  """The optimizer and its hyperparameters."""
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # 'sgd', 'momentum' (heavy ball), 'adam', 'adamw'
  c.optimizer.learning_rate = 0.1  # peak learning rate η
  c.optimizer.momentum = 0.9  # momentum: heavy-ball β (v ← g + βv)
  c.optimizer.b1 = 0.9  # adam/adamw: β1
  c.optimizer.b2 = 0.999  # adam/adamw: β2
  c.optimizer.eps = 1e-8  # adam/adamw: ε
  c.optimizer.weight_decay = 0.0  # adamw: decoupled weight decay γ (matrices only)
  c.optimizer.grad_clip = 0.0  # clip the gradient's global norm to this (0 = off)


def _schedule_fields(c: ml_collections.ConfigDict) -> None:
  """The learning-rate schedule."""
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"  # 'constant', 'warmup_cosine', 'warmup_stable_decay' (WSD),
  #   'two_stage' (cosine to stage1_end_fraction·η, then a second decay to end_fraction·η)
  c.schedule.warmup_steps = 0  # linear warmup from η/warmup_steps to η
  c.schedule.decay_fraction = 0.2  # WSD: the last fraction of the run that decays; two_stage:
  #   the last fraction of the run that is stage 2
  c.schedule.decay_shape = "linear"  # WSD, two_stage's stage 2: 'linear' or 'cosine' decay
  c.schedule.end_fraction = 0.0  # final learning rate as a fraction of the peak
  c.schedule.stage1_end_fraction = 0.1  # two_stage: η at the end of stage 1's cosine, as a
  #   fraction of the peak


def _probe_fields(c: ml_collections.ConfigDict) -> None:
  """The curvature probes (λ_c in the optax chain; Lanczos λ_max, λ^PH)."""
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
  c.probe.relative_batches = 4  # mix: held-out batches per task the matrix is measured on (the
  #   evaluation examples, eval_examples, cut into this many); logged as median, min and max


def _checkpoint_fields(c: ml_collections.ConfigDict) -> None:
  """Orbax checkpoints, retention tiers and resume."""
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True  # save checkpoints to workdir/checkpoints (Orbax, per-leaf SHA-256)
  c.checkpoint.every = 100  # save every N steps, and always at the end of the run
  c.checkpoint.save_initial = False  # also save the state before the first update as step 0
  #   (for probes measured afterwards from initialisation; a fresh run only)
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


def _monitor_fields(c: ml_collections.ConfigDict) -> None:
  """The convergence monitor: evidence, anomaly detection, emergency saves, rollback."""
  c.monitor = ml_collections.ConfigDict()  # convergence monitor (experiments.monitoring)
  c.monitor.enabled = True  # anomaly detector + evidence windows + Bayesian network every step
  c.monitor.metrics = (  # evidence: "<metric> node=<node> [mode=min|max] [short=N] [long=N]
      #   [history=N] [half_life=S]"; node: structural, functional or generalisation; windows
      #   count accepted samples (a metric absent from a step is skipped), half_life is in steps
      "train/grad_norm node=structural",
      "train/update_norm node=structural",
      "curv/lr_sharpness node=structural",
      "train/loss node=functional",
      "eval/loss node=generalisation short=2 long=10 history=8 half_life=1000",
  )
  c.monitor.short_window = 20  # default short (fast) evidence window, accepted samples
  c.monitor.long_window = 200  # default long window (multiple of short_window and of 10)
  c.monitor.history = 64  # default number of short-window means in the rolling-quantile baseline
  c.monitor.half_life = 100.0  # default evidence half-life in steps (older evidence decays)
  c.monitor.threshold = 0.9  # P(converged) for the decision "converged" (the default tables
  #   cap P(converged) at 0.95, so a threshold >= 0.95 can never be reached)
  c.monitor.tier_thresholds = (0.4, 0.6)  # P(converged) promoting the newest checkpoint to
  #   observation, candidate; release = the decision "converged" (monitor.threshold)
  c.monitor.anomaly_window = 64  # anomaly detector: long window (baseline) of each stream
  c.monitor.anomaly_short_window = 8  # anomaly detector: short window for level shifts
  c.monitor.spike_threshold = 6.0  # robust z-score of one value above which it is a spike
  c.monitor.shift_threshold = 4.0  # robust z of the short-window median for a level shift
  c.monitor.min_history = 16  # finite values a stream needs before spike/shift tests
  c.monitor.lr_sharpness_limit = 2.0  # η·λ_c above this (the step raises the batch loss) ...
  c.monitor.unstable_sustain = 20  # ... for this many consecutive measured steps: unstable_lr
  c.monitor.eos_window = 32  # edge of stability: spikes within this many steps of η·λ_c near
  #   the limit (or rising eos_rise × above its baseline) are oscillation, not anomalies; 0: off
  c.monitor.eos_band = (0.25, 1.25)  # η·λ_c / lr_sharpness_limit counted as "near the limit"
  c.monitor.eos_rise = 10.0  # η·λ_c this many times its window median: an excursion starting
  c.monitor.eos_max_loss_ratio = 100.0  # a loss above this × its window median stays an anomaly
  c.monitor.emergency_on = ("nonfinite", "spike", "unstable_lr")  # anomaly reasons that write
  #   a pinned emergency checkpoint of the state before the flagged update (others: logged)
  c.monitor.max_emergency_saves = 10  # cap on emergency checkpoints per run (pinned: kept)
  c.monitor.rollback_on_anomaly = False  # on an anomaly in rollback_on: restore the emergency
  #   checkpoint, skip the flagged update (its batch is dropped) and continue; False: a
  #   non-finite loss raises TrainingDiverged after the emergency checkpoint is written
  c.monitor.rollback_on = ("nonfinite",)  # anomaly reasons that roll back (when enabled)
  c.monitor.max_rollbacks = 3  # rollbacks per run before a non-finite loss stops it anyway
  c.monitor.audit_every = 10  # audit.jsonl: a decision line every N steps, and at every change
  #   of decision, conflict, anomaly or checkpoint tier


def _parallel_fields(c: ml_collections.ConfigDict) -> None:
  """Device mesh, several hosts, and test-only hooks."""
  c.mesh = ml_collections.ConfigDict()  # device mesh (experiments.sharding); () = one device
  c.mesh.shape = ()  # mesh axis sizes, e.g. (8,) or (2, 4); one -1 = the remaining devices;
  #   () = no mesh. The batch is split over all axes; on a CPU simulate devices with
  #   XLA_FLAGS=--xla_force_host_platform_device_count=8
  c.mesh.axis_names = ("data",)  # one name per mesh axis
  c.mesh.layout = "data_parallel"  # 'data_parallel' (state replicated) or 'fsdp' (parameters
  #   and optimizer state split along each leaf's largest divisible dimension)
  c.mesh.fsdp_axis = ""  # fsdp: the mesh axis the state is split over ("" = the last axis)
  c.distributed = ml_collections.ConfigDict()  # several hosts (jax.distributed)
  c.distributed.initialize = False  # call jax.distributed.initialize() before anything else
  c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = from the environment
  c.distributed.num_processes = 0  # number of processes; 0 = from the environment
  c.distributed.process_id = -1  # this process's index; -1 = from the environment
  c.debug = ml_collections.ConfigDict()  # test-only hooks; leave at their defaults
  c.debug.nan_at_step = -1  # make the training loss and gradients of step N NaN (-1 = off)


def _distill_fields(c: ml_collections.ConfigDict) -> None:
  """The distillation experiment: loss terms, fusion, adaptive controller and the teacher."""
  c.distill = ml_collections.ConfigDict()
  d = c.distill
  d.method = "hinton"  # which loss terms (METHOD_TERMS): 'ce', 'hinton' (ce + kd), 'features'
  #   (+ features), 'temporal' (+ smoothness + attention), 'fused' (temporal's five terms with
  #   a learned fusion)
  d.fusion = "fixed"  # 'fixed' (the weights below), 'uncertainty' (Kendall et al. 2018) or
  #   'gated' (distill.GatedFusion: a gating MLP from runtime features to softmax weights,
  #   trained with the student); method 'fused' needs a learned one
  d.teacher_dir = ""  # "" = train the teacher into <workdir>/teacher; else a run directory
  #   written by the runner (config.json + checkpoints/) to load the teacher from
  d.temperature = 2.0  # softmax temperature T of the soft-target KL (T² factor explicit)
  d.alpha = 0.5  # fixed fusion: weight of hard-label CE; the KL gets 1 − alpha (Hinton)
  d.feature_weight = 0.1  # fixed fusion: weight of the feature loss
  d.smoothness_weight = 0.01  # fixed fusion: weight of the student's hidden-state smoothness
  d.attention_weight = 0.01  # fixed fusion: weight of the attention-evolution loss
  d.feature_slices = "attn_out=cosine,norm_out=cosine,pre_act=mmd,block_out=l1"  # slice=loss
  #   pairs of distill.FeatureDistiller (slices FEATURE_SLICES, losses FEATURE_LOSSES; mmd uses
  #   median-heuristic bandwidths)
  d.attention_window = 4  # steps per attention-evolution matrix (current + 3 previous)
  d.gate = ml_collections.ConfigDict()  # fusion='gated' (distill.GatedFusion)
  d.gate.hidden = 32  # hidden width of the gating MLP
  d.gate.min_weight = 0.05  # floor on every term's weight (< 1/K): no term is starved
  d.gate.temperature = 1.0  # softmax temperature of the gate
  d.gate.entropy_weight = 0.0  # bonus on the entropy of the weights (0 = none)
  d.adaptive = False  # the adaptive controller (distill.adaptive_controller)
  d.controller = ml_collections.ConfigDict()  # adaptive=True (experiments.distill_controller)
  d.controller.every = 10  # steps between controller evaluations (fixed eval batch + interval)
  d.controller.window = 10  # stage transition: evaluations the core metrics must stay ...
  d.controller.rtol = 0.003  # ... within this fraction of their mean (0.3%)
  d.controller.num_stages = 3  # stages 0..num_stages-1
  d.controller.stage_decay = 0.5  # each stage multiplies the non-CE terms by this
  d.controller.gap_threshold = 0.1  # eval CE − train CE above this (nats) raises the kd weight
  d.controller.gap_factor = 1.25  # ... by this factor per evaluation
  d.controller.max_scale = 4.0  # controller weights stay in [1/max_scale, max_scale]
  d.controller.clip_spread = 4.0  # per-layer clipping when max/mean layer grad norm exceeds this
  d.controller.stall_ratio = 1e-4  # a layer group whose ‖Δθ‖/‖θ‖ per step stays below this ...
  d.controller.stall_patience = 3  # ... for this many evaluations restarts its LR schedule
  d.teacher = ml_collections.ConfigDict()  # the teacher (trained first unless teacher_dir)
  d.teacher.depth = 4  # teacher blocks
  d.teacher.width = 128  # teacher model dimension
  d.teacher.num_heads = 4  # teacher attention heads
  d.teacher.mlp_ratio = 4  # teacher MLP hidden = mlp_ratio × width
  d.teacher.num_steps = 600  # teacher optimizer steps (trained with the base optimizer)
  d.teacher.learning_rate = 3e-3  # teacher peak η


def decay_start(config) -> int:
  """The first step of a WSD decay or of a two_stage schedule's stage 2.

  ``max(T − max(1, round(f·T)), W)`` with ``T = num_steps``, ``f = schedule.decay_fraction``
  and ``W = schedule.warmup_steps``: the last fraction ``f`` of the run, never inside warmup.
  """
  s, total = config.schedule, int(config.num_steps)
  return max(total - max(1, int(round(float(s.decay_fraction) * total))),
             max(int(s.warmup_steps), 0))


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a.b.c": leaf}`` for a ``ConfigDict`` or a nested mapping (a config's JSON)."""
  out = {}
  for key, value in cfg.items():
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten_config(value, f"{prefix}{key}."))
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
  enumerations and out-of-range values raise ``ValueError`` naming the field. A config with a
  ``distill`` block is checked against ``default_config(distill=True)`` and the distillation
  experiment's own constraints (:func:`_validate_distill`).
  """
  resolved = _resolve(config, default_config(distill="distill" in config))
  f = flatten_config(resolved)

  def need(cond: bool, key: str, what: str):
    if not cond:
      raise ValueError(f"config.{key}={f[key]!r}: {what}.")

  _validate_enums(f)
  _validate_ranges(f, need)
  _validate_monitor(f, need)
  _validate_consistency(f, need)
  if "distill" in config:
    _validate_distill(f, need)
  return resolved.lock()


def _resolve(config: ml_collections.ConfigDict,
             defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``defaults`` with the values of ``config``: unknown keys and wrong types raise."""
  flat_default = flatten_config(defaults)
  flat = flatten_config(config)
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
  return resolved


def _validate_enums(f: dict[str, Any]) -> None:
  """Names that must come from an enumeration (optimizer, schedule, model, data, ...)."""
  _enum(f, "optimizer.name", OPTIMIZERS)
  _enum(f, "schedule.name", SCHEDULES)
  _enum(f, "schedule.decay_shape", DECAY_SHAPES)
  _enum(f, "model.name", MODELS)
  _enum(f, "model.activation", ACTIVATIONS)
  _enum(f, "data.name", DATASETS)
  _enum(f, "data.vocab", VOCABS)
  _enum(f, "loss", LOSSES)
  _enum(f, "checkpoint.candidate_mode", CANDIDATE_MODES)
  _enum(f, "precision.compute_dtype", PRECISION_DTYPES)
  _enum(f, "precision.probe_dtype", PRECISION_DTYPES)
  _validate_loss_scale(f["precision.loss_scale"])
  _enum(f, "mesh.layout", ("data_parallel", "fsdp"))


def _validate_ranges(f: dict[str, Any], need) -> None:
  """Bounds of single fields (steps, rates, sizes, probe and checkpoint settings)."""
  need(f["num_steps"] >= 1, "num_steps", "must be >= 1")
  need(f["precision.initial_scale"] > 0, "precision.initial_scale", "must be > 0")
  need(f["precision.growth_interval"] >= 1, "precision.growth_interval", "must be >= 1")
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
  need(0 <= f["schedule.stage1_end_fraction"] <= 1, "schedule.stage1_end_fraction",
       "must be in [0, 1]")
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
  need(f["probe.relative_batches"] >= 1, "probe.relative_batches", "must be >= 1")
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


def _validate_consistency(f: dict[str, Any], need) -> None:
  """Fields that constrain each other: mesh axes, probes vs optimizer, model vs data."""
  need(len(f["mesh.axis_names"]) == len(f["mesh.shape"]) or not f["mesh.shape"],
       "mesh.axis_names", f"must name each axis of mesh.shape={tuple(f['mesh.shape'])}")
  need(all(isinstance(s, int) and (s >= 1 or s == -1) for s in f["mesh.shape"])
       and sum(s == -1 for s in f["mesh.shape"]) <= 1, "mesh.shape",
       "must hold positive ints and at most one -1")
  need(not f["mesh.fsdp_axis"] or f["mesh.fsdp_axis"] in f["mesh.axis_names"], "mesh.fsdp_axis",
       f"must be one of mesh.axis_names={tuple(f['mesh.axis_names'])} or ''")
  need(f["debug.nan_at_step"] >= -1, "debug.nan_at_step", "must be a step >= 0, or -1 (off)")
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
  _validate_switch(f, need)


def _validate_switch(f: dict[str, Any], need) -> None:
  """A data switch (``data.switch_step``): a single corpus first, mini-batches, inside the run,
  and at the stage boundary of a two_stage schedule."""
  step = f["data.switch_step"]
  need(step >= 0, "data.switch_step", "must be >= 0 (0 = no switch)")
  if step == 0:
    return
  need(f["data.name"] in ("code", "prose"), "data.switch_step",
       f"switching to the code/prose mix needs data.name 'code' or 'prose', not "
       f"{f['data.name']!r}")
  need(f["batch_size"] > 0, "data.switch_step", "a data switch needs mini-batches "
       "(batch_size > 0); a full batch is one fixed batch")
  need(step < f["num_steps"], "data.switch_step", f"must be < num_steps={f['num_steps']}")
  if f["schedule.name"] == "two_stage":
    s = ml_collections.ConfigDict({"num_steps": f["num_steps"], "schedule": {
        "decay_fraction": f["schedule.decay_fraction"],
        "warmup_steps": f["schedule.warmup_steps"]}})
    need(step == decay_start(s), "data.switch_step",
         f"must equal the two_stage schedule's stage-2 start, step {decay_start(s)} (num_steps "
         f"− round(schedule.decay_fraction·num_steps)), so data and learning rate change "
         "together")


def _validate_loss_scale(value: str) -> None:
  if value in LOSS_SCALES:
    return
  try:
    static = float(value)
  except ValueError:
    static = float("nan")
  if not 0 < static < float("inf"):
    raise ValueError(f"config.precision.loss_scale={value!r} is not one of {list(LOSS_SCALES)} "
                     "or a positive number as a string (a static scale, e.g. '1024')."
                     f"{_suggest(value, LOSS_SCALES)}")


_SPEC_KEYS = {"node": str, "mode": str, "short": int, "long": int, "history": int,
              "half_life": float}


def parse_monitor_metric(spec: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
  """Parses one ``monitor.metrics`` entry, ``"<metric> node=<node> [key=value ...]"``.

  Returns ``{"name", "node", "mode", "short", "long", "history", "half_life"}`` with the
  missing keys taken from ``defaults`` (keys ``short``, ``long``, ``history``, ``half_life``).
  Raises ``ValueError`` naming the entry and the key.
  """
  defaults = defaults or {}
  parts = str(spec).split()
  if not parts or "=" in parts[0]:
    raise ValueError(f"config.monitor.metrics entry {spec!r}: must start with a metric name, "
                     "e.g. 'train/loss node=functional'.")
  out: dict[str, Any] = {"name": parts[0], "mode": "min", **defaults}
  for token in parts[1:]:
    key, eq, value = token.partition("=")
    if not eq or key not in _SPEC_KEYS:
      raise ValueError(f"config.monitor.metrics entry {spec!r}: {token!r} is not key=value "
                       f"with a key in {sorted(_SPEC_KEYS)}.{_suggest(key, _SPEC_KEYS)}")
    try:
      out[key] = _SPEC_KEYS[key](value)
    except ValueError:
      raise ValueError(f"config.monitor.metrics entry {spec!r}: {key}={value!r} must be "
                       f"{_SPEC_KEYS[key].__name__}.") from None
  where = f"config.monitor.metrics entry {spec!r}"
  if "node" not in out:
    raise ValueError(f"{where}: needs node=<one of {list(MONITOR_NODES)}>.")
  if out["node"] not in MONITOR_NODES:
    raise ValueError(f"{where}: node={out['node']!r} is not one of {list(MONITOR_NODES)}."
                     f"{_suggest(out['node'], MONITOR_NODES)}")
  if out["mode"] not in CANDIDATE_MODES:
    raise ValueError(f"{where}: mode={out['mode']!r} is not one of {list(CANDIDATE_MODES)}.")
  s, l, h = out.get("short"), out.get("long"), out.get("history")
  if s is None or l is None or h is None or "half_life" not in out:
    raise ValueError(f"{where}: short, long, history and half_life need values or defaults.")
  if s < 2 or l < 2 * s or l % s or l % 10:
    raise ValueError(f"{where}: needs short >= 2 and long a multiple of short (>= 2·short) "
                     f"and of 10 (the stationarity test's batches); got short={s}, long={l}.")
  if h < 4:
    raise ValueError(f"{where}: history={h} must be >= 4.")
  if not out["half_life"] > 0:
    raise ValueError(f"{where}: half_life={out['half_life']!r} must be > 0 (steps; inf = never "
                     "forget).")
  return out


def monitor_metric_specs(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The parsed ``config.monitor.metrics`` (see :func:`parse_monitor_metric`)."""
  m = config.monitor
  defaults = {"short": int(m.short_window), "long": int(m.long_window),
              "history": int(m.history), "half_life": float(m.half_life)}
  return [parse_monitor_metric(s, defaults) for s in m.metrics]


def _validate_monitor(f: dict[str, Any], need) -> None:
  for key in ("monitor.short_window", "monitor.long_window", "monitor.history",
              "monitor.anomaly_window", "monitor.anomaly_short_window", "monitor.min_history",
              "monitor.unstable_sustain", "monitor.audit_every"):
    need(f[key] >= 1, key, "must be >= 1")
  for key in ("monitor.max_emergency_saves", "monitor.max_rollbacks"):
    need(f[key] >= 0, key, "must be >= 0")
  need(f["monitor.anomaly_short_window"] <= f["monitor.anomaly_window"],
       "monitor.anomaly_short_window", "must be <= monitor.anomaly_window")
  need(f["monitor.min_history"] <= f["monitor.anomaly_window"], "monitor.min_history",
       "must be <= monitor.anomaly_window")
  for key in ("monitor.spike_threshold", "monitor.shift_threshold",
              "monitor.lr_sharpness_limit", "monitor.half_life"):
    need(f[key] > 0, key, "must be > 0")
  need(f["monitor.eos_window"] >= 0, "monitor.eos_window", "must be >= 0 (0 turns it off)")
  band = f["monitor.eos_band"]
  need(len(band) == 2 and all(isinstance(x, (int, float)) for x in band)
       and 0 < band[0] <= 1 <= band[1], "monitor.eos_band",
       "must be two fractions of monitor.lr_sharpness_limit (low, high) with 0 < low <= 1 <= high")
  need(f["monitor.eos_rise"] > 1, "monitor.eos_rise", "must be > 1")
  need(f["monitor.eos_max_loss_ratio"] > 1, "monitor.eos_max_loss_ratio", "must be > 1")
  need(0 < f["monitor.threshold"] < 1, "monitor.threshold", "must be in (0, 1)")
  t = f["monitor.tier_thresholds"]
  need(len(t) == 2 and all(isinstance(x, (int, float)) and 0 < x < 1 for x in t)
       and t[0] <= t[1] <= f["monitor.threshold"], "monitor.tier_thresholds",
       "must be two probabilities (observation, candidate) with 0 < observation <= candidate "
       f"<= monitor.threshold={f['monitor.threshold']}")
  for key in ("monitor.emergency_on", "monitor.rollback_on"):
    bad = [r for r in f[key] if r not in ANOMALY_REASONS]
    need(not bad, key, f"entries must be anomaly reasons in {list(ANOMALY_REASONS)}"
         + (_suggest(str(bad[0]), ANOMALY_REASONS) if bad else ""))
  need(set(f["monitor.rollback_on"]) <= set(f["monitor.emergency_on"]), "monitor.rollback_on",
       "every rollback reason must also be in monitor.emergency_on (a rollback restores the "
       "emergency checkpoint)")
  if not f["monitor.enabled"]:
    return
  need(len(f["monitor.metrics"]) >= 1, "monitor.metrics", "must name at least one metric")
  names = [str(s).split()[0] if str(s).split() else "" for s in f["monitor.metrics"]]
  need(len(set(names)) == len(names), "monitor.metrics", "metric names must be distinct")
  defaults = {"short": int(f["monitor.short_window"]), "long": int(f["monitor.long_window"]),
              "history": int(f["monitor.history"]), "half_life": float(f["monitor.half_life"])}
  for spec in f["monitor.metrics"]:
    parse_monitor_metric(spec, defaults)


# distill.<field> -> accepted values (a tuple) or a range: 'positive' (> 0), 'nonneg' (>= 0),
# 'unit' ([0, 1]). Types come from the defaults (_distill_fields).
_DISTILL_CHECKS = {
    "method": DISTILL_METHODS, "fusion": DISTILL_FUSIONS,
    "temperature": "positive", "alpha": "unit", "feature_weight": "nonneg",
    "smoothness_weight": "nonneg", "attention_weight": "nonneg", "attention_window": "positive",
    "gate.hidden": "positive", "gate.min_weight": "nonneg", "gate.temperature": "positive",
    "gate.entropy_weight": "nonneg",
    "controller.every": "positive", "controller.window": "positive", "controller.rtol": "nonneg",
    "controller.num_stages": "positive", "controller.stage_decay": "unit",
    "controller.gap_factor": "positive", "controller.max_scale": "positive",
    "controller.clip_spread": "positive", "controller.stall_ratio": "nonneg",
    "controller.stall_patience": "positive",
    "teacher.depth": "positive", "teacher.width": "positive", "teacher.num_heads": "positive",
    "teacher.mlp_ratio": "positive", "teacher.num_steps": "positive",
    "teacher.learning_rate": "positive",
}
_RANGES = {"positive": (lambda v: v > 0, "must be > 0"),
           "nonneg": (lambda v: v >= 0, "must be >= 0"),
           "unit": (lambda v: 0 <= v <= 1, "must be in [0, 1]")}


def parse_feature_slices(spec: str) -> dict[str, str]:
  """``"attn_out=cosine,block_out=l1"`` → ``{"attn_out": "cosine", "block_out": "l1"}``.

  The value of ``config.distill.feature_slices``: slices from :data:`FEATURE_SLICES`, losses
  from :data:`FEATURE_LOSSES`. Raises ``ValueError`` naming the bad entry.
  """
  out = {}
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    name, _, kind = part.partition("=")
    if name not in FEATURE_SLICES or kind not in FEATURE_LOSSES:
      raise ValueError(f"config.distill.feature_slices entry {part!r} must be <slice>=<loss> "
                       f"with slice in {list(FEATURE_SLICES)} and loss in "
                       f"{list(FEATURE_LOSSES)}.")
    out[name] = kind
  if not out:
    raise ValueError("config.distill.feature_slices names no slice.")
  return out


def _validate_distill(f: dict[str, Any], need) -> None:
  """The ``distill`` block: enumerations, ranges, and what the distillation runner needs."""
  for field, check in _DISTILL_CHECKS.items():
    key = f"distill.{field}"
    if isinstance(check, tuple):
      _enum(f, key, check)
    else:
      ok, what = _RANGES[check]
      need(ok(f[key]), key, what)
  need(f["model.name"] == "gpt" and f["data.name"] in ("code", "prose", "text"), "data.name",
       "distillation needs model.name='gpt' and a single text corpus ('code', 'prose', 'text')")
  need(f["batch_size"] > 0, "batch_size", "distillation needs mini-batches (batch_size > 0)")
  need(f["grad_accum_steps"] == 1, "grad_accum_steps",
       "the distillation step does not accumulate gradients; use 1")
  method, fusion = f["distill.method"], f["distill.fusion"]
  need(method != "fused" or fusion != "fixed", "distill.fusion",
       "method='fused' needs a learned fusion, 'gated' or 'uncertainty' (method='temporal' is "
       "the same five terms with fixed weights)")
  k = len(METHOD_TERMS[method])
  need(fusion != "gated" or f["distill.gate.min_weight"] < 1.0 / k, "distill.gate.min_weight",
       f"must be below 1/K = {1.0 / k:.4g} for the K={k} terms of method {method!r}")
  need(not (f["distill.adaptive"] and f["probe.critical"]), "probe.critical",
       "distill.adaptive=True replaces the learning-rate scale by per-layer rates, which the "
       "λ_c probe cannot read; turn one of them off")
  need(f["schedule.warmup_steps"] < f["distill.teacher.num_steps"], "distill.teacher.num_steps",
       f"must exceed schedule.warmup_steps={f['schedule.warmup_steps']} (the teacher trains "
       "on the same schedule)")
  need(f["distill.controller.max_scale"] >= 1.0, "distill.controller.max_scale",
       "must be >= 1 (weights are clipped to [1/max_scale, max_scale])")
  parse_feature_slices(f["distill.feature_slices"])


def config_module(path: str):
  """The module of a config file, executed (its ``get_config`` not called)."""
  name = "_losslab_config_" + "".join(
      c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Load ``path/to/config.py[:arg]`` like ``--config`` does, apply ``overrides``, validate.

  ``overrides`` maps dotted keys (``"optimizer.learning_rate"``) to values; an unknown key
  raises ``ValueError`` naming it. Handy in notebooks and tests.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  module = config_module(path)
  config = module.get_config(arg) if arg else module.get_config()
  flat_known = flatten_config(config)
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
