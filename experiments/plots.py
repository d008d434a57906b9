"""Plots of a run directory, made from ``metrics.jsonl`` (never inside jit).

``python -m experiments.plots --workdir=RUN_DIR`` (or ``RUN_DIR``; from Python
:func:`make_plots`) writes

* ``plots/sharpness.png`` — λ_c, λ_dir, λ_max and λ^PH against the step (log scale) with the
  stability thresholds drawn from the learning rate actually used at each step
  (``train/lr``): 2/η(t) for every optimizer, and (2+2β)/η(t) (heavy ball) or
  (2+2β₁)/((1−β₁)η(t)) (Adam, 38/η at β₁ = 0.9) for λ_max / λ^PH; below it the training and
  evaluation loss and the learning-rate schedule.
* ``plots/relative_sharpness.png`` (data-mixing runs) — the 2×2 relative critical sharpness
  matrix over time: row = the monitored loss, column = the task whose update is followed; the
  diagonal is each task's ordinary λ_c along its own update.
* ``plots/convergence.png`` (runs with ``monitor.enabled``) — the convergence report: the
  posterior P(node settled) of the four network nodes with the decision threshold, conflicts
  shaded; the evidence strength of each monitored metric (signed: + stable/settled, − still
  moving); the training loss; anomalies (red) and checkpoint tier events from ``audit.jsonl``
  (saves, promotions, emergency saves) marked on every panel.
* ``plots/distill.png`` (distillation runs, instead of the plots above) — the loss terms, the
  student's eval loss against the teacher's, and the fusion weight of each term.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.config_lib import DISTILL_TERMS  # pylint: disable=wrong-import-position

SERIES = (  # key, label, colour, style
    ("curv/critical_sharpness", r"$\lambda_c$ (critical)", "C0", "-"),
    ("curv/directional_sharpness", r"$\lambda_{dir}$ (directional)", "C4", "-"),
    ("curv/lambda_max", r"$\lambda_{max}(H)$ (Lanczos)", "C1", "o-"),
    ("curv/preconditioned_sharpness", r"$\lambda^{PH}_{max}$ (preconditioned)", "C2", "s-"),
)
# The Lanczos series and the flag that says whether its residual met the tolerance.
CONVERGED_KEYS = {"curv/lambda_max": "curv/lambda_max_converged",
                  "curv/preconditioned_sharpness": "curv/preconditioned_converged"}


# Status codes of curvature.critical_sharpness (kept here so plotting needs no JAX).
_STATUS_NO_RISE, _STATUS_NOT_DESCENT, _STATUS_NONFINITE, _STATUS_UNRESOLVED = 2, 3, 4, 5


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  """The rows of ``run_dir/metrics.jsonl`` (a truncated last line is skipped)."""
  rows = []
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def read_config(run_dir: str) -> dict[str, Any]:
  """``run_dir/config.json`` as a dict ({} if absent)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def series(rows, key: str, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of the rows that have a finite ``key`` (and > 0 if ``positive``)."""
  pts = [(r["step"], r[key]) for r in rows
         if key in r and r[key] is not None and math.isfinite(r[key])
         and (not positive or r[key] > 0)]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s), np.asarray(v, dtype=float)


def threshold_constant(config: dict) -> tuple[float, str]:
  """``(c, label)`` of the optimizer's λ_max / λ^PH threshold c/η."""
  opt = config.get("optimizer", {})
  name = opt.get("name", "sgd")
  if name == "momentum":
    beta = opt.get("momentum", 0.9)
    return 2 + 2 * beta, rf"$(2+2\beta)/\eta(t)$, $\beta$={beta:g}"
  if name in ("adam", "adamw"):
    b1 = opt.get("b1", 0.9)
    c = (2 + 2 * b1) / (1 - b1)
    return c, rf"$(2+2\beta_1)/((1-\beta_1)\eta(t))$ = {c:.3g}/$\eta(t)$"
  return 2.0, r"$2/\eta(t)$"


def _title(run_dir: str, config: dict) -> str:
  opt = config.get("optimizer", {})
  model = config.get("model", {})
  bs = config.get("batch_size", 0)
  return (f"{os.path.basename(os.path.normpath(run_dir))}: {opt.get('name', '?')} "
          f"η={opt.get('learning_rate', float('nan')):g} "
          f"({config.get('schedule', {}).get('name', '?')}), {model.get('name', '?')} on "
          f"{config.get('data', {}).get('name', '?')}, "
          f"{'full batch' if not bs else f'batch {bs}'}")


def plot_sharpness(rows, config: dict, path: str, title: str = "") -> None:
  """Sharpness against step with threshold lines, the loss and the learning rate."""
  lr_steps, lr = series(rows, "train/lr", positive=True)
  varying_lr = lr.size > 1 and lr.min() < lr.max()
  if varying_lr:
    fig, (ax, axl, axr) = plt.subplots(
        3, 1, figsize=(9, 9.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.6, 0.9]})
  else:  # a constant learning rate needs no panel of its own
    fig, (ax, axl) = plt.subplots(
        2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
  if lr.size:
    ax.plot(lr_steps, 2.0 / lr, color="k", ls="--", lw=1.2, label=r"$2/\eta(t)$")
    c, label = threshold_constant(config)
    if c != 2.0:
      ax.plot(lr_steps, c / lr, color="C3", ls="--", lw=1.2, label=label)
  plotted = []
  for key, label, colour, style in SERIES:
    s, v = series(rows, key, positive=True)
    if not s.size:
      continue
    marker = style[0] if style[0] in "os" and s.size <= 80 else None
    ax.plot(s, v, color=colour, lw=1.0 if marker is None else 1.2, marker=marker,
            ms=3 if marker else 0, label=label, alpha=0.9)
    plotted.append(v)
    if key in CONVERGED_KEYS:  # Lanczos values whose Ritz residual missed its tolerance
      cs, conv = series(rows, CONVERGED_KEYS[key])
      miss = np.isin(s, cs[conv == 0])
      if miss.any():
        ax.plot(s[miss], v[miss], ls="none", marker="x", color="red", ms=6,
                label=f"{label.split(' (')[0]} not converged")
  ax.set_yscale("log")
  if plotted:
    values = np.concatenate(plotted)
    # Percentiles, not extremes: λ^PH at step 0 (Adam's P from one gradient) can be 100×
    # its later values and would squeeze the interesting part of the curve.
    lo, hi = np.percentile(values, 0.5), np.percentile(values, 99.5)
    if lr.size:
      c, _ = threshold_constant(config)
      hi = max(hi, (c / lr).min() * 1.5)
    ax.set_ylim(max(lo / 2, 1e-6), hi * 2)
  ax.set_ylabel("sharpness")
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(loc="best", fontsize=8)
  ax.set_title(title, fontsize=10)

  for key, label, colour in (("train/loss", "train loss", "C0"), ("eval/loss", "eval loss", "C1")):
    s, v = series(rows, key, positive=True)
    if s.size:
      axl.plot(s, v, color=colour, label=label, marker="o" if key == "eval/loss" else None,
               ms=3, lw=1.0)
  axl.set_yscale("log")
  axl.set_ylabel("loss")
  axl.grid(True, which="both", alpha=0.25)
  axl.legend(loc="best", fontsize=8)

  if varying_lr:
    axr.plot(lr_steps, lr, color="k", lw=1.0)
    axr.set_ylabel(r"$\eta(t)$")
    axr.set_xlabel("step")
    axr.grid(True, alpha=0.25)
  else:
    axl.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def relative_keys(rows) -> list[str]:
  """Task names found in ``curv/relative/<loss>_along_<dir>`` keys, in first-seen order."""
  names = []
  for r in rows:
    for k in r:
      if k.startswith("curv/relative/"):
        a, _, b = k[len("curv/relative/"):].partition("_along_")
        for n in (a, b):
          if n not in names:
            names.append(n)
  return names


def plot_relative(rows, config: dict, path: str, title: str = "") -> None:
  """The relative critical sharpness matrix over time as an N×N grid of panels."""
  names = relative_keys(rows)
  n = len(names)
  fig, axes = plt.subplots(n, n, figsize=(4.2 * n, 3.3 * n), sharex=True, sharey=True,
                           squeeze=False)
  lr_steps, lr = series(rows, "train/lr", positive=True)
  for i, li in enumerate(names):
    for j, dj in enumerate(names):
      ax = axes[i, j]
      key = f"curv/relative/{li}_along_{dj}"
      s, v = series(rows, key)
      pos = v > 0
      if lr.size:
        ax.plot(lr_steps, 2.0 / lr, "k--", lw=1.0, label=r"$2/\eta(t)$")
      ax.plot(s[pos], v[pos], "o-", color="C0" if i == j else "C2", ms=3, lw=1.0,
              label=r"$\lambda_c$")
      # λ_c is reported as 0 with a status when the search cannot bracket η_c; show those
      # steps as markers on the frame instead of dropping them silently.
      st_steps, st = series(rows, f"curv/relative_status/{li}_along_{dj}")
      for code, y, marker, label in (
          (_STATUS_NOT_DESCENT, 0.96, "x", "loss rises at every step size (conflict)"),
          (_STATUS_NO_RISE, 0.04, "v", "loss never rises"),
          (_STATUS_NONFINITE, 0.5, "*", "non-finite"),
          (_STATUS_UNRESOLVED, 0.5, "d", "below the loss dtype's resolution")):
        hit = st_steps[st == code]
        if hit.size:
          ax.plot(hit, np.full(hit.size, y), marker, color="C3", ms=6, ls="none",
                  transform=ax.get_xaxis_transform(), label=label)
      ax.set_yscale("log")
      kind = "own update" if i == j else f"{dj}'s update"
      ax.set_title(f"{li} loss along {kind}", fontsize=9)
      ax.grid(True, which="both", alpha=0.25)
      if j == 0:
        ax.set_ylabel(f"monitored: {li} loss")
      if i == n - 1:
        ax.set_xlabel(f"step (update of: {dj})")
  for ax in axes.ravel():
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="lower right")
  fig.suptitle(title + "\nrelative critical sharpness (row: monitored loss, column: update "
               "followed)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


NODES = ("structural", "functional", "generalisation", "converged")
TIER_COLOURS = {"preliminary": "0.55", "observation": "C0", "candidate": "C2",
                "release": "C3"}


def _spans(steps: np.ndarray, on: np.ndarray) -> list[tuple[float, float]]:
  """Contiguous ``[start, end]`` step ranges where ``on`` holds."""
  spans, begin = [], None
  for st, flag in zip(steps, on):
    if flag and begin is None:
      begin = st
    elif not flag and begin is not None:
      spans.append((begin - 0.5, st - 0.5))
      begin = None
  if begin is not None:
    spans.append((begin - 0.5, steps[-1] + 0.5))
  return spans


def plot_convergence(rows, audit: list[dict], config: dict, path: str, title: str = "") -> None:
  """Posterior per node, evidence per metric, loss; anomalies and tier events marked."""
  fig, (axp, axe, axl) = plt.subplots(
      3, 1, figsize=(9.5, 9.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1.8, 1.2]})
  _posterior_panel(axp, rows, config.get("monitor", {}))
  axp.set_title(title + "\nconvergence monitor", fontsize=10)
  _evidence_panel(axe, rows)
  _loss_panel(axl, rows)
  _mark_dynamics(axp, axe, axl, rows)
  _mark_tier_events(axp, (axp, axe, axl), audit)
  for ax in (axp, axe, axl):
    ax.grid(True, alpha=0.25)
  axp.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
  axe.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
  axl.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _posterior_panel(axp, rows, mon: dict) -> None:
  """P(node settled) per network node, the thresholds, conflicts and the decision."""
  colours = {"structural": "C0", "functional": "C1", "generalisation": "C2",
             "converged": "k"}
  for node in NODES:
    st, v = series(rows, f"monitor/p_{node}")
    if st.size:
      axp.plot(st, v, color=colours[node], lw=2.0 if node == "converged" else 1.2,
               label=f"P({node})")
  thr = mon.get("threshold")
  if thr is not None:
    axp.axhline(thr, color="k", ls="--", lw=0.8, label=f"decision threshold {thr:g}")
  for t in mon.get("tier_thresholds", ()):
    axp.axhline(t, color="0.6", ls=":", lw=0.8)
  st, conflict = series(rows, "monitor/conflict")
  for i, (a, b) in enumerate(_spans(st, conflict > 0)):
    axp.axvspan(a, b, color="C4", alpha=0.12, lw=0, label="conflict (decision frozen)"
                if i == 0 else None)
  st, decision = series(rows, "monitor/decision")
  for i, (a, b) in enumerate(_spans(st, decision > 0)):
    axp.axvspan(a, b, ymin=0.97, ymax=1.0, color="C3", alpha=0.8, lw=0,
                label="decision: converged" if i == 0 else None)
  axp.set_ylim(-0.03, 1.03)
  axp.set_ylabel("posterior P(node settled)")


