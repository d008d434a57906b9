r"""Distillation: a tiny GPT teacher → a smaller GPT student on the stdlib code corpus (issue 4 §4).

The runner (``experiments.run``) sees the ``distill`` block and calls
``experiments.distillation.distill_and_evaluate``: the teacher (``distill.teacher``) is trained
first with the ordinary trainer into ``<workdir>/teacher`` — or loaded from the run directory
``distill.teacher_dir`` (its ``config.json`` and newest verified checkpoint) — then the student
(``model``) is distilled with the loss terms of ``distill.method``. The run writes
``metrics.jsonl`` (``distill/<term>``, ``eval/loss`` = student eval cross-entropy,
``eval/perplexity``), ``summary.json`` and ``plots/distill.png``.

Run one method (presets: ``ce``, ``hinton`` (default), ``features``, ``temporal``, ``fused``,
combinable with ``smoke``):

  python -m experiments.run --config=configs/distill.py:hinton --workdir=runs/distill_hinton
  python -m experiments.run --config=configs/distill.py:hinton,smoke --workdir=/tmp/d_smoke
  python -m experiments.run --config=configs/distill.py:ce \
      --config.distill.teacher_dir=runs/distill_hinton/teacher --workdir=runs/distill_ce

Compare all methods (teacher trained once, shared; prints the table, writes comparison.png):

  python -m experiments.distillation compare --workdir=/tmp/d_cmp              # smoke
  python -m experiments.distillation compare --workdir=runs/distill --extra=''  # full

Measured on this 2-core CPU shared with other jobs (load average ≈ 7), wall time including
start-up and JIT: ``hinton,smoke`` 59 s (30 s CPU; teacher 60 steps ≈ 26 s incl. its JIT,
student 60 steps ≈ 21 s); the smoke comparison of all five methods 108 s (teacher trained once).
Full presets were not timed.

Smoke comparison (seed 0, student 1×32 = 20k params, teacher 2×64 = 115k params, teacher eval
loss 2.397 / perplexity 10.99; 60 student steps, so differences are small and noisy):
ce 2.700 / 14.88, hinton 2.709 / 15.01, features 2.632 / 13.90, temporal 2.634 / 13.93,
fused 2.758 / 15.77 (eval cross-entropy nats/char / perplexity).
"""

import ml_collections

from experiments.config_lib import default_config

METHODS = ("ce", "hinton", "features", "temporal", "fused")


def get_config(arg: str = ""):
  """Config for ``arg`` = a comma list of presets: one method of METHODS (default 'hinton'),
  optionally 'smoke'."""
  presets = [p for p in arg.split(",") if p] if arg else []
  unknown = set(presets) - set(METHODS) - {"smoke", "full"}
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)} for distill.py; accepted: "
                     f"{list(METHODS)} and 'smoke'.")
  methods = [p for p in presets if p in METHODS]
  if len(methods) > 1:
    raise ValueError(f"choose one method preset, got {methods}.")
  smoke = "smoke" in presets

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
  c.checkpoint.every = 1_000_000  # teacher phase: save only at the end (the student reads it)
  c.checkpoint.async_save = False  # the student phase reads the checkpoint right away
  c.eval_every = 100  # student eval every N steps (and at the end)
  c.eval_examples = 256  # eval sequences
  c.log_every = 10  # metrics rows every N steps
  c.progress_bar = False  # no tqdm bar (teacher phase)
  c.plots = True  # plots/distill.png (and the teacher's own plots)

  with c.unlocked():
    c.distill = ml_collections.ConfigDict()
    d = c.distill
    d.method = methods[0] if methods else "hinton"  # 'ce', 'hinton', 'features', 'temporal',
    #   'fused' (which loss terms; see experiments.distillation)
    d.fusion = "fixed"  # 'fixed' weights below or 'uncertainty' (Kendall); 'fused' forces
    #   'uncertainty' over all five terms
    d.teacher_dir = ""  # "" = train the teacher into <workdir>/teacher; else a run directory
    #   written by the runner (config.json + checkpoints/) to load the teacher from
    d.temperature = 2.0  # softmax temperature T of the soft-target KL (T² factor explicit)
    d.alpha = 0.5  # fixed fusion: weight of hard-label CE; the KL gets 1 − alpha (Hinton)
    d.feature_weight = 0.1  # fixed fusion: weight of the feature loss
    d.smoothness_weight = 0.01  # fixed fusion: weight of the student's hidden-state smoothness
    d.attention_weight = 0.01  # fixed fusion: weight of the attention-evolution loss
    d.feature_slices = "attn_out=cosine,norm_out=cosine,pre_act=mmd,block_out=l1"  # slice=loss
    #   pairs of distill.FeatureDistiller (seed 001's defaults)
    d.attention_window = 4  # steps per attention-evolution matrix (current + 3 previous)
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
    c.eval_examples = 64  # eval sequences
    c.model.depth = 1  # student blocks
    c.model.width = 32  # student width
    c.model.num_heads = 2  # student heads
    c.distill.teacher.depth = 2  # teacher blocks
    c.distill.teacher.width = 64  # teacher width
    c.distill.teacher.num_steps = 60  # teacher steps
    c.plots = True  # keep the plot (checked by the tests)
  return c.lock()
