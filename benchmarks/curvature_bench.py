"""Cost of the curvature probes against one train step, on the tiny GPT and on the MLP.

    python benchmarks/curvature_bench.py            # full: GPT batch 32 x 128, 200 steps
    python benchmarks/curvature_bench.py --quick    # a smaller smoke version (~1 min)

For each model, in one run: a train step (AdamW, value and grad, no probe) — the baseline; one
warm λ_c measurement reusing the train step's loss (``loss0``); 20-step Lanczos; one HVP; the
mean number of loss evaluations per λ_c over training steps with the probe in the chain; and
the number of compilations after the first step with every probe on. Targets:
warm λ_c ≤ 5 evaluations on average and ≤ 2x a train step; Lanczos(20) ≥ 12x a warm λ_c;
Lanczos within 10 % of 20 HVPs; zero recompilations.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import curvature
from experiments import data as data_lib
from experiments import models
from _timing import median_time  # benchmarks/_timing.py


def _time(fn, *args, repeats: int) -> float:
  return median_time(fn, *args, repeats=repeats, warmup=1)


def gpt_setup(batch: int, seq: int, width: int, depth: int):
  vocab = data_lib.CharVocab.ascii()
  text = data_lib.stdlib_code_text(400_000)
  ids = vocab.encode(text)
  rng = np.random.default_rng(0)
  model = models.GPT(len(vocab), seq, depth=depth, width=width, num_heads=4,
                     rngs=nnx.Rngs(params=0))
  graphdef, params = models.split_params(model)

  def loss_fn(p, b):
    logits = nnx.merge(graphdef, p)(b[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, b[:, 1:, None], axis=-1))

  def batches():
    while True:
      starts = rng.integers(0, len(ids) - seq - 1, batch)
      yield jnp.asarray(np.stack([ids[s:s + seq + 1] for s in starts]))

  return f"GPT d{depth} w{width}, batch {batch}x{seq}", loss_fn, params, batches()


def mlp_setup():
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jax.nn.one_hot(jnp.asarray(y), 10)
  model = models.MLP(64, (200, 200), 10, activation="tanh", rngs=nnx.Rngs(params=0))
  graphdef, params = models.split_params(model)

  def loss_fn(p, b):
    return 0.5 * jnp.mean(jnp.sum((nnx.merge(graphdef, p)(b[0]) - b[1]) ** 2, -1))

  def batches():
    while True:
      yield (x, y)

  return "MLP 64-200-200-10 tanh, full batch 1797", loss_fn, params, batches()


def _matfree_row(loss_fn, p, b, t_ours, top_ours):
  """matfree 0.6's Lanczos (ravelled basis, full reorthogonalisation), 20 steps, if installed."""
  try:
    from matfree import decomp, eig  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ("matfree Lanczos, 20 steps", "not installed", "pip install matfree to compare")

  @jax.jit
  def matfree_top(p, b, v0):
    av = lambda v: curvature.hvp(lambda q: loss_fn(q, b), p, v)
    vals, _ = eig.eigh_partial(decomp.tridiag_sym(20, reortho="full"))(av, v0)
    return jnp.max(vals)

  v0 = jax.tree.map(jnp.ones_like, p)
  norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v0)))
  v0 = jax.tree.map(lambda x: x / norm, v0)
  t = _time(matfree_top, p, b, v0, repeats=3)
  top = float(matfree_top(p, b, v0))
  return ("matfree 0.6 Lanczos, 20 steps (same HVP)", f"{t * 1e3:.1f} ms",
          f"ours/matfree time {t_ours / t:.2f}x; top eigenvalue {top_ours:.4g} vs {top:.4g}")


