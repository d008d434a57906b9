"""Critical sharpness: forward passes per measurement and the probe's share of a train step.

    python benchmarks/critical_bench.py            # GPT 0.44M (batch 32 x 128) and the MLP
    python benchmarks/critical_bench.py --quick    # a smaller GPT and fewer steps (~2 min)

Timed two ways. Consecutive (the headline): each variant runs 20 steps in a row, as a training
loop runs them, the variants taking turns 3 times, and the ratio of median step times is the
probe's cost in train steps (target ≤ 2.0: at most one extra step). Interleaved: one step of each
variant after the other, printed for comparison: a training loop runs one program back to back,
and interleaving seven programs on a 2-core CPU makes each step's cost depend on what ran before
it. Both modes follow what a forward pass costs against a train step on the machine, which moves
on a shared one (the same interleaved code gave the probe 2.03× and 1.70× ten minutes apart, with
a forward pass at 0.49× and 0.36× of the step).

Three AdamW runs from one initialisation, fed the same batches, are stepped in turn: a plain
train step (value and grad, AdamW) and the same step with ``critical_sharpness_probe`` in the
chain as the README shows it (``value=loss, grad=grads``), with ``bracket="trials"`` (the
default) and ``bracket="convex"``. Each step of each is timed, one after the other, so that load
on the machine (shared with other jobs) falls on all alike; the ratio of the medians is the
probe's cost in train steps (target ≤ 2.0: at most one extra step). Timed with them: the plain
step plus three forward passes along its update at fixed steps, the cost of a 3-trial search
with nothing else (the probe's cost is this floor plus a few per cent: how it compares with 2.0
is what one forward pass costs against a train step on the machine); two trials one after the
other against the same two batched with ``jax.vmap`` (whether evaluating trials together would
pay on this hardware); and how far each warm start (the previous η_c) is from the η_c it finds:
a bracket of two tried steps within 2^-k needs a third trial unless the start is already within
2^-k.

Along the first probed run's update (AdamW's unit-LR Δθ), untimed, the standalone
``curvature.critical_sharpness`` measures the same λ_c twice, each warm-started from its own
previous η_c with the train step's loss and gradient: the default (``method="interpolate"``)
and the paper's search (``method="bisect", growth=2``; Kalra et al. 2026, arXiv 2601.16979).
Reported: forward passes per warm measurement (mean and histogram; target ≤ 4 for the default)
and the largest disagreement between the two λ_c against the tolerance 2^-k/(2 − 2^-k).
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvature
from curvature_bench import gpt_setup, mlp_setup  # benchmarks/curvature_bench.py


def _chains(lr: float):
  pre = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))
  plain = optax.chain(pre, optax.scale_by_learning_rate(lr))
  probed = {b: optax.chain(pre, curvature.critical_sharpness_probe(learning_rate=lr, bracket=b),
                           optax.scale_by_learning_rate(lr)) for b in BRACKETS}
  return pre, plain, probed


BRACKETS = ("trials", "convex")


def _steps(loss_fn, pre, plain, probed):
  """The jitted plain step, probed steps, and the two standalone searches along Δθ."""

  def make(tx):
    def step(p, s, b):
      loss, g = jax.value_and_grad(loss_fn)(p, b)
      u, s = tx.update(g, s, p, value=loss, grad=g, value_fn=lambda q: loss_fn(q, b))
      return optax.apply_updates(p, u), s
    return jax.jit(step)

  @jax.jit
  def floor(p, s, b):
    """The plain step plus three forward passes along its update: what a 3-trial search costs
    when the search itself is free (the trial steps depend on the loss, so none is folded)."""
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, s = plain.update(g, s, p)
    acc = loss
    for e in (0.5, 1.0, 1.5):
      acc = acc + loss_fn(jax.tree.map(lambda a, d: a + e * (1 + 1e-9 * acc) * d, p, u), b)
    return optax.apply_updates(p, u), s, acc

  def trial(p, b, e):
    """L(θ − ηΔθ) along Δθ = θ/100 (a trial's cost does not depend on the direction)."""
    return loss_fn(jax.tree.map(lambda a: a - 0.01 * e * a, p), b)

  @jax.jit
  def pair_in_turn(p, b):
    """Two trials, the second's step depending on the first's loss, as in the search."""
    first = trial(p, b, 0.5)
    return first + trial(p, b, 1.0 + 1e-9 * first)

  @jax.jit
  def pair_together(p, b):
    """The same two trials evaluated together (``jax.vmap`` over the step)."""
    return jnp.sum(jax.vmap(lambda e: trial(p, b, e))(jnp.asarray([0.5, 1.0])))

  @jax.jit
  def standalone(p, s, b, guesses):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    direction, _ = pre.update(g, s[0], p)        # the probed run's Δθ at this step
    out = []
    for (method, growth), guess in zip((("interpolate", 2.0), ("bisect", 2.0)), guesses):
      out.append(curvature.critical_sharpness(
          lambda q: loss_fn(q, b), p, direction, grad=g, loss0=loss, step_guess=guess,
          method=method, growth=growth))
    return out

  return (make(plain), {b: make(tx) for b, tx in probed.items()}, standalone, floor,
          (pair_in_turn, pair_together))


def _histogram(counts) -> str:
  c = collections.Counter(int(x) for x in counts)
  return ", ".join(f"{k}: {c[k]}" for k in sorted(c))


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def _consecutive(steppers: dict, batches: list, *, rounds: int, block: int) -> dict:
  """Median time per step of each stepper run ``block`` steps in a row, as a training loop runs
  them, the steppers taking turns ``rounds`` times (so that slow spells of the machine fall on
  all). A stepper is ``(fn, state)`` with ``fn(*state, batch) -> new state``."""
  times = {k: [] for k in steppers}
  for r in range(rounds):
    for name, (fn, state) in steppers.items():
      for i in range(block):
        state, dt = _timed(fn, *state, batches[(r * block + i) % len(batches)])
        times[name].append(dt)
      steppers[name] = (fn, state)
  return {k: float(np.median(v)) for k, v in times.items()}


def _consecutive_rows(c: dict, rounds: int, block: int) -> list[tuple[str, str, str]]:
  base = c["plain"]
  head = f"consecutive steps ({rounds} rounds x {block}, as in a training loop): "
  return [
      (head + "train step", f"{base * 1e3:.1f} ms", "1.00x"),
      *[(head + label, f"{c[k] * 1e3:.1f} ms", f"{c[k] / base:.2f}x{note}") for k, label, note in (
          ("forward", "one forward pass", ""),
          ("floor", "step + 3 forward passes, no search", "  (the floor)"),
          ("trials", "step + probe(bracket='trials')", "  [target <= 2.0x]"),
          ("convex", "step + probe(bracket='convex')", "  [target <= 2.0x]"))],
      (head + "two trials together (vmap) / in turn",
       f"{c['together'] * 1e3:.1f} / {c['in_turn'] * 1e3:.1f} ms",
       f"{c['together'] / c['in_turn']:.2f}x  (< 1: batching trials would pay)"),
  ]


def run(name, loss_fn, params, batches, *, warmup: int, steps: int, lr: float,
        rounds: int = 3, block: int = 20) -> dict:
  pre, plain, probed = _chains(lr)
  plain_step, probe_step, standalone, floor_step, pairs = _steps(loss_fn, pre, plain, probed)
  fwd = jax.jit(loss_fn)
  s_plain, p_plain = plain.init(params), params
  runs = {b: (params, tx.init(params)) for b, tx in probed.items()}
  guesses = (jnp.float32(1.0), jnp.float32(1.0))
  t_plain, t_fwd, t_floor, evals = [], [], [], {"interpolate": [], "bisect": []}
  t_pairs = ([], [])
  t_probe, probe_evals = {b: [] for b in BRACKETS}, {b: [] for b in BRACKETS}
  worst, statuses, guess_err = 0.0, collections.Counter(), []
  seen = []
  for t in range(warmup + steps):
    b = next(batches)
    if len(seen) < block:
      seen.append(b)
    res = standalone(*runs["trials"], b, guesses)
    warm_from = float(guesses[0])
    guesses = tuple(jnp.where(jnp.isfinite(r.step_size), r.step_size, g).astype(jnp.float32)
                    for r, g in zip(res, guesses))
    jax.block_until_ready((res, guesses))   # nothing untimed left in the queue
    (p_plain, s_plain), dt_plain = _timed(plain_step, p_plain, s_plain, b)
    dt = {}
    for k in BRACKETS:
      runs[k], dt[k] = _timed(probe_step[k], *runs[k], b)
    _, dt_fwd = _timed(fwd, p_plain, b)
    _, dt_floor = _timed(floor_step, p_plain, s_plain, b)
    dt_pairs = [_timed(f, p_plain, b)[1] for f in pairs]
    if t < warmup:
      continue
    t_plain.append(dt_plain)
    t_fwd.append(dt_fwd)
    t_floor.append(dt_floor)
    for acc, dt_pair in zip(t_pairs, dt_pairs):
      acc.append(dt_pair)
    for k in BRACKETS:
      t_probe[k].append(dt[k])
      probe_evals[k].append(int(runs[k][1][1].info.num_evals))
      statuses[("probe " + k, curvature.STATUS_NAMES[int(runs[k][1][1].info.status)])] += 1
    for r, m in zip(res, evals):
      evals[m].append(int(r.num_evals))
      statuses[(m, curvature.STATUS_NAMES[int(r.status)])] += 1
    if np.isfinite(float(res[0].step_size)):
      guess_err.append(abs(np.log(warm_from / float(res[0].step_size))))
    a, c = (float(r.sharpness) for r in res)
    if np.isfinite(a) and np.isfinite(c) and c > 0:
      worst = max(worst, abs(a / c - 1))
  # Each stepper's state carries its last output, so that the timer waits for it.
  zero = jnp.float32(0)
  consecutive = _consecutive(
      {"plain": (plain_step, (p_plain, s_plain)),
       "forward": (lambda p, _, b: (p, fwd(p, b)), (p_plain, zero)),
       "floor": (lambda p, s, _, b: floor_step(p, s, b), (p_plain, s_plain, zero)),
       **{k: (probe_step[k], runs[k]) for k in BRACKETS},
       "in_turn": (lambda p, _, b: (p, pairs[0](p, b)), (p_plain, zero)),
       "together": (lambda p, _, b: (p, pairs[1](p, b)), (p_plain, zero))},
      seen, rounds=rounds, block=block)
  ratio = {k: float(np.median(t_probe[k]) / np.median(t_plain)) for k in BRACKETS}
  n_params = sum(x.size for x in jax.tree.leaves(params))
  bound = 2.0 ** -4 / (2 - 2.0 ** -4)
  rows = [
      ("parameters", f"{n_params:,}", ""),
      ("interleaved (each step of each variant in turn): train step, AdamW (median)",
       f"{np.median(t_plain) * 1e3:.1f} ms", "1.00x"),
      ("one forward pass (loss only)", f"{np.median(t_fwd) * 1e3:.1f} ms",
       f"{np.median(t_fwd) / np.median(t_plain):.2f}x"),
      ("train step + 3 forward passes along its update, no search (median)",
       f"{np.median(t_floor) * 1e3:.1f} ms",
       f"{np.median(t_floor) / np.median(t_plain):.2f}x  (a 3-trial search's floor)"),
      ("two trials one after the other; the same two together (jax.vmap over η)",
       f"{np.median(t_pairs[0]) * 1e3:.1f} ms; {np.median(t_pairs[1]) * 1e3:.1f} ms",
       f"together / in turn {np.median(t_pairs[1]) / np.median(t_pairs[0]):.2f}x  "
       "(< 1: batching trials would pay)"),
      *[(f"train step + critical_sharpness_probe(bracket={k!r}) (median)",
         f"{np.median(t_probe[k]) * 1e3:.1f} ms", f"{ratio[k]:.2f}x  [target <= 2.0x]")
        for k in BRACKETS],
      *_consecutive_rows(consecutive, rounds, block),
      *[(f"probe(bracket={k!r}): forward passes per warm measurement ({steps} steps)",
         f"{np.mean(probe_evals[k]):.2f}", f"histogram {{{_histogram(probe_evals[k])}}}")
        for k in BRACKETS],
      ("standalone default (interpolate), grad= and loss0= given",
       f"{np.mean(evals['interpolate']):.2f}",
       f"histogram {{{_histogram(evals['interpolate'])}}}  [target <= 4]"),
      ("warm start (previous η_c) off by: median; share within 2^-4 of η_c",
       f"{np.expm1(np.median(guess_err)) * 100:.0f} %",
       f"{np.mean(np.array(guess_err) < -np.log1p(-2.0 ** -4)) * 100:.0f} % of measurements "
       "(else a tried-step bracket needs >= 3 trials)"),
      ("standalone paper's search (bisect, growth 2)", f"{np.mean(evals['bisect']):.2f}",
       f"histogram {{{_histogram(evals['bisect'])}}}"),
      ("largest |λ_c(default)/λ_c(paper) − 1|", f"{worst:.4f}",
       f"each within {bound:.4f} of the crossing it bracketed, so <= {2 * bound:.4f} apart "
       "where both bracket the same one"),
      ("statuses", ", ".join(f"{m} {s}: {n}" for (m, s), n in sorted(statuses.items())), ""),
  ]
  print(f"\n#### {name}  ({jax.devices()[0].platform}, jax {jax.__version__}; "
        f"load average {os.getloadavg()[0]:.1f})\n")
  print("| quantity | value | ratio / histogram |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} |")
  return dict(ratio=ratio, consecutive={k: consecutive[k] / consecutive["plain"] for k in BRACKETS},
              probe_evals={k: float(np.mean(v)) for k, v in probe_evals.items()},
              default_evals=float(np.mean(evals["interpolate"])),
              paper_evals=float(np.mean(evals["bisect"])))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller GPT and fewer steps")
  parser.add_argument("--steps", type=int, default=None, help="measured steps (default 60)")
  parser.add_argument("--warmup", type=int, default=20, help="steps before measuring")
  parser.add_argument("--only", choices=("gpt", "mlp"), default=None)
  args = parser.parse_args()
  steps = args.steps or (20 if args.quick else 60)
  print(f"load average at start: {os.getloadavg()}")
  if args.only != "mlp":
    if args.quick:
      gpt = gpt_setup(batch=8, seq=64, width=64, depth=2)
    else:
      gpt = gpt_setup(batch=32, seq=128, width=128, depth=2)
    run(*gpt, warmup=args.warmup, steps=steps, lr=3e-3)
  if args.only != "gpt":
    run(*mlp_setup(), warmup=args.warmup, steps=steps, lr=1e-3)
  print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
