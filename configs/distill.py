r"""Distillation: a tiny GPT teacher → a smaller GPT student on the stdlib code corpus.

The runner (``experiments.run``) sees the ``distill`` block and calls
``experiments.distillation.distill_and_evaluate``: the teacher (``distill.teacher``) is trained
first with the ordinary trainer into ``<workdir>/teacher`` — or loaded from the run directory
``distill.teacher_dir`` (its ``config.json`` and newest verified checkpoint) — then the student
(``model``) is distilled with the loss terms of ``distill.method``. The run writes
``metrics.jsonl`` (``distill/<term>``, ``eval/loss`` = student eval cross-entropy,
``eval/perplexity``), ``summary.json`` and ``plots/distill.png``.

Run one method (presets: ``ce``, ``hinton`` (default), ``features``, ``temporal``, ``fused``,
combinable with ``adaptive`` (the controller of distill._strategy on) and ``smoke``):

  python -m experiments.run --config=configs/distill.py:hinton --workdir=runs/distill_hinton
  python -m experiments.run --config=configs/distill.py:hinton,smoke --workdir=/tmp/d_smoke
  python -m experiments.run --config=configs/distill.py:temporal,adaptive --workdir=runs/d_adapt
  python -m experiments.run --config=configs/distill.py:ce \
      --config.distill.teacher_dir=runs/distill_hinton/teacher --workdir=runs/distill_ce

``fused`` weighs the five terms of ``temporal`` with the gating network ``distill.GatedFusion``
(``distill.fusion='gated'``, trained jointly with the student; ``--config.distill.fusion=
uncertainty`` selects Kendall weighting instead). The student phase checkpoints every
``checkpoint.every`` steps and at the end; re-running a command on the same workdir resumes it
(metrics identical to an uninterrupted run).

Compare all methods (teacher trained once, shared; prints the table, writes comparison.png):

  python -m experiments.distillation compare --workdir=/tmp/d_cmp              # smoke
  python -m experiments.distillation compare --workdir=runs/distill --extra=''  # full

Full comparison (``compare --workdir=/tmp/distill_full --extra=''``, seed 0; student 2×64 =
117k params, teacher 4×128 = 827k params trained 600 steps; 400 student steps of 32 × 64
characters; eval on 256 held-out sequences; the figure is
experiments/figures/distill_comparison.png):

  preset              eval loss  perplexity  accuracy  student s
  ce                     1.8934       6.642    0.5256       38.7
  hinton                 1.8003       6.051    0.5443       75.0
  features               1.8120       6.123    0.5427      147.0
  temporal               1.7502       5.756    0.5560      156.2
  fused (gated)          1.8478       6.346    0.5264      182.2
  temporal+adaptive      1.7501       5.755    0.5560      127.4
  teacher                1.6041       4.973

Wall times on this 2-core CPU shared with other jobs (load average 5–8 for most of the run):
the whole comparison 15 min 17 s (880 s user + 218 s system CPU; /usr/bin/time -v), of which the
teacher 180 s (600 steps incl. JIT) and each student phase the seconds above (incl. JIT and
checkpoints; the last rows ran after the load dropped). A first attempt with the seed's
``pre_act=mmd`` was stopped: MMD's backward over the 2,048 positions of a full batch took ~97 s
a step here (a slow XLA:CPU path for the einsum over kernels in ``distill.mmd``: one kernel
matrix's gradient took 14.1 s, 0.05 s with the sum over kernels unrolled), so the full preset
uses ``pre_act=cosine``; smoke keeps ``mmd``. ``distill.mmd`` now sums the kernels term by term
(fixed after this comparison); the seed's slice is back with
``--config.distill.feature_slices=attn_out=cosine,norm_out=cosine,pre_act=mmd,block_out=l1``,
not re-measured here.

Reading: every distillation method beats CE alone. Hinton's soft targets give −0.093 nats; the
feature terms alone (``features``, with a 0.1 weight) add nothing on top of Hinton (+0.012),
while adding the temporal terms does (``temporal`` −0.062 below ``features``, −0.050 below
Hinton). ``fused`` beats CE (−0.046) but loses to every fixed mix with the teacher: the gate
minimises the very objective it weighs, so its gradient on the gate logits,
:math:`g_i(L_i - \sum_j g_j L_j)`, moves weight onto the smallest term. By step ~100 the
smoothness penalty (≈ 0.01) holds 0.8 and the other four sit on the floor ``gate.min_weight``
= 0.05, for every sequence alike; the student is then trained on an equal mix of ce, kd,
features and attention, where the feature loss (the largest term, ≈ 2.3) weighs as much as the
labels (the documented caveat of distill/_fusion.py; ``gate.entropy_weight`` or normalised
terms would be the places to change that, not tried here). ``temporal+adaptive`` made no
decision in 39 evaluations (its controller_audit.jsonl is empty): the eval − train CE gap
stayed negative (≤ −0.010: the held-out end of the stdlib is easier), the layer-gradient
spread ≤ 3.8 < 4, the relative updates ≥ 4.6e-4 > 1e-4, and over the last ten evaluations the
eval loss still moved by 3.1% (the rule needs 0.3%), so no stage transition. Its 1.2e-4
difference from ``temporal`` is float32 rounding of the clip norm and per-group learning rates
(in the smoke comparison the two are bit-identical).

Smoke comparison (seed 0, student 1×32 = 20k params, teacher 2×64 = 115k params, teacher eval
loss 2.397 / perplexity 10.99; 60 student steps, so differences are small and noisy; 5 min
wall for all six under load ≈ 6, 158 s CPU): ce 2.700 / 14.88, hinton 2.709 / 15.01,
features 2.632 / 13.90, temporal 2.634 / 13.93, fused (gated) 2.869 / 17.61,
temporal+adaptive 2.634 / 13.93 (eval cross-entropy nats/char / perplexity).
"""