def run(name, loss_fn, params, batches, *, steps: int, repeats: int, lr: float):
  count = {"train": 0, "probe_train": 0, "all_probes_train": 0, "lanczos": 0, "precond": 0}
  adamw = lambda *probes: optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                                      *probes, optax.scale_by_learning_rate(lr))
  plain = adamw()
  probed = adamw(curvature.critical_sharpness_probe(learning_rate=lr))
  # Every probe on: the default probe with directional sharpness, and the paper's exact
  # search (growth 2, bisection) along the same update, for the evaluation count.
  all_probes = adamw(
      curvature.critical_sharpness_probe(learning_rate=lr, directional=True),
      curvature.critical_sharpness_probe(learning_rate=lr, growth=2.0, method="bisect"))

  def make_step(tx, key):
    def step(p, s, b):
      count[key] += 1
      loss, g = jax.value_and_grad(loss_fn)(p, b)
      u, s = tx.update(g, s, p, value=loss, grad=g, value_fn=lambda q: loss_fn(q, b))
      return optax.apply_updates(p, u), s, loss
    return jax.jit(step)

  plain_step = make_step(plain, "train")
  probe_step = make_step(probed, "probe_train")
  all_step = make_step(all_probes, "all_probes_train")

  @jax.jit
  def lanczos(p, b):
    count["lanczos"] += 1
    # tol=0: exactly 20 steps (the default tol would stop at the first converged check).
    return curvature.hessian_eigenvalues(lambda q: loss_fn(q, b), p, k=1, num_iters=20,
                                         max_restarts=0, tol=0.0).eigenvalues

  @jax.jit
  def precond(p, s, b):
    count["precond"] += 1
    return curvature.preconditioned_sharpness(
        lambda q: loss_fn(q, b), p, curvature.find_adam_state(s), num_iters=20,
        max_restarts=0).eigenvalues

  @jax.jit
  def one_hvp(p, v, b):
    return curvature.hvp(lambda q: loss_fn(q, b), p, v)

  @jax.jit
  def twenty_hvps(p, v, b):
    # The Lanczos baseline: the same 20 HVPs in one compiled loop, with no
    # orthogonalisation (a power iteration).
    def body(_, v):
      hv = curvature.hvp(lambda q: loss_fn(q, b), p, v)
      norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(hv)))
      return jax.tree.map(lambda x: x / norm, hv)
    return jax.lax.fori_loop(0, 20, body, v)

  @jax.jit
  def forward(p, b):
    return loss_fn(p, b)

  # Train with every probe on; Lanczos and preconditioned sharpness every 20 steps.
  state = all_probes.init(params)
  p = params
  evals, paper_evals, sharp = [], [], []
  for t in range(steps):
    b = next(batches)
    p, state, loss = all_step(p, state, b)
    evals.append(int(state[2].info.num_evals))
    paper_evals.append(int(state[3].info.num_evals))
    sharp.append(float(state[2].info.sharpness))
    if t % 20 == 0:
      lanczos(p, b)
      precond(p, state, b)

  # Timings at the trained point, one fixed batch.
  b = next(batches)
  t_train = _time(plain_step, p, plain.init(p), b, repeats=repeats)
  probe_state = probed.init(p)
  for _ in range(3):  # warm the probe up at this point
    _, probe_state, _ = probe_step(p, probe_state, b)
  t_probe_train = _time(probe_step, p, probe_state, b, repeats=repeats)
  t_fwd = _time(forward, p, b, repeats=repeats)
  loss0, g = jax.value_and_grad(loss_fn)(p, b)
  direction, _ = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4)).update(
      g, (state[0], state[1]), p)
  warm = probe_state[2].warm
  growth = curvature._transforms._growth(warm, "adaptive", 4)

  @jax.jit
  def warm_lambda_c(p, d, b, l0, guess, growth, g):
    return curvature.critical_sharpness(lambda q: loss_fn(q, b), p, d, loss0=l0,
                                        step_guess=guess, growth=growth, method="interpolate",
                                        grad=g)

  args = (p, direction, b, loss0, warm.step_guess, growth, g)
  t_lc = _time(warm_lambda_c, *args, repeats=repeats)
  n_lc = int(warm_lambda_c(*args).num_evals)
  t_lanczos = _time(lanczos, p, b, repeats=max(3, repeats // 3))
  v = jax.tree.map(jnp.ones_like, p)
  t_hvp = _time(one_hvp, p, v, b, repeats=repeats)
  t_hvp20 = _time(twenty_hvps, p, v, b, repeats=max(3, repeats // 3))
  recompiles = {k: v - 1 for k, v in count.items() if k not in ("train", "probe_train")}
  matfree_row = _matfree_row(loss_fn, p, b, t_lanczos, float(lanczos(p, b)[0]))

  n_params = sum(x.size for x in jax.tree.leaves(p))
  mean_evals = float(np.mean(evals[1:]))
  mean_paper = float(np.mean(paper_evals[1:]))
  t_lc_step = t_probe_train - t_train   # the probe's cost inside the step, warm, loss0 reused
  rows = [
      ("parameters", f"{n_params:,}", ""),
      ("train step (AdamW, baseline)", f"{t_train * 1e3:.2f} ms", "1.00x"),
      ("one forward pass (loss only)", f"{t_fwd * 1e3:.2f} ms", f"{t_fwd / t_train:.2f}x"),
      ("train step + λ_c probe", f"{t_probe_train * 1e3:.2f} ms",
       f"{t_probe_train / t_train:.2f}x"),
      ("warm λ_c inside the step (difference of the two)", f"{t_lc_step * 1e3:.2f} ms",
       f"{t_lc_step / t_train:.2f}x train step  [target <= 2x]"),
      (f"warm λ_c called alone at the final point ({n_lc} evals)", f"{t_lc * 1e3:.2f} ms",
       f"{t_lc / t_train:.2f}x train step"),
      ("one HVP", f"{t_hvp * 1e3:.2f} ms", f"{t_hvp / t_train:.2f}x train step"),
      ("20 HVPs in one compiled loop (power iteration)", f"{t_hvp20 * 1e3:.1f} ms", ""),
      ("Lanczos, 20 steps, full reorthogonalisation", f"{t_lanczos * 1e3:.1f} ms",
       f"{t_lanczos / t_lc_step:.1f}x warm λ_c in the step [target >= 12x]; "
       f"{t_lanczos / t_hvp20:.3f}x its 20 HVPs [target <= 1.10x]"),
      matfree_row,
      (f"mean loss evals per λ_c, {steps - 1} warm steps (default probe)", f"{mean_evals:.2f}",
       "[target <= 5]"),
      ("same steps, the paper's search (growth 2, bisection)", f"{mean_paper:.2f}",
       f"{mean_evals / mean_paper:.2f}x"),
      ("recompilations after the first step, every probe on", str(sum(recompiles.values())),
       ", ".join(f"{k}: {v}" for k, v in recompiles.items()) + "  [target 0]"),
      ("final λ_c / η·λ_c", f"{sharp[-1]:.1f} / {lr * sharp[-1]:.2f}", ""),
  ]
  print(f"\n### {name}  ({jax.devices()[0].platform}, jax {jax.__version__})\n")
  print("| quantity | value | ratio |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} |")
  return dict(mean_evals=mean_evals, recompiles=sum(recompiles.values()),
              lc_over_train=t_lc_step / t_train, lanczos_over_lc=t_lanczos / t_lc_step,
              lanczos_over_hvps=t_lanczos / t_hvp20)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller GPT and fewer steps")
  parser.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
  args = parser.parse_args()
  steps = args.steps or (40 if args.quick else 200)
  repeats = 5 if args.quick else 20
  if args.quick:
    gpt = gpt_setup(batch=8, seq=64, width=64, depth=2)
  else:
    gpt = gpt_setup(batch=32, seq=128, width=128, depth=2)
  run(*gpt, steps=steps, repeats=repeats, lr=3e-3)
  run(*mlp_setup(), steps=steps, repeats=repeats, lr=1e-3)


if __name__ == "__main__":
  main()
