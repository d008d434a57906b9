r"""OLMo-style pre-training in miniature: a tiny GPT with AdamW on Python source code.

Kalra et al. 2026 (arXiv 2601.16979) follow the critical sharpness λ_c and the preconditioned
sharpness λ^PH of GPT models through warmup–stable–decay (WSD) and cosine schedules: λ^PH is
pushed down during warmup, sits at its threshold (2+2β₁)/((1−β₁)η) = 38/η in the stable phase
and rises when the learning rate decays; λ_c tracks it, oscillating below 2/η, and rises
(progressive sharpening) as training goes on. Both thresholds are drawn from the learning rate
actually used at each step.

Run:

  python -m experiments.run --config=configs/olmo_style.py:wsd --workdir=runs/olmo_wsd
  python -m experiments.run --config=configs/olmo_style.py:cosine --workdir=runs/olmo_cosine
  python -m experiments.run --config=configs/olmo_style.py:wsd,smoke --workdir=/tmp/olmo_smoke

Presets (comma-separated): ``wsd`` (default) or ``cosine``; ``fig3`` (with wsd) is Kalra et al.
2026's Fig. 3 in miniature, 32,768 tokens per step by gradient accumulation, run by
``python -m experiments.reproduce --name=adamw_wsd --workdir=DIR``; ``smoke`` shrinks everything.
Measured on this 2-core CPU, shared with other jobs (load average ≈ 4), wall time including
start-up: wsd 95 s quiet / 127 s busy; cosine 177 s busy (600 steps, 5–7 steps/s, λ^PH every
25 steps); smoke 20 s
(up to ~40 s when busy; most of it compiles the train step and the Lanczos loop).

Observed (seed 0, 117k parameters, batch 32): λ^PH falls during warmup to ~4,000, stays flat
through the stable phase at ~0.3 × 38/η (mini-batch training equilibrates below the full-batch
threshold) and rises as η decays; λ_c rises with it (progressive sharpening: ~120 → ~200 in
the stable phase, ~400 (WSD) / ~700 (cosine) at the end), always below 2/η.
"""

from experiments.config_lib import default_config

PRESETS = ("wsd", "cosine", "fig3", "smoke")  # combined with commas; listed by `experiments.run --help`