def _evidence_panel(axe, rows) -> None:
  """Signed evidence strength per monitored metric (+ stable / − moving)."""
  metrics = sorted({k[len("monitor/strength/"):] for r in rows for k in r
                    if k.startswith("monitor/strength/")})
  for i, name in enumerate(metrics):
    st, strength = series(rows, f"monitor/strength/{name}")
    _, direction = series(rows, f"monitor/direction/{name}")
    if not st.size or direction.size != strength.size:
      continue
    signed = np.where(direction == 0, strength, -strength)
    axe.plot(st, signed, color=f"C{i % 10}", lw=1.0, label=name,
             marker="o" if st.size <= 40 else None, ms=3)
  axe.axhline(0, color="k", lw=0.6)
  axe.set_ylim(-1.05, 1.05)
  axe.set_ylabel("evidence strength\n+ stable / − moving")


def _loss_panel(axl, rows) -> None:
  """Training and evaluation loss (log scale)."""
  for key, label, colour in (("train/loss", "train loss", "C0"),
                             ("eval/loss", "eval loss", "C1")):
    st, v = series(rows, key, positive=True)
    if st.size:
      axl.plot(st, v, color=colour, label=label, marker="o" if key == "eval/loss" else None,
               ms=3, lw=1.0)
  axl.set_yscale("log")
  axl.set_ylabel("loss")
  axl.set_xlabel("step")


