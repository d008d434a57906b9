r"""Kalra et al. 2026 (arXiv 2601.16979), Fig. 3 in miniature: AdamW + WSD on a tiny GPT.

The paper trains GPT-2 small with AdamW (β = (0.9, 0.95)) under a warmup–stable–decay schedule
at ~1M tokens per step (gradient accumulation) and follows the preconditioned sharpness
:math:`\lambda^{PH} = \lambda_{max}(P^{-1/2} H P^{-1/2})`, with Adam's preconditioner
:math:`P = (1-\beta_1^{t})(\sqrt{\hat v_t}+\epsilon)`, against its stability threshold
:math:`(2+2\beta_1)/((1-\beta_1)\eta) = 38/\eta` (Cohen et al. 2022, arXiv 2207.14484): λ^PH is
pushed down during warmup, sits on 38/η through the stable phase and rises when η decays. The
critical sharpness λ_c and the directional sharpness λ_dir, measured along the update, stay below
their threshold 2/η (a step raises the batch loss iff η·λ_c > 2) and rise in the decay.

Here: ``configs/olmo_style.py:fig3`` (a tiny character-level GPT on Python source, 32,768
tokens per step as 16 accumulated micro-batches) at three peak learning rates, plus a sweep of
the tokens per step at the middle learning rate (2k, 8k and the shared 32k run): mini-batch
noise lowers the sharpness a run equilibrates at (Cohen et al. 2022; Andreyev & Beneventano
2024, arXiv 2412.20553), so λ^PH/(38/η) should grow towards 1 with the tokens per step.

The phases are read from the logged learning rate: warmup (η below its peak, before the
peak is reached), stable (η at its peak) and decay (after the last step at the peak).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments.plots import series  # (steps, values) of a metric's finite values
from experiments.repro_base import Reproduction, Run

OLMO = "configs/olmo_style.py"
LEARNING_RATES = (2e-3, 4e-3, 8e-3)  # peak η of the three 32k-token runs
MIDDLE = LEARNING_RATES[1]  # η of the tokens-per-step sweep
SWEEP_FRACTIONS = (16, 4)  # sweep runs: 1/16 and 1/4 of fig3's tokens per step (2k, 8k)
ADAM_THRESHOLD = 38.0  # (2+2β₁)/(1−β₁) at β₁ = 0.9: λ^PH's threshold is 38/η
PH, CRIT, DIR = ("curv/preconditioned_sharpness", "curv/critical_sharpness",
                 "curv/directional_sharpness")

# The criterion, fixed before the full run (the paper's words turned into numbers).
STABLE_BAND = (0.8, 1.2)  # stable-phase median of λ^PH/(38/η): "on 38/η"
WARMUP_DROP = 0.5  # stable median of λ^PH ≤ this × its first (warmup) value: "pushed down"
DECAY_RISE = 1.3  # last third of the decay vs the stable phase (medians): "rises as η decays"
CLAIM = (
    "at 32k tokens per step, for each of the 3 peak η: λ^PH's stable-phase median ≤ "
    f"{WARMUP_DROP}× its first value (in warmup); stable-phase median of λ^PH/(38/η) in "
    f"[{STABLE_BAND[0]}, {STABLE_BAND[1]}]; λ^PH's median over the last third of the decay ≥ "
    f"{DECAY_RISE}× its stable median; λ_c and λ_dir: stable-phase medians of λ/(2/η) < 1 and "
    f"their last-third-of-decay medians ≥ {DECAY_RISE}× their stable medians. Sweep at "
    f"η = {MIDDLE:g}: the stable-phase median of λ^PH/(38/η) increases with tokens per step "
    "(2k < 8k < 32k)")


def _spec(smoke: bool) -> str:
  return f"{OLMO}:fig3,smoke" if smoke else f"{OLMO}:fig3"


def _sweep_sizes(smoke: bool) -> list[tuple[str, int, int]]:
  """``(label, batch_size, grad_accum_steps)`` of the smaller-batch runs at η = MIDDLE.

  The micro-batch stays the same size, so only the number of accumulated chunks changes.
  """
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config(_spec(smoke))
  out = []
  for f in SWEEP_FRACTIONS:
    batch = c.batch_size // f
    tokens = batch * c.data.context_length
    out.append((f"tokens{tokens}", batch, max(c.grad_accum_steps // f, 1)))
  return out


def _lr_label(lr: float) -> str:
  return f"lr{lr:g}"


def _runs(smoke: bool) -> list[Run]:
  spec = _spec(smoke)
  runs = [Run(_lr_label(lr), spec, {"optimizer.learning_rate": lr}) for lr in LEARNING_RATES]
  for label, batch, accum in _sweep_sizes(smoke):
    runs.append(Run(label, spec, {"optimizer.learning_rate": MIDDLE, "batch_size": batch,
                                  "grad_accum_steps": accum}))
  return runs


# ---------------------------------------------------------------------------------------------
# λ^PH on one micro-batch, measured on the saved checkpoints
# ---------------------------------------------------------------------------------------------

MICRO_FILE = "micro_batch_ph.jsonl"  # per run directory: {"step", PH} rows, reused if present


def _make_ph_fn(setup, config):
  """``(params, opt_state, batch, key) -> λ^PH`` of the batch loss, jitted.

  P is Adam's preconditioner after folding the batch's gradient into the moments (the state
  the update of that batch would leave), as the in-run probe and the authors'
  ``get_adam_preconditioner`` take it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import curvature  # pylint: disable=g-import-not-at-top
  o = config.optimizer

  def ph(params, opt_state, batch, key):
    loss = lambda p: setup.loss_fn(p, batch)
    g = jax.grad(loss)(params)
    _, folded = setup.preconditioner.update(g, opt_state[0], params)
    res = curvature.preconditioned_sharpness(
        loss, params, curvature.find_adam_state(folded), b1=o.b1, b2=o.b2, eps=o.eps,
        num_iters=config.probe.lanczos_iters, key=key)
    return res.eigenvalues[0]
  return jax.jit(ph)


