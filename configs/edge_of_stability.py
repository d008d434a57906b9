r"""Edge of stability on digits: full-batch GD (or Adam) on a tanh MLP with MSE loss.

Reproduces in miniature Cohen et al. 2021 (arXiv 2103.00065): under full-batch gradient descent
λ_max(H) rises (progressive sharpening) until it reaches 2/η and then hovers there while the
loss keeps falling non-monotonically; the critical sharpness λ_c (Kalra et al. 2026) stays
flat, then jumps to 2/η and oscillates around it. The ``adam`` preset is the adaptive version
(Cohen et al. 2022, arXiv 2207.14484): the preconditioned sharpness λ^PH settles near
(2+2β₁)/((1−β₁)η) = 38/η while λ_c stays near or below 2/η.

Run:

  python -m experiments.run --config=configs/edge_of_stability.py --workdir=runs/eos
  python -m experiments.run --config=configs/edge_of_stability.py:adam --workdir=runs/eos_adam
  python -m experiments.run --config=configs/edge_of_stability.py:smoke --workdir=runs/eos_smoke
  python -m experiments.run --config=configs/edge_of_stability.py:adam,smoke --workdir=/tmp/x

Presets, combined with commas: ``gd`` (default) or ``adam``; ``smoke`` shrinks either.
Measured on this 2-core CPU, shared with other jobs (load average ≈ 4), wall time of the
command including start-up and plots: gd (2,000 steps, Lanczos every 10) 96 s; adam
(1,500 steps, λ^PH every 10) 60–116 s; smoke 10 s; adam,smoke 10 s (up to ~30 s each when the
machine is busy).

Observed (seed 0): gd — λ_max rises 15.5 → 20 = 2/η by step ~500 and then hovers at 2/η;
λ_c and λ_dir fall to ~0.02, jump to 2/η at step ~650, fall back, and from step ~950 stay on
2/η; the loss spikes at each jump and keeps falling. adam — λ^PH climbs to 38/η by step ~450
and stays on it; λ_c jumps from ~3 to 2/η at the same step and oscillates around 2/η.
"""

from experiments.config_lib import default_config

PRESETS = ("gd", "adam", "smoke")  # combined with commas; listed by `experiments.run --help`


def get_config(arg: str = ""):
  """Config for ``arg`` = comma-separated presets: '' / 'gd', 'adam', 'smoke'."""
  presets = [p for p in arg.split(",") if p] if arg else []
  unknown = set(presets) - set(PRESETS)
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)} for edge_of_stability.py; "
                     f"accepted: {', '.join(map(repr, PRESETS))} (comma-separated).")
  c = default_config()
  c.seed = 0  # model init, data split and Lanczos start vectors
  c.num_steps = 2000  # full-batch GD steps
  c.batch_size = 0  # 0 = full batch: gradient descent on the whole training set
  c.grad_accum_steps = 1  # one chunk: digits fit in one batch
  c.loss = "mse"  # square loss on one-hot targets, as in Cohen et al. 2021

  c.data.name = "digits"  # sklearn load_digits, 8×8 images
  c.data.eval_size = 297  # held-out images
  c.data.subset_size = 1000  # train on 1,000 images (progressive sharpening is faster)
  c.data.standardize = True  # zero-mean unit-variance pixels

  c.model.name = "mlp"  # fully connected network
  c.model.widths = (200, 200)  # the 2×200 network of Cohen et al.
  c.model.activation = "tanh"  # smooth activation: a well-defined Hessian

  c.optimizer.name = "sgd"  # full-batch SGD = gradient descent
  c.optimizer.learning_rate = 0.1  # η: the threshold 2/η is 20
  c.schedule.name = "constant"  # fixed η, so 2/η is a flat line

  c.probe.critical = True  # λ_c every step, inside the optax chain
  c.probe.every = 1  # every step
  c.probe.directional = True  # also ΔθᵀHΔθ/Δθᵀg (one HVP per step)
  c.probe.lanczos_every = 10  # λ_max(H) by Lanczos every 10 steps
  c.probe.lanczos_iters = 20  # the top eigenvalue of this MLP converges in ~20 HVPs
  c.probe.preconditioned_every = 0  # GD has no preconditioner

  c.log_every = 1  # a metrics row every step
  c.eval_every = 100  # held-out loss and accuracy every 100 steps

  if "adam" in presets:
    c.num_steps = 1500  # Adam reaches its edge of stability after ~450 steps
    c.optimizer.name = "adam"  # full-batch Adam: the adaptive edge of stability
    c.optimizer.learning_rate = 2e-3  # η: 38/η = 19,000, 2/η = 1,000
    c.optimizer.b1 = 0.9  # threshold (2+2β₁)/((1−β₁)η) = 38/η
    c.optimizer.b2 = 0.999  # second-moment decay
    c.optimizer.eps = 1e-8  # Adam's ε
    c.probe.directional = False  # λ_c and λ^PH are the quantities of interest here
    c.probe.lanczos_every = 0  # raw λ_max(H) has no threshold under Adam
    c.probe.preconditioned_every = 10  # λ_max(P^-1/2 H P^-1/2) every 10 steps

  if "smoke" in presets:
    c.num_steps = 60  # a few seconds
    c.data.subset_size = 256  # a small full batch
    c.model.widths = (64, 64)  # a small network
    c.probe.lanczos_every = 20 if c.probe.lanczos_every else 0  # three Lanczos runs
    c.probe.lanczos_iters = 10  # enough to exercise the code path
    c.probe.preconditioned_every = 20 if c.probe.preconditioned_every else 0
    c.eval_every = 20  # three evaluations
  return c