def _mark_dynamics(axp, axe, axl, rows) -> None:
  """Edge-of-stability spans, unsettled dynamics and anomalies on the panels."""
  # Edge-of-stability oscillation: light orange spans on every panel; unsettled dynamics (a
  # level shift or η·λ_c above the limit inside the evidence window, which block "converged"):
  # a grey strip along the bottom of the posterior panel.
  st, flag = series(rows, "monitor/eos_oscillation")
  for j, (lo, hi) in enumerate(_spans(st, flag > 0)):
    for ax in (axp, axe, axl):
      ax.axvspan(lo, hi, color="orange", alpha=0.2, lw=0,
                 label="edge-of-stability oscillation" if (j == 0 and ax is axl) else None)
  st, flag = series(rows, "monitor/unsettled")
  for j, (lo, hi) in enumerate(_spans(st, flag > 0)):
    axp.axvspan(lo, hi, ymin=0.0, ymax=0.03, color="0.4", alpha=0.8, lw=0,
                label="unsettled: no convergence" if j == 0 else None)
  # Anomalies: red lines on every panel (non-finite losses are absent from the loss curve).
  st, flag = series(rows, "monitor/anomaly")
  anomalies = st[flag > 0]
  for ax in (axp, axe, axl):
    for j, a in enumerate(anomalies):
      ax.axvline(a, color="red", lw=0.8, alpha=0.5,
                 label="anomaly" if (j == 0 and ax is axl) else None)


