r"""Data mixing: relative critical sharpness between code and prose while training on a mix.

Kalra et al. 2026 (arXiv 2601.16979) use relative critical sharpness to choose data mixtures:
λ_c^{i→j} = 2/η_c with η_c = min{η : L_i(θ − ηΔθ_j) > L_i(θ)}, the loss of task i along the
unit-LR update Δθ_j computed from task j's gradient alone. A step of size η on task j raises
task i's loss once λ_c^{i→j} > 2/η. Here a tiny GPT trains with AdamW on a 50/50 batch mix of
Python standard-library code and the Python reference manual's prose (one shared character
vocabulary). Every ``probe.relative_every`` steps the 2×2 matrix is measured (rows: the
monitored loss, columns: the task whose update is followed; the diagonal is each task's
ordinary λ_c along its own update) and plotted over time in ``plots/relative_sharpness.png``.

Run:

  python -m experiments.run --config=configs/data_mixing.py --workdir=runs/mixing
  python -m experiments.run --config=configs/data_mixing.py:smoke --workdir=/tmp/mixing_smoke

Presets: ``full`` (default), ``smoke``.
Measured on this 2-core CPU, shared with other jobs (load average ≈ 4), wall time including
start-up: full 132 s (600 steps, matrix every 20 steps); smoke 17 s.

Observed (seed 0): the diagonal (each task's λ_c along its own update) behaves like the
ordinary λ_c (~100–200, rising at the end); the off-diagonal entries are orders of magnitude
larger and erratic, and in ~20% of measurements the other task's update raises the monitored
loss at every step size (marked ✕ in the plot): code and prose updates barely help each other.
"""

from experiments.config_lib import default_config

PRESETS = ("full", "smoke")  # listed by `experiments.run --help`


def get_config(arg: str = ""):
  """Config for ``arg`` = 'full' (default) or 'smoke'."""
  presets = [p for p in arg.split(",") if p] if arg else []
  unknown = set(presets) - set(PRESETS)
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)} for data_mixing.py; "
                     f"accepted: {', '.join(map(repr, PRESETS))}.")
  c = default_config()
  c.seed = 0  # model init, data shuffles, probe start vectors
  c.num_steps = 600  # optimizer steps
  c.batch_size = 32  # sequences per step, split between the tasks
  c.grad_accum_steps = 1  # no accumulation needed at this size
  c.loss = "cross_entropy"  # next-character prediction

  c.data.name = "mix"  # code (stdlib .py) and prose (pydoc topics) side by side
  c.data.code_fraction = 0.5  # half of every batch (and of the loss) is code
  c.data.max_chars = 1_000_000  # characters read per corpus (prose has ~465k in all)
  c.data.context_length = 64  # characters per sequence
  c.data.eval_fraction = 0.05  # last 5% of each corpus held out
  c.data.vocab = "ascii"  # one fixed vocabulary for both tasks

  c.model.name = "gpt"  # decoder-only transformer, pre-LayerNorm
  c.model.depth = 2  # blocks
  c.model.width = 64  # model dimension
  c.model.num_heads = 4  # attention heads
  c.model.mlp_ratio = 4  # MLP hidden = 4 × width

  c.optimizer.name = "adamw"  # Adam with decoupled weight decay
  c.optimizer.learning_rate = 3e-3  # peak η
  c.optimizer.b1 = 0.9  # momentum of the first moment
  c.optimizer.b2 = 0.95  # second-moment decay
  c.optimizer.eps = 1e-8  # Adam's ε
  c.optimizer.weight_decay = 0.1  # decoupled, matrices only
  c.optimizer.grad_clip = 0.0  # off: the probes measure the optimizer's own update

  c.schedule.name = "warmup_stable_decay"  # WSD, as in the olmo_style runs
  c.schedule.warmup_steps = 60  # linear warmup
  c.schedule.decay_fraction = 0.25  # last 25% decays
  c.schedule.decay_shape = "linear"  # linear decay
  c.schedule.end_fraction = 0.0  # to zero

  c.probe.critical = True  # λ_c of the mixed loss along the mixed update, every step
  c.probe.every = 1  # every step
  c.probe.step_guess = 1e-2  # first η_c guess
  c.probe.relative_every = 20  # the 2×2 matrix every 20 steps (2 gradients + 4 searches)
  c.probe.preconditioned_every = 0  # off here (see olmo_style.py)
  c.probe.lanczos_every = 0  # off

  c.log_every = 1  # a metrics row every step
  c.eval_every = 50  # held-out code and prose loss every 50 steps
  c.eval_examples = 256  # held-out sequences per task and evaluation

  if "smoke" in presets:
    c.num_steps = 30  # a few seconds
    c.batch_size = 8  # 4 code + 4 prose sequences
    c.data.max_chars = 100_000  # small corpora
    c.data.context_length = 32  # short sequences
    c.model.width = 32  # narrow model
    c.model.depth = 1  # one block
    c.schedule.warmup_steps = 5  # short warmup
    c.probe.relative_every = 10  # three matrices
    c.eval_every = 10  # three evaluations
    c.eval_examples = 32  # small eval batches
  return c