import ml_collections

from experiments.config_lib import default_config

METHODS = ("ce", "hinton", "features", "temporal", "fused")
MODIFIERS = ("adaptive", "smoke")
PRESETS = METHODS + MODIFIERS  # listed by `experiments.run --help`


def get_config(arg: str = ""):
  """Config for ``arg`` = a comma list of presets: one method of METHODS (default 'hinton'),
  optionally 'adaptive' (the controller on) and 'smoke' (tiny and fast)."""
  presets = [p for p in arg.split(",") if p] if arg else []
  unknown = set(presets) - set(PRESETS)
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)} for distill.py; accepted: one of "
                     f"{list(METHODS)} plus any of {list(MODIFIERS)}.")
  methods = [p for p in presets if p in METHODS]
  if len(methods) > 1:
    raise ValueError(f"choose one method preset, got {methods}.")
  smoke = "smoke" in presets
  method = methods[0] if methods else "hinton"

  c = default_config()
  c.seed = 0  # model inits, data split and shuffle
  c.num_steps = 400  # student optimizer steps
  c.batch_size = 32  # sequences per step (student and teacher)
  c.grad_accum_steps = 1  # the distillation step does not accumulate
  c.loss = "cross_entropy"  # next-character prediction (teacher phase; student CE term)

  c.data.name = "code"  # Python standard-library sources
  c.data.max_chars = 1_000_000  # characters read from the corpus
  c.data.context_length = 64  # characters per sequence
  c.data.eval_fraction = 0.05  # last 5% held out for evaluation
  c.data.vocab = "ascii"  # fixed 98-id vocabulary (teacher and student share it)

  c.model.name = "gpt"  # the student: decoder-only transformer
  c.model.depth = 2  # student blocks
  c.model.width = 64  # student model dimension
  c.model.num_heads = 4  # student attention heads
  c.model.mlp_ratio = 4  # student MLP hidden = 4 × width

  c.optimizer.name = "adamw"  # AdamW for the student (and the teacher phase)
  c.optimizer.learning_rate = 3e-3  # student peak η
  c.optimizer.b1 = 0.9  # first-moment decay
  c.optimizer.b2 = 0.95  # second-moment decay
  c.optimizer.weight_decay = 0.01  # decoupled weight decay on matrices
  c.optimizer.grad_clip = 1.0  # global-norm clipping

  c.schedule.name = "warmup_cosine"  # linear warmup, cosine decay
  c.schedule.warmup_steps = 20  # warmup length
  c.schedule.end_fraction = 0.1  # final η as a fraction of the peak

  c.probe.critical = False  # λ_c probe in the optax chain (True: costly, ~10-40 loss evals/step)

  c.monitor.enabled = False  # the convergence monitor (teacher phase) is not needed here
  c.checkpoint.every = 100  # student and teacher phase: save every N steps and at the end; a
  #   re-run on the same workdir resumes from the newest checkpoint
  c.checkpoint.async_save = False  # the student phase reads the teacher's checkpoint right away
  c.eval_every = 100  # student eval every N steps (and at the end)
  c.eval_examples = 256  # eval sequences
  c.log_every = 10  # metrics rows every N steps
  c.progress_bar = False  # no tqdm bar (teacher phase)
  c.plots = True  # plots/distill.png (and the teacher's own plots)

  with c.unlocked():
    c.distill = ml_collections.ConfigDict()
    d = c.distill
    d.method = method  # 'ce', 'hinton', 'features', 'temporal', 'fused' (which loss terms;
    #   see experiments.distillation)
    d.fusion = "gated" if method == "fused" else "fixed"  # 'fixed' (the weights below),
    #   'uncertainty' (Kendall et al.) or 'gated' (distill.GatedFusion: a gating MLP from runtime
    #   features to softmax weights, trained with the student); 'fused' needs a learned one
    d.teacher_dir = ""  # "" = train the teacher into <workdir>/teacher; else a run directory
    #   written by the runner (config.json + checkpoints/) to load the teacher from
    d.temperature = 2.0  # softmax temperature T of the soft-target KL (T² factor explicit)
    d.alpha = 0.5  # fixed fusion: weight of hard-label CE; the KL gets 1 − alpha (Hinton)
    d.feature_weight = 0.1  # fixed fusion: weight of the feature loss
    d.smoothness_weight = 0.01  # fixed fusion: weight of the student's hidden-state smoothness
    d.attention_weight = 0.01  # fixed fusion: weight of the attention-evolution loss
    d.feature_slices = "attn_out=cosine,norm_out=cosine,pre_act=cosine,block_out=l1"  # slice=
    #   loss pairs of distill.FeatureDistiller: seed 001's defaults but pre_act=cosine instead of
    #   mmd, whose backward at the 2,048 positions of a full batch took ~97 s a step on this CPU
    #   before distill.mmd was fixed (the table above was measured with cosine); smoke keeps mmd
    d.attention_window = 4  # steps per attention-evolution matrix (current + 3 previous)
    d.gate = ml_collections.ConfigDict()  # fusion='gated' (distill.GatedFusion)
    d.gate.hidden = 32  # hidden width of the gating MLP
    d.gate.min_weight = 0.05  # floor on every term's weight (< 1/K): no term is starved
    d.gate.temperature = 1.0  # softmax temperature of the gate
    d.gate.entropy_weight = 0.0  # bonus on the entropy of the weights (0 = none)
    d.adaptive = "adaptive" in presets  # the adaptive controller (distill.adaptive_controller)
    d.controller = ml_collections.ConfigDict()  # adaptive=True (see experiments.distillation)
    d.controller.every = 10  # steps between controller evaluations (fixed eval batch + interval)
    d.controller.window = 10  # stage transition: evaluations the core metrics must stay ...
    d.controller.rtol = 0.003  # ... within this fraction of their mean (0.3%)
    d.controller.num_stages = 3  # stages 0..2
    d.controller.stage_decay = 0.5  # each stage multiplies the non-CE terms by this
    d.controller.gap_threshold = 0.1  # eval CE − train CE above this (nats) raises the kd weight
    d.controller.gap_factor = 1.25  # ... by this factor per evaluation
    d.controller.max_scale = 4.0  # controller weights stay in [1/max_scale, max_scale]
    d.controller.clip_spread = 4.0  # per-layer clipping when max/mean layer grad norm exceeds this
    d.controller.stall_ratio = 1e-4  # a layer group whose ‖Δθ‖/‖θ‖ per step stays below this ...
    d.controller.stall_patience = 3  # ... for this many evaluations restarts its LR schedule
    d.teacher = ml_collections.ConfigDict()
    d.teacher.depth = 4  # teacher blocks
    d.teacher.width = 128  # teacher model dimension
    d.teacher.num_heads = 4  # teacher attention heads
    d.teacher.mlp_ratio = 4  # teacher MLP hidden = 4 × width
    d.teacher.num_steps = 600  # teacher optimizer steps (trained with the base optimizer)
    d.teacher.learning_rate = 3e-3  # teacher peak η

  if smoke:
    c.num_steps = 60  # student steps
    c.batch_size = 8  # sequences per step
    c.data.max_chars = 200_000  # a smaller corpus slice
    c.data.context_length = 32  # shorter sequences
    c.schedule.warmup_steps = 5  # shorter warmup
    c.eval_every = 30  # two evals and the final one
    c.checkpoint.every = 30  # checkpoints at 30 and 60
    c.distill.feature_slices = "attn_out=cosine,norm_out=cosine,pre_act=mmd,block_out=l1"  # the
    #   seed's defaults (MMD over 8 × 32 = 256 positions is cheap)
    c.distill.controller.every = 5  # 11 controller evaluations
    c.eval_examples = 64  # eval sequences
    c.model.depth = 1  # student blocks
    c.model.width = 32  # student width
    c.model.num_heads = 2  # student heads
    c.distill.teacher.depth = 2  # teacher blocks
    c.distill.teacher.width = 64  # teacher width
    c.distill.teacher.num_steps = 60  # teacher steps
    c.plots = True  # keep the plot (checked by the tests)
  return c.lock()