def _mark_tier_events(axp, axes, audit: list[dict]) -> None:
  """Checkpoint saves, promotions and emergency saves from the audit log."""
  # Tier events: saves and promotions of checkpoints, coloured by tier, at the step they
  # happened (a save of checkpoint s happens after loop step s − 1).
  seen = set()
  for rec in audit:
    ev = rec.get("event")
    if ev not in ("checkpoint", "promotion"):
      continue  # decisions are in the metrics; anomalies are drawn below
    tier = rec.get("tier", "preliminary")
    x = rec.get("checkpoint", rec.get("step")) if ev == "checkpoint" else rec.get("step")
    marker = "v" if ev == "checkpoint" else "^"
    label = f"{'save' if ev == 'checkpoint' else 'promotion'}: {tier}"
    axp.plot([x], [1.0], marker, color=TIER_COLOURS.get(tier, "k"), ms=8 if ev == "promotion"
             else 6, transform=axp.get_xaxis_transform(), clip_on=False, ls="none",
             label=None if label in seen else label)
    seen.add(label)
    if ev == "promotion":
      for ax in axes:
        ax.axvline(x, color=TIER_COLOURS.get(tier, "k"), ls="--", lw=0.9, alpha=0.7)
  for rec in audit:
    if rec.get("event") == "anomaly" and rec.get("emergency_checkpoint"):
      label = "emergency checkpoint"
      axp.plot([rec["step"]], [1.0], "*", color="red", ms=11, ls="none", clip_on=False,
               transform=axp.get_xaxis_transform(), label=None if label in seen else label)
      seen.add(label)


