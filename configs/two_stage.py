r"""Two-stage training in miniature: pre-training on code, then mid-training on a code/prose mix.

Kalra et al. 2026 (arXiv 2601.16979, Fig. 4) measure the critical sharpness λ_c of the public
OLMo-2 7B checkpoints (Walsh et al. 2025, arXiv 2501.00656) after training: stage 1 (pre-
training: warmup, then a cosine decay towards 0.1× the peak learning rate) and stage 2 (mid-
training on a new mix, about half of it pre-training data, with the learning rate decayed
linearly to zero). λ_c falls fast early in training, then rises steadily through both stages.

Here a tiny GPT trains with AdamW on the Python standard library's code (stage 1: warmup, then
``schedule.name='two_stage'``'s cosine to ``stage1_end_fraction`` = 0.1× the peak), and from
``data.switch_step`` (the last ``decay_fraction`` of the run) on a 50/50 mix of code and the
Python reference manual's prose while the learning rate falls linearly to zero. One run holds
both stages: the schedule and the data change at the same step, the parameters and optimizer
state carry on, and a resume on either side of the switch continues the same batches. No probe
runs during training: checkpoints are kept every ``checkpoint.every`` steps, and λ_c is measured
afterwards on them:

  python -m experiments.run --config=configs/two_stage.py --workdir=runs/two_stage
  python -m experiments.measure --workdir=runs/two_stage --batches=4

or all of it, for three seeds, judged against the paper's shape:
``python -m experiments.reproduce --name=two_stage --workdir=runs/repro_two_stage``.

Changing ``num_steps`` or ``schedule.decay_fraction`` moves the stage boundary: set
``data.switch_step`` to the new one (the error message names it).

Presets: ``full`` (default), ``smoke`` (seconds).
Measured on this 2-core CPU, shared with other jobs (load average 11–15): the reproduction
(3 seeds × 600 steps, 120 checkpoints each measured on 4 held-out batches) took 20 min wall,
9.5 min of CPU time (user + sys).

Observed (seeds 0–2, 117k parameters): λ_c ≈ 10 at step 5 (the initialisation is flat), a peak
of 160–1,200 at steps 15–25, a fall to ≈ 45–85 by steps 80–110 while η is at its peak, then a
steady rise (×3.2–5.1) through the rest of stage 1 and through stage 2 (×1.7–2.3 from its first
to its last checkpoint), to windowed medians of 190–270 at the end.
"""

from experiments.config_lib import decay_start
from experiments.config_lib import default_config

PRESETS = ("full", "smoke")  # listed by `experiments.run --help`


def get_config(arg: str = ""):
  """Config for ``arg`` = 'full' (default) or 'smoke'."""
  presets = [p for p in arg.split(",") if p] if arg else []
  unknown = set(presets) - set(PRESETS)
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)} for two_stage.py; "
                     f"accepted: {', '.join(map(repr, PRESETS))}.")
  c = default_config()
  c.seed = 0  # model init, data shuffles
  c.num_steps = 600  # optimizer steps, both stages
  c.batch_size = 32  # sequences per step
  c.grad_accum_steps = 1  # no accumulation needed at this size
  c.loss = "cross_entropy"  # next-character prediction

  c.data.name = "code"  # stage 1: the Python standard library's .py sources
  c.data.code_fraction = 0.5  # stage 2: half code (the pre-training data), half prose
  c.data.max_chars = 1_000_000  # characters read per corpus (prose has ~465k in all)
  c.data.context_length = 64  # characters per sequence
  c.data.eval_fraction = 0.05  # last 5% of each corpus held out
  c.data.vocab = "ascii"  # one fixed vocabulary for both corpora

  c.model.name = "gpt"  # decoder-only transformer, pre-LayerNorm
  c.model.depth = 2  # blocks
  c.model.width = 64  # model dimension
  c.model.num_heads = 4  # attention heads
  c.model.mlp_ratio = 4  # MLP hidden = 4 × width

  c.optimizer.name = "adamw"  # Adam with decoupled weight decay, as OLMo
  c.optimizer.learning_rate = 1e-2  # peak η (the best final held-out loss of 3e-3, 1e-2, 2e-2)
  c.optimizer.b1 = 0.9  # first-moment decay
  c.optimizer.b2 = 0.95  # OLMo's β₂
  c.optimizer.eps = 1e-8  # Adam's ε
  c.optimizer.weight_decay = 0.1  # decoupled, matrices only
  c.optimizer.grad_clip = 0.0  # off: the offline λ_c follows the optimizer's own update

  c.schedule.name = "two_stage"  # cosine to stage1_end_fraction·η, then linear to end_fraction·η
  c.schedule.warmup_steps = 60  # linear warmup (10 % of the run)
  c.schedule.stage1_end_fraction = 0.1  # stage 1 ends at 0.1 × the peak, as OLMo-2's cosine
  c.schedule.decay_fraction = 0.25  # the last 25 % of the run is stage 2
  c.schedule.decay_shape = "linear"  # stage 2: linear ...
  c.schedule.end_fraction = 0.0  # ... to zero

  c.probe.critical = False  # nothing measured during training: λ_c comes from the checkpoints
  c.probe.step_guess = 1e-2  # first η_c guess of experiments.measure's searches
  c.probe.preconditioned_every = 0  # off
  c.probe.lanczos_every = 0  # off

  c.checkpoint.every = 5  # dense checkpoints (120), so the early fall is resolved
  c.checkpoint.keep_preliminary = -1  # keep every one (measured afterwards)
  c.monitor.enabled = False  # no convergence monitor: every save stays a plain checkpoint

  c.log_every = 1  # a metrics row every step
  c.eval_every = 50  # held-out code loss every 50 steps
  c.eval_examples = 256  # held-out sequences per evaluation
  c.plots = False  # the figure is the offline one (experiments.measure)

  if "smoke" in presets:
    c.num_steps = 24  # a few seconds
    c.batch_size = 8  # sequences per step (4 code + 4 prose in stage 2)
    c.data.max_chars = 100_000  # small corpora
    c.data.context_length = 32  # short sequences
    c.model.width = 32  # narrow model
    c.model.depth = 1  # one block
    c.schedule.warmup_steps = 3  # short warmup
    c.checkpoint.every = 4  # six checkpoints
    c.eval_every = 8  # three evaluations
    c.eval_examples = 32  # small eval batch
  c.data.switch_step = decay_start(c)  # the data changes with the learning rate (stage 2)
  return c