def get_config(arg: str = ""):
  """Config for ``arg`` = comma-separated presets: 'wsd' (default), 'cosine', 'fig3', 'smoke'."""
  presets = [p for p in arg.split(",") if p] if arg else []
  unknown = set(presets) - set(PRESETS)
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)} for olmo_style.py; "
                     f"accepted: {', '.join(map(repr, PRESETS))} (comma-separated).")
  c = default_config()
  c.seed = 0  # model init, data shuffle, Lanczos start vectors
  c.num_steps = 600  # optimizer steps
  c.batch_size = 32  # sequences per step (mini-batch training)
  c.grad_accum_steps = 1  # no accumulation needed at this size
  c.loss = "cross_entropy"  # next-character prediction

  c.data.name = "code"  # the Python standard library's .py sources
  c.data.max_chars = 2_000_000  # characters read (sorted file order)
  c.data.context_length = 64  # characters per sequence
  c.data.eval_fraction = 0.05  # last 5% of the corpus held out
  c.data.vocab = "ascii"  # shared fixed vocabulary (98 ids)

  c.model.name = "gpt"  # decoder-only transformer, pre-LayerNorm
  c.model.depth = 2  # blocks
  c.model.width = 64  # model dimension
  c.model.num_heads = 4  # attention heads
  c.model.mlp_ratio = 4  # MLP hidden = 4 × width

  c.optimizer.name = "adamw"  # Adam with decoupled weight decay, as OLMo
  c.optimizer.learning_rate = 3e-3  # peak η
  c.optimizer.b1 = 0.9  # threshold (2+2β₁)/((1−β₁)η) = 38/η
  c.optimizer.b2 = 0.95  # OLMo's β₂
  c.optimizer.eps = 1e-8  # Adam's ε
  c.optimizer.weight_decay = 0.1  # decoupled, matrices only
  c.optimizer.grad_clip = 0.0  # off: clipping would change the update the probe measures

  c.schedule.name = "warmup_stable_decay"  # WSD
  c.schedule.warmup_steps = 60  # linear warmup (10% of the run)
  c.schedule.decay_fraction = 0.25  # last 25% decays
  c.schedule.decay_shape = "linear"  # linear decay to end_fraction·η
  c.schedule.end_fraction = 0.0  # decay to zero

  c.probe.critical = True  # λ_c every step inside the optax chain
  c.probe.every = 1  # every step
  c.probe.step_guess = 1e-2  # first η_c guess (Adam's unit-LR updates are O(1) per entry)
  c.probe.directional = False  # not needed here
  c.probe.lanczos_every = 0  # raw λ_max(H) has no threshold under Adam
  c.probe.lanczos_iters = 20  # Lanczos iterations for λ^PH
  c.probe.preconditioned_every = 25  # λ^PH every 25 steps

  c.log_every = 1  # a metrics row every step
  c.eval_every = 50  # held-out loss every 50 steps
  c.eval_examples = 256  # held-out sequences per evaluation

  if "cosine" in presets:
    c.schedule.name = "warmup_cosine"  # linear warmup then cosine decay to end_fraction·η

  if "fig3" in presets:
    _fig3(c)

  if "smoke" in presets:
    c.num_steps = 30  # a few seconds
    c.batch_size = 8  # sequences per step
    c.data.max_chars = 100_000  # small corpus
    c.data.context_length = 32  # short sequences
    c.model.width = 32  # narrow model
    c.model.depth = 1  # one block
    c.schedule.warmup_steps = 5  # short warmup
    c.probe.lanczos_iters = 8  # enough to exercise the code path
    c.probe.preconditioned_every = 10  # three measurements
    c.eval_every = 10  # three evaluations
    c.eval_examples = 32  # small eval batch
    if "fig3" in presets:
      c.batch_size = 32  # 1,024 tokens per step
      c.grad_accum_steps = 4  # still accumulated: 4 micro-batches of 8 sequences
      c.probe.preconditioned_every = 0  # λ^PH offline, on the checkpoints
      c.checkpoint.every = 3  # λ^PH points in warmup, stable phase and decay
  return c


def _fig3(c) -> None:
  """Kalra et al. 2026, Fig. 3 in miniature (``experiments/repro_adamw.py``): 32,768 tokens
  per step as 16 accumulated micro-batches of 2,048 tokens, a narrower model so that a run
  fits in a few minutes on a CPU, and the probes on a sparser schedule."""
  c.num_steps = 200  # optimizer steps
  c.batch_size = 512  # sequences per step: 512 × 64 = 32,768 tokens
  c.grad_accum_steps = 16  # micro-batches of 32 sequences (2,048 tokens), as the wsd preset
  c.model.width = 32  # model dimension (≈ 30k parameters with depth 2)
  c.schedule.warmup_steps = 20  # linear warmup (10% of the run)
  c.schedule.decay_fraction = 0.3  # last 30% decays linearly to zero
  c.probe.every = 4  # λ_c every 4 steps (each costs ~1 train step at this batch)
  c.probe.directional = True  # λ_dir beside λ_c (one HVP per measured step)
  # λ^PH is measured afterwards on the checkpoints, on one micro-batch as the paper does
  # (repro_adamw.micro_batch_ph); the in-run probe would use the whole 32k-token step (16×
  # the cost of a micro-batch).
  c.probe.preconditioned_every = 0
  c.probe.lanczos_iters = 15  # Lanczos iterations of the offline λ^PH
  c.checkpoint.every = 6  # a checkpoint, hence a λ^PH point, every 6 steps
  c.checkpoint.keep_preliminary = -1  # keep them all for the offline measurement
  c.eval_every = 100  # held-out loss
  c.monitor.enabled = False  # the convergence monitor is not part of this figure