def micro_batch_ph(run_dir: str) -> dict[int, float]:
  """λ^PH at every checkpoint of ``run_dir`` on one held-out micro-batch; step -> value.

  The micro-batch has the run's micro-batch size (``batch_size / grad_accum_steps``) and is
  the same for every checkpoint and every run of one micro-batch size, so runs with
  different tokens per step are measured alike (the paper measures λ^PH on one micro-batch
  of its accumulated step). Cached in ``run_dir/micro_batch_ph.jsonl``.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import measure  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, MICRO_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return {int(r["step"]): r[PH] for r in map(json.loads, f)}
  config = measure.load_run_config(run_dir)
  out = {}
  with measure.checkpoint_snapshot(run_dir) as mgr:
    setup = measure.build_setup(config)
    micro = config.batch_size // config.grad_accum_steps
    batch = jax.tree.map(lambda x: x[0], measure.measurement_batches(
        config, setup.dataset, 1, micro, "eval"))
    ph = _make_ph_fn(setup, config)
    key = jax.random.key(config.seed)
    for step in sorted(mgr.all_steps()):
      state = measure.restore_state(mgr, setup, step)
      out[step] = float(ph(state.params, state.opt_state, batch, jax.random.fold_in(key, step)))
  with open(path, "w", encoding="utf-8") as f:
    for step, value in out.items():
      f.write(json.dumps({"step": step, PH: value}) + "\n")
  return out


def _row(r: dict, ph: dict[int, float]) -> dict:
  """A metric row with the micro-batch λ^PH of its step, and λ_c / λ_dir only where they were
  measured (with ``probe.every`` > 1 the other rows repeat the last measurement)."""
  drop = {PH} | ({CRIT, DIR} if r.get("curv/num_evals", 1) == 0 else set())
  out = {k: v for k, v in r.items() if k not in drop}
  if r["step"] in ph:
    out[PH] = ph[r["step"]]
  return out


def _collect(workdir: str, run_dirs: dict[str, str], smoke: bool) -> dict[str, list[dict]]:
  """Each run's metric rows with ``PH`` replaced by the micro-batch λ^PH of its checkpoints."""
  del workdir, smoke
  from experiments import plots  # pylint: disable=g-import-not-at-top
  rows = {}
  for label, run_dir in run_dirs.items():
    ph = micro_batch_ph(run_dir)
    rows[label] = [_row(r, ph) for r in plots.read_metrics(run_dir)]
  return rows


# ---------------------------------------------------------------------------------------------
# Phases and summaries
# ---------------------------------------------------------------------------------------------


