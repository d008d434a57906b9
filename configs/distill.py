r"""Distillation: a tiny GPT teacher → a smaller GPT student on the stdlib code corpus.

  python -m experiments.run --config=configs/distill.py:hinton --workdir=runs/distill_hinton
  python -m experiments.run --config=configs/distill.py:hinton,smoke --workdir=/tmp/d_smoke
  python -m experiments.run --config=configs/distill.py:temporal,adaptive --workdir=runs/d_adapt
  python -m experiments.run --config=configs/distill.py:ce \
      --config.distill.teacher_dir=runs/distill_hinton/teacher --workdir=runs/distill_ce
  python -m experiments.run --config=configs/distill.py --compare=all --workdir=runs/distill
  python -m experiments.run --config=configs/distill.py:smoke --compare=ce,hinton --workdir=/tmp/c

The ``distill`` block makes ``experiments.run`` call ``experiments.distillation``: the teacher
(``distill.teacher``: 4 blocks × 128, 600 steps) is trained first into ``<workdir>/teacher`` —
or loaded from the run directory ``distill.teacher_dir`` — then the student (``model``: 2 × 64)
is distilled for ``num_steps`` with the loss terms of ``distill.method``. Every field of the
``distill`` block is described in ``experiments.config_lib`` (``_distill_fields``).

Presets: one method — ``ce`` (hard labels only), ``hinton`` (default: ce + T²·KL),
``features`` (+ ``distill.FeatureDistiller``), ``temporal`` (+ smoothness + attention
evolution, fixed weights), ``fused`` (temporal's five terms weighed by the gating network
``distill.GatedFusion``; ``--config.distill.fusion=uncertainty`` selects Kendall weighting) —
plus any of ``adaptive`` (the controller of ``distill.adaptive_controller``) and ``smoke``
(1 × 32 student, 2 × 64 teacher, 60 steps of 8 × 32 characters, MMD on the FFN
pre-activation; what the tests run). ``--compare=all`` runs the presets of :data:`COMPARE`
(``a+b`` combines presets) into ``<workdir>/<preset>``, training the teacher once, and writes
``comparison.json`` and ``comparison.png``.

The full presets reproduce this table (``--compare=all``, seed 0; student 117k params,
teacher 827k; 400 student steps of 32 × 64 characters; eval on 256 held-out sequences; the
feature slices use cosine on the FFN pre-activation):

  preset              eval loss  perplexity  accuracy
  ce                     1.8934       6.642    0.5256
  hinton                 1.8003       6.051    0.5443
  features               1.8120       6.123    0.5427
  temporal               1.7502       5.756    0.5560
  fused (gated)          1.8478       6.346    0.5264
  temporal+adaptive      1.7501       5.755    0.5560
  teacher                1.6041       4.973

Every method beats CE; the fixed Hinton + feature + temporal mix is best; the gate, which
minimises the objective it weighs, moves its weight onto the smallest term (smoothness) and
loses to the fixed mixes; the controller makes no decision at this length, so
``temporal+adaptive`` equals ``temporal`` up to float32 rounding.
"""

from experiments.config_lib import default_config

METHODS = ("ce", "hinton", "features", "temporal", "fused")
MODIFIERS = ("adaptive", "smoke")
PRESETS = METHODS + MODIFIERS  # listed by `experiments.run --help`
COMPARE = METHODS + ("temporal+adaptive",)  # what `experiments.run --compare=all` runs


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

  c = default_config(distill=True)  # every field, the distill block's too: experiments.config_lib
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

  d = c.distill
  d.method = method  # which loss terms
  d.fusion = "gated" if method == "fused" else "fixed"  # 'fused' needs a learned fusion
  d.adaptive = "adaptive" in presets  # the adaptive controller
  d.feature_slices = "attn_out=cosine,norm_out=cosine,pre_act=cosine,block_out=l1"  # the
  #   measured table's slices (smoke keeps the schema's pre_act=mmd)
  d.teacher.depth = 4  # teacher blocks
  d.teacher.width = 128  # teacher model dimension
  d.teacher.num_steps = 600  # teacher optimizer steps
  d.teacher.learning_rate = 3e-3  # teacher peak η

  if smoke:
    _smoke(c)
  return c.lock()


def _smoke(c) -> None:
  """The ``smoke`` preset: tiny models and a short run (what the tests use)."""
  c.num_steps = 60  # student steps
  c.batch_size = 8  # sequences per step
  c.data.max_chars = 200_000  # a smaller corpus slice
  c.data.context_length = 32  # shorter sequences
  c.schedule.warmup_steps = 5  # shorter warmup
  c.eval_every = 30  # two evals and the final one
  c.checkpoint.every = 30  # checkpoints at 30 and 60
  c.distill.feature_slices = "attn_out=cosine,norm_out=cosine,pre_act=mmd,block_out=l1"  # MMD
  #   (median-heuristic bandwidths) on the FFN pre-activation
  c.distill.controller.every = 5  # 11 controller evaluations
  c.eval_examples = 64  # eval sequences
  c.model.depth = 1  # student blocks
  c.model.width = 32  # student width
  c.model.num_heads = 2  # student heads
  c.distill.teacher.depth = 2  # teacher blocks
  c.distill.teacher.width = 64  # teacher width
  c.distill.teacher.num_steps = 60  # teacher steps
  c.plots = True  # keep the plot (checked by the tests)
