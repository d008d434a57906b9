r"""Paper reproductions: several runs, one figure, a quantitative criterion and a verdict.

``python -m experiments.reproduce --name=NAME --workdir=DIR [--smoke]`` runs every run of the
reproduction under ``DIR/<label>`` (a finished run is resumed, i.e. skipped), then writes
``DIR/NAME.png``, ``DIR/report.json`` and prints the README table row: paper figure · command ·
time · the criterion · the measured value · matches?  ``--list`` lists the reproductions.

Each reproduction states its criterion before the runs it judges; the thresholds are the
paper's words turned into numbers (e.g. "plateaus at 2/η" = the median of λ_max/(2/η) over the
last 30 % of training within [0.9, 1.2]). ``--smoke`` shrinks every run to seconds to exercise
the pipeline; its verdicts are not judged.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from experiments import criteria
from experiments import plots
from experiments.plots import series  # (steps, values) of a metric's finite values

from experiments.repro_base import EOS, Reproduction, Run, threshold as _threshold


# ---------------------------------------------------------------------------------------------
# Kalra et al. 2026, Fig. 2: GD at three batch sizes.
# ---------------------------------------------------------------------------------------------

BATCHES = (("full", 0), ("medium", 100), ("small", 10))  # 1,000 training images: 1, 1/10, 1/100
CURVES = ("curv/lambda_max", "curv/directional_sharpness", "curv/critical_sharpness")


def _batch_runs(smoke: bool) -> list[Run]:
  spec = f"{EOS}:gd,smoke" if smoke else f"{EOS}:gd"
  steps = {"num_steps": 40} if smoke else {}
  return [Run(label, spec, {"batch_size": b, **steps}) for label, b in BATCHES]


def _judge_batch(rows: dict[str, list[dict]]) -> tuple[str, bool | str]:
  full = rows["full"]
  lam, crit = "curv/lambda_max", "curv/critical_sharpness"
  lmax = criteria.tail_ratio(*series(full, lam), _threshold(full, lam))
  c_tail = criteria.tail_ratio(*series(full, crit), _threshold(full, crit))
  c_rise = criteria.rise_profile(*series(full, crit))
  full_ok = 0.9 <= lmax <= 1.2 and 0.8 <= c_tail <= 1.2 and c_rise.largest_jump_share >= 0.5
  parts = [f"full batch: λ_max/(2/η) = {lmax:.2f}, λ_c/(2/η) = {c_tail:.2f} over the last 30 %, "
           f"{c_rise.largest_jump_share:.0%} of λ_c's rise in one window (step ≈ "
           f"{c_rise.jump_step:.0f})"]
  gradual = {}
  for label, _ in BATCHES[1:]:
    profiles = {k: criteria.rise_profile(*series(rows[label], k)) for k in CURVES}
    gradual[label] = all(p.rise >= 1.5 and p.largest_jump_share < 0.5
                         for p in profiles.values())
    parts.append(f"{label}: " + ", ".join(
        f"{_SHORT[k]} ×{p.rise:.2f}" + (f" ({p.largest_jump_share:.0%} in one window)"
                                        if p.rise > 1 else "") for k, p in profiles.items()))
  parts.append(f"warm λ_c: {_warm_evals(full).mean():.2f} forward passes on average")
  if full_ok and all(gradual.values()):
    verdict = True
  elif full_ok:  # the abrupt full-batch rise holds, the gradual small-batch one does not
    verdict = "partly"
  else:
    verdict = False
  return "; ".join(parts), verdict


_SHORT = {"curv/lambda_max": "λ_max", "curv/directional_sharpness": "λ_dir",
          "curv/critical_sharpness": "λ_c"}


def _warm_evals(rows: list[dict]) -> np.ndarray:
  _, n = series(rows, "curv/num_evals")
  return n[1:]  # the first measurement starts from the default guess (cold)


def _plot_batch(rows: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
  labels = {"curv/lambda_max": r"$\lambda_{max}$", "curv/directional_sharpness":
            r"$\lambda_{dir}$", "curv/critical_sharpness": r"$\lambda_c$"}
  for ax, (label, b) in zip(axes, BATCHES):
    r = rows[label]
    for key, colour in zip(CURVES, ("C1", "C4", "C0")):
      s, v = series(r, key)
      style = "o" if key == "curv/lambda_max" else "-"
      ax.plot(s, v, style, color=colour, ms=2.5, lw=0.8, label=labels[key])
    s, _ = series(r, "curv/critical_sharpness")
    ax.plot(s, _threshold(r, "curv/critical_sharpness"), "k--", lw=1, label=r"$2/\eta$")
    ax.set_yscale("log")
    ax.set_title(f"{label} batch" + (f" ({b} examples)" if b else " (all examples)"))
    ax.set_xlabel("step")
  axes[0].legend(fontsize=8)
  ev = _warm_evals(rows["full"])
  axes[3].hist(ev, bins=np.arange(ev.min() - 0.5, ev.max() + 1.5) if ev.size else 10)
  axes[3].set_title("forward passes per warm λ_c (full batch)")
  axes[3].set_xlabel("evaluations")
  fig.suptitle("Kalra et al. 2026 Fig. 2 in miniature: GD on digits, 2×200 tanh MLP, η = 0.1")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Cohen et al. 2021, Fig. 1: λ_max plateaus at 2/η for every learning rate.
# ---------------------------------------------------------------------------------------------

# 2/η = 18.2, 20, 25, all above λ_max's early minimum (15.6) and reached within η·t ≈ 120;
# steps ∝ 1/η: every run lasts the same "time" η·t = 300. (2/η = 30 and 40 are not reached by
# η·t = 200: λ_max follows one gradient-flow curve, 27 at η·t = 200, see the README.)
LEARNING_RATES = (0.11, 0.1, 0.08)
HORIZON = 300.0  # η·t of every run


def _lr_runs(smoke: bool) -> list[Run]:
  runs = []
  for lr in LEARNING_RATES:
    over = {"optimizer.learning_rate": lr, "probe.critical": True, "probe.directional": False,
            "num_steps": 40 if smoke else int(round(HORIZON / lr))}
    if not smoke:
      over["probe.lanczos_every"] = int(round(1.0 / lr))
    runs.append(Run(f"lr{lr:g}", f"{EOS}:gd,smoke" if smoke else f"{EOS}:gd", over))
  return runs


def _judge_lr(rows: dict[str, list[dict]]) -> tuple[str, bool]:
  parts, ok = [], True
  for lr in LEARNING_RATES:
    r = rows[f"lr{lr:g}"]
    ratio = criteria.tail_ratio(*series(r, "curv/lambda_max"), _threshold(r, "curv/lambda_max"))
    ok &= 0.9 <= ratio <= 1.2
    parts.append(f"η={lr:g}: λ_max/(2/η) = {ratio:.2f}")
  return "; ".join(parts) + " (median over the last 30 %)", bool(ok)


def _plot_lr(rows: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, lr in enumerate(LEARNING_RATES):
    r = rows[f"lr{lr:g}"]
    s, v = series(r, "curv/lambda_max")
    ax.plot(s * lr, v, "o-", ms=2, lw=0.8, color=f"C{i}", label=f"η = {lr:g}")
    ax.axhline(2.0 / lr, color=f"C{i}", ls="--", lw=1)
  ax.set_xlabel("step × η")
  ax.set_ylabel(r"$\lambda_{max}$ (Lanczos)")
  ax.set_title("Cohen et al. 2021 Fig. 1 in miniature: λ_max against 2/η (dashed)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_HERE = (
    Reproduction(
        "batch_size", "Kalra et al. 2026, Fig. 2",
        "full batch: λ_max/(2/η) in [0.9, 1.2] and λ_c/(2/η) in [0.8, 1.2] over the last "
        "30 %, with ≥ 50 % of λ_c's rise between two of 20 windows (abrupt); medium (1/10) "
        "and small (1/100) batch: λ_max, λ_dir, λ_c each rise ≥ 1.5× (last vs first window "
        "median) with < 50 % of the rise in one window (gradual)",
        _batch_runs, _judge_batch, _plot_batch),
    Reproduction(
        "lr_sweep", "Cohen et al. 2021, Fig. 1",
        "for η = 0.11, 0.1, 0.08: λ_max/(2/η) in [0.9, 1.2] over the last 30 %",
        _lr_runs, _judge_lr, _plot_lr),
)


# Modules that each define ``REPRODUCTIONS``, a tuple of :class:`Reproduction` (imported here so
# ``--list`` and ``--name`` see them; they import only ``repro_base``, never this module).
_MODULES = ("repro_adamw", "repro_two_stage", "repro_mixing", "repro_cost")


def _collect_registry() -> dict[str, Reproduction]:
  import importlib  # pylint: disable=g-import-not-at-top
  reps = list(_HERE)
  for module in _MODULES:
    reps.extend(importlib.import_module(f"experiments.{module}").REPRODUCTIONS)
  names = [r.name for r in reps]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate reproduction names: {names}")
  return {r.name: r for r in reps}


REPRODUCTIONS = _collect_registry()


def reproduce(name: str, workdir: str, *, smoke: bool = False) -> dict[str, Any]:
  """Runs (or resumes) every run of reproduction ``name`` and judges it; returns the report."""
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  if name not in REPRODUCTIONS:
    raise ValueError(f"unknown reproduction {name!r}; accepted: {sorted(REPRODUCTIONS)}.")
  rep = REPRODUCTIONS[name]
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  run_dirs = {}
  for run in rep.runs(smoke):
    run_dirs[run.label] = os.path.join(workdir, run.label)
    config = config_lib.load_config(run.config, run.overrides)
    trainer.train_and_evaluate(config, run_dirs[run.label])
  if rep.collect is None:
    rows = {label: plots.read_metrics(d) for label, d in run_dirs.items()}
  else:
    rows = rep.collect(workdir, run_dirs, smoke)
  seconds = time.perf_counter() - start
  text, ok = rep.judge(rows)
  figure = os.path.join(workdir, f"{name}.png")
  rep.plot(rows, figure)
  report = {"name": name, "figure": rep.figure, "criterion": rep.claim, "measured": text,
            "matches": None if smoke else ok, "seconds": round(seconds, 1),
            "image": figure, "smoke": smoke,
            "command": f"python -m experiments.reproduce --name={name} --workdir={workdir}"
                       + (" --smoke" if smoke else "")}
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  return report


def table_row(report: dict[str, Any]) -> str:
  """The README "Reproductions" table row of a report."""
  verdict = {True: "**yes**", False: "**no**", "partly": "**partly**",
             None: "not judged (smoke)"}[report["matches"]]
  return (f"| {report['figure']} | `{report['command']}` | {report['seconds']:.0f} s | "
          f"![]({report['image']}) | {report['criterion']} | {report['measured']} | {verdict} |")


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.list:
    for r in REPRODUCTIONS.values():
      print(f"{r.name:12s} {r.figure}: {r.claim}")
    return
  if not f.name or not f.workdir:
    raise SystemExit("give --name (one of " + ", ".join(REPRODUCTIONS) + ") and --workdir.")
  report = reproduce(f.name, f.workdir, smoke=f.smoke)
  print(table_row(report))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("name", None, "the reproduction to run (see --list)")
  flags.DEFINE_string("workdir", None, "directory of the runs, the figure and report.json")
  flags.DEFINE_bool("smoke", False, "shrink every run to seconds; verdicts are not judged")
  flags.DEFINE_bool("list", False, "list the reproductions and their criteria")
  app.run(main)
