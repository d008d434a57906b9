r"""Data mixing: relative critical sharpness between code and prose (Kalra et al. 2026).

Kalra et al. 2026 (arXiv 2601.16979, Def. 5.1, Fig. 5) define the relative critical sharpness
λ_c^{i←j} = 2/η_c with η_c = min{η : L_i(θ − ηΔθ_j) > L_i(θ)}: task i's loss along the
unit-LR update Δθ_j of training on task j (or on a mix). A step of size η on j raises task i's
loss once λ_c^{i←j} > 2/η. Here a tiny GPT trains with AdamW on a 50/50 batch mix of Python
standard-library code and the Python reference manual's prose (one shared ASCII vocabulary).

What the online 2×2 matrix measures (``probe.relative_every``; rows: the monitored task i,
columns: the task j whose update is followed): at the mixed run's parameters θ_t, task i's
loss on ``probe.relative_batches`` fixed held-out batches of its evaluation split (median, min
and max logged as ``curv/relative/``, ``curv/relative_min/``, ``curv/relative_max/``; the
number of batches on which the update raises the loss at every step size as
``curv/relative_not_descent/``) along Δθ_j = the first step a fresh AdamW would take from
task j's gradient on its part of the training batch, g_j/(|g_j| + ε) + γθ — the authors'
virtual step from an empty optimizer state, as when fine-tuning on j alone starts from θ_t.
In the paper's terms it is Fig. 5's measurement (with a one-task "mix") repeated along the
mixed run; it says nothing about the mixed run's own step, whose λ_c is the in-chain probe
``curv/critical_sharpness``. Every entry, diagonal included, is measured on held-out batches
that took no part in Δθ_j, so diagonal and off-diagonal entries are comparable.

Run:

  python -m experiments.run --config=configs/data_mixing.py --workdir=runs/mixing
  python -m experiments.run --config=configs/data_mixing.py:smoke --workdir=/tmp/mixing_smoke

Presets: ``full`` (default), ``smoke``, ``pretrain`` (the code-only pre-training of Fig. 5's
reproduction, ``python -m experiments.reproduce --name=mixing``; combine as
``pretrain,smoke``).

Observed (seed 0, ``full``, 600 steps, 5 min 20 s on the shared 2-core CPU): every entry
rises from ≈ 10–30 at step 0 to 10³–10⁴ by step 40 and stays there, above the mixed run's 2/η
and its own λ_c (median 197, 5–95 % 135–382 after step 40), because a first Adam step moves
every coordinate by η; a cross entry is a median 1.8–1.9× its row's diagonal entry (10–90 %:
1.1–5.4×), and in 20 of 62 cross measurements the other task's step raises the held-out loss
at every step size on at least one of the 4 batches (``not_descent``: 11 code along prose,
9 prose along code).
"""

from experiments.config_lib import default_config

PRESETS = ("full", "smoke", "pretrain")  # listed by `experiments.run --help`


def get_config(arg: str = ""):
  """Config for ``arg`` = 'full' (default), 'smoke', 'pretrain', or 'pretrain,smoke'."""
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
  c.probe.relative_every = 20  # the 2×2 matrix every 20 steps: 2 update gradients, then per
  #   held-out batch 2 gradients and 4 searches
  c.probe.relative_batches = 4  # held-out batches per task (eval_examples cut into 4 of 64)
  c.probe.preconditioned_every = 0  # off here (see olmo_style.py)
  c.probe.lanczos_every = 0  # off

  c.log_every = 1  # a metrics row every step
  c.eval_every = 50  # held-out code and prose loss every 50 steps
  c.eval_examples = 256  # held-out sequences per task and evaluation

  if "pretrain" in presets:  # Fig. 5's pre-trained checkpoint: the same GPT on code alone
    c.data.name = "code"  # stdlib .py only (the ASCII vocabulary keeps prose readable later)
    c.data.eval_fraction = 0.1  # 10 % held out: 8 held-out batches of 64 prose sequences
    c.probe.critical = False  # no probes: only the final checkpoint is used
    c.probe.relative_every = 0  # (needs the mix)
    c.monitor.enabled = False  # nothing to decide: the run always ends at num_steps
    c.checkpoint.every = c.num_steps  # the end of the run is always saved
    c.eval_every = 100  # held-out code loss every 100 steps
    c.log_every = 10  # a metrics row every 10 steps

  if "smoke" in presets:
    c.num_steps = 30  # a few seconds
    c.batch_size = 8  # 4 code + 4 prose sequences
    c.data.max_chars = 100_000  # small corpora
    c.data.context_length = 32  # short sequences
    c.model.width = 32  # narrow model
    c.model.depth = 1  # one block
    c.schedule.warmup_steps = 5  # short warmup
    c.probe.relative_every = 0 if "pretrain" in presets else 10  # three matrices
    c.eval_every = 10  # three evaluations
    c.eval_examples = 32  # small eval batches
  return c