class Phases(NamedTuple):
  """Step ranges of a WSD run, read from its logged ``train/lr``.

  ``warmup``: steps < ``stable_start``; ``stable``: [``stable_start``, ``decay_start``);
  ``decay``: [``decay_start``, ``last``].
  """
  stable_start: int
  decay_start: int
  last: int


def phases(rows: list[dict]) -> Phases:
  """The WSD phases: η at its peak (to float32 rounding) marks the stable phase."""
  steps, lr = series(rows, "train/lr")
  if not steps.size:
    raise ValueError("no train/lr in the rows.")
  at_peak = np.nonzero(lr >= lr.max() * (1 - 1e-6))[0]  # float32 η: 1e-6 ≫ its rounding
  return Phases(int(steps[at_peak[0]]), int(steps[at_peak[-1]]) + 1, int(steps.max()))


def ratio_to_threshold(rows: list[dict], key: str, constant: float):
  """``(steps, λ/(constant/η(t)))`` at the steps where ``key`` was measured."""
  lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
  steps, values = series(rows, key)
  eta = np.array([lr.get(int(s), np.nan) for s in steps])
  return steps, values * eta / constant


def _median_in(steps, values, lo, hi) -> float:
  keep = (steps >= lo) & (steps < hi) & np.isfinite(values)
  return float(np.median(values[keep])) if keep.any() else float("nan")


class CurveSummary(NamedTuple):
  """One sharpness series against its threshold in the three phases.

  ``stable_ratio``: median of λ/threshold over the stable phase; ``decay_rise``: median of λ
  over the last third of the decay / its stable-phase median; ``warmup_drop``: its
  stable-phase median / λ at the first measurement (in warmup: "pushed down").
  """
  stable_ratio: float
  decay_rise: float
  warmup_drop: float


def summarize(rows: list[dict], key: str, constant: float) -> CurveSummary:
  """:class:`CurveSummary` of ``key`` against ``constant``/η(t)."""
  ph = phases(rows)
  steps, values = series(rows, key)
  _, ratio = ratio_to_threshold(rows, key, constant)
  stable = _median_in(steps, values, ph.stable_start, ph.decay_start)
  tail_start = ph.last - (ph.last + 1 - ph.decay_start) / 3.0
  tail = _median_in(steps, values, tail_start, ph.last + 1)
  drop = stable / values[0] if values.size and steps[0] < ph.stable_start else float("nan")
  return CurveSummary(_median_in(steps, ratio, ph.stable_start, ph.decay_start),
                      tail / stable if stable > 0 else float("nan"), float(drop))


# ---------------------------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------------------------


def _sweep_labels(rows: dict[str, list[dict]]) -> list[tuple[str, int]]:
  """``(label, tokens per step)`` of the sweep, ascending; the shared run at η = MIDDLE last."""
  small = sorted(((k, int(k[len("tokens"):])) for k in rows if k.startswith("tokens")),
                 key=lambda kv: kv[1])
  full = small[0][1] * SWEEP_FRACTIONS[0] if small else 0  # the first is 1/16 of the full
  return small + [(_lr_label(MIDDLE), full)]


def _judge_lr(rows: list[dict], lr: float) -> tuple[str, bool, bool]:
  """``(text, shape holds, level holds)`` of one 32k-token run."""
  ph = summarize(rows, PH, ADAM_THRESHOLD)
  c, d = summarize(rows, CRIT, 2.0), summarize(rows, DIR, 2.0)
  shape = (ph.warmup_drop <= WARMUP_DROP and ph.decay_rise >= DECAY_RISE
           and all(s.stable_ratio < 1.0 and s.decay_rise >= DECAY_RISE for s in (c, d)))
  level = STABLE_BAND[0] <= ph.stable_ratio <= STABLE_BAND[1]
  text = (f"η={lr:g}: λ^PH/(38/η) = {ph.stable_ratio:.2f} (stable), warmup ×"
          f"{ph.warmup_drop:.2g}, decay ×{ph.decay_rise:.2f}; λ_c/(2/η) = {c.stable_ratio:.2f}, "
          f"decay ×{c.decay_rise:.2f}; λ_dir/(2/η) = {d.stable_ratio:.2f}, decay ×"
          f"{d.decay_rise:.2f}")
  return text, shape, level