def plot_distillation(rows, config: dict, path: str) -> None:
  """A distillation run: the loss terms over steps, the student's eval loss against the
  teacher's, and the fusion weight of each term (the gate's batch means for
  ``fusion='gated'``; dashed: the adaptive controller's scales)."""
  fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
  for key in ["train/loss"] + [f"distill/{t}" for t in DISTILL_TERMS]:
    s, v = series(rows, key)
    if len(s):
      a1.plot(s, v, label=key, lw=1)
  a1.set_yscale("symlog", linthresh=1e-3)
  a1.set_title("training objective and its terms")
  for key, label in (("eval/loss", "student eval CE"),
                     ("distill/teacher_eval_loss", "teacher eval CE")):
    s, v = series(rows, key)
    if len(s):
      a2.plot(s, v, "o-", label=label, ms=3)
  a2.set_title("eval cross-entropy (nats/char)")
  for t in DISTILL_TERMS:
    s, v = series(rows, f"distill/weight/{t}")
    if len(s):
      a3.plot(s, v, label=t, lw=1)
    s, v = series(rows, f"distill/scale/{t}")
    if len(s):
      a3.plot(s, v, ls="--", lw=1, label=f"controller scale {t}")
  a3.set_title("fusion weight per term")
  for ax in (a1, a2, a3):
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  d = config.get("distill", {})
  fig.suptitle(f"distillation: method={d.get('method')}, fusion={d.get('fusion')}, "
               f"adaptive={d.get('adaptive')}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_comparison(results: dict[str, dict], path: str) -> None:
  """Bars of student eval loss and perplexity per preset of a distillation comparison
  (``experiments.distillation.compare``), the teacher as a dashed line."""
  names = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, key, tkey in ((axes[0], "eval/loss", "teacher/eval_loss"),
                        (axes[1], "eval/perplexity", "teacher/eval_perplexity")):
    vals = [results[n][key] for n in names]
    bars = ax.bar(names, vals, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(results[names[0]][tkey], color="k", ls="--", label="teacher")
    lo = min(vals + [results[names[0]][tkey]])
    ax.set_ylim(lo * 0.95, max(vals) * 1.02)
    ax.set_title(f"student {key}")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def make_plots(run_dir: str) -> list[str]:
  """Write every plot that the run's metrics support; returns the PNG paths."""
  rows = read_metrics(run_dir)
  config = read_config(run_dir)
  out_dir = os.path.join(run_dir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  title = _title(run_dir, config)
  paths = []
  if rows and "distill" in config:
    paths.append(os.path.join(out_dir, "distill.png"))
    plot_distillation(rows, config, paths[-1])
  elif rows:
    paths.append(os.path.join(out_dir, "sharpness.png"))
    plot_sharpness(rows, config, paths[-1], title)
    if relative_keys(rows):
      paths.append(os.path.join(out_dir, "relative_sharpness.png"))
      plot_relative(rows, config, paths[-1], title)
    if any("monitor/p_converged" in r for r in rows):
      paths.append(os.path.join(out_dir, "convergence.png"))
      # records (the audit reader of every runner) imports JAX: only this plot needs it.
      from experiments import records  # pylint: disable=g-import-not-at-top
      plot_convergence(rows, records.read_audit(run_dir), config, paths[-1], title)
  return paths


_USAGE = "usage: python -m experiments.plots --workdir=RUN_DIR (or RUN_DIR; --help for more)."


def main(argv: list[str]) -> None:
  """absl main of ``python -m experiments.plots --workdir=RUN_DIR``: prints the PNG paths.

  ``argv``: the program name and the positional arguments (``RUN_DIR`` may be given as one,
  instead of ``--workdir``). A missing or unplottable run directory exits with status 1 and a
  one-line message.
  """
  workdir = None if _WORKDIR is None else _WORKDIR.value
  run_dirs = list(argv[1:]) + ([workdir] if workdir else [])
  if len(run_dirs) != 1:
    got = "no run directory" if not run_dirs else f"{len(run_dirs)} run directories {run_dirs}"
    sys.exit(f"usage error: got {got}; {_USAGE}")
  run_dir = run_dirs[0]
  if not os.path.isdir(run_dir):
    sys.exit(f"plots error: run directory {run_dir!r} "
             f"{'is not a directory' if os.path.exists(run_dir) else 'does not exist'}.")
  if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    sys.exit(f"plots error: no metrics.jsonl in {run_dir!r} (not a run directory of "
             "python -m experiments.run?).")
  for p in make_plots(run_dir):
    print(p)


_WORKDIR = None  # the --workdir flag, defined by _cli (experiments.run defines its own)


def _cli() -> None:
  """absl entry point: ``--help`` prints this module's docstring and the flags (exit 0); a
  bad flag exits 1 with one line."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  global _WORKDIR
  # Defined here, not at import: the trainer imports this module, and a program that imports
  # the trainer may define its own --workdir.
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to plot (or pass it as RUN_DIR).")

  def parse(argv: list[str]) -> list[str]:
    if any(a.split("=", 1)[0] in ("-h", "--help", "-help", "--helpshort", "-?", "--helpfull")
           for a in argv[1:]):
      sys.stdout.write(f"{__doc__}\nflags:\n{flags.FLAGS.main_module_help()}\n")
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f"flag error: {e}; {_USAGE}")

  app.run(main, flags_parser=parse)


if __name__ == "__main__":
  _cli()