def _judge(rows: dict[str, list[dict]]) -> tuple[str, bool | str]:
  """True: shape and level for every η and a sweep ratio that grows with tokens per step;
  "partly": the shape holds for every η but the level or the sweep does not."""
  parts, shapes, levels = [], [], []
  for lr in LEARNING_RATES:
    text, shape, level = _judge_lr(rows[_lr_label(lr)], lr)
    parts.append(text)
    shapes.append(shape)
    levels.append(level)
  sweep = [(tokens, summarize(rows[label], PH, ADAM_THRESHOLD).stable_ratio)
           for label, tokens in _sweep_labels(rows)]
  ratios = np.array([r for _, r in sweep])
  grows = bool(np.all(np.diff(ratios) > 0))
  parts.append(f"sweep at η={MIDDLE:g}: λ^PH/(38/η) = " + ", ".join(
      f"{r:.2f} ({t / 1024:g}k tokens)" for t, r in sweep))
  if all(shapes) and all(levels) and grows:
    verdict = True
  elif all(shapes):
    verdict = "partly"
  else:
    verdict = False
  return "; ".join(parts), verdict


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------


def _thresholded(ax, rows, keys, constant, label):
  """``keys`` on a log axis with ``constant``/η(t) dashed, and the phase boundaries."""
  styles = {PH: ("C2", "s-", r"$\lambda^{PH}$"), CRIT: ("C0", "-", r"$\lambda_c$"),
            DIR: ("C4", "-", r"$\lambda_{dir}$")}
  for key in keys:
    colour, style, name = styles[key]
    s, v = series(rows, key, positive=True)
    ax.plot(s, v, style, color=colour, ms=2.5, lw=0.8, label=name)
  s, lr = series(rows, "train/lr", positive=True)
  ax.plot(s, constant / lr, "k--", lw=1, label=label)
  ph = phases(rows)
  for b in (ph.stable_start, ph.decay_start):
    ax.axvline(b, color="0.6", lw=0.6, ls=":")
  ax.set_yscale("log")


def _plot(rows: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 4, figsize=(19, 7.5))
  for i, lr in enumerate(LEARNING_RATES):
    r = rows[_lr_label(lr)]
    _thresholded(axes[0, i], r, (PH,), ADAM_THRESHOLD, r"$38/\eta(t)$")
    _thresholded(axes[1, i], r, (CRIT, DIR), 2.0, r"$2/\eta(t)$")
    # Far above λ^PH at the end of the decay (η → 0): cap the axis where the curves are.
    for ax, keys in ((axes[0, i], (PH,)), (axes[1, i], (CRIT, DIR))):
      top = max((series(r, k, positive=True)[1].max(initial=0) for k in keys), default=1)
      ax.set_ylim(top=10 * top)
    axes[0, i].set_title(f"32k tokens/step, peak η = {lr:g}")
    axes[1, i].set_xlabel("step")
  for label, tokens in _sweep_labels(rows):
    s, ratio = ratio_to_threshold(rows[label], PH, ADAM_THRESHOLD)
    axes[0, 3].plot(s, ratio, "o-", ms=2.5, lw=0.8, label=f"{tokens / 1024:g}k tokens/step")
  axes[0, 3].axhline(1.0, color="k", ls="--", lw=1)
  axes[0, 3].set_title(rf"$\lambda^{{PH}}/(38/\eta)$ at peak η = {MIDDLE:g}")
  axes[0, 3].legend(fontsize=8)
  sweep = [(t, summarize(rows[label], PH, ADAM_THRESHOLD).stable_ratio)
           for label, t in _sweep_labels(rows)]
  axes[1, 3].plot([t for t, _ in sweep], [r for _, r in sweep], "o-", color="C2")
  axes[1, 3].axhline(1.0, color="k", ls="--", lw=1)
  axes[1, 3].set_xscale("log", base=2)
  axes[1, 3].set_xlabel("tokens per step")
  axes[1, 3].set_title(r"stable-phase median of $\lambda^{PH}/(38/\eta)$")
  axes[0, 0].legend(fontsize=8)
  axes[1, 0].legend(fontsize=8)
  fig.suptitle("Kalra et al. 2026 Fig. 3 in miniature: AdamW + WSD on a character-level GPT "
               "(Python source); dotted lines: end of warmup, start of decay")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


REPRODUCTIONS = (
    Reproduction("adamw_wsd", "Kalra et al. 2026, Fig. 3", CLAIM, _runs, _judge, _plot,
                 collect=_collect),
)
