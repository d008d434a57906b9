r"""Kalra et al. 2026, Fig. 4: two-stage training, λ_c measured offline on saved checkpoints.

The paper (arXiv 2601.16979, §4, Fig. 4) measures the critical sharpness λ_c = 2/η_c,
η_c = min{η > 0 : L(θ − ηΔθ) > L(θ)}, on the public OLMo-2 7B checkpoints (Walsh et al. 2025,
arXiv 2501.00656): pre-training (2,000 warmup steps, then a cosine decay towards 0.1× the peak
learning rate) and mid-training on a new mix (about half of it pre-training data, learning rate
decayed linearly to zero; three runs). "Critical sharpness decreases rapidly during the initial
phase of training, but then continually increases (progressive sharpening) throughout both the
pre-training and mid-training stages." No threshold is claimed.

In miniature (``configs/two_stage.py``): a tiny GPT with AdamW, stage 1 on Python code, stage 2
on a 50/50 code/prose mix (one run whose schedule and data change at the same step), three
seeds, a checkpoint every ``checkpoint.every`` steps. Afterwards, the ``collect`` stage measures
λ_c on every checkpoint with ``experiments.measure``: along Δθ = the update the saved AdamW
state takes on a batch's gradient (unit learning rate), on the same ``BATCHES`` held-out code
batches for every checkpoint (the pre-training data, half of the stage-2 mix), median and
min–max band across them.

The criterion (:func:`shape`), per seed, on windowed medians of λ_c over ``WINDOWS`` equal step
windows: an early fall (the smallest window median among the first ``EARLY`` of the steps is at
most ``FALL`` × the first window's), then a steady rise from that minimum to the end (the last
window at least ``RISE`` × the minimum, Spearman correlation of the window medians from the
minimum on with the step at least ``RANK``). "yes" if all seeds meet both parts, "partly" if
all meet the rise, else "no". Also shown, not judged: the fall from the largest window median
before the minimum (a tiny GPT at its initialisation, 0.02-normal weights and logits ≈ 0, is
flat: λ_c climbs for its first ~15 steps before it falls, inside the first window).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments import criteria
from experiments.plots import series  # (steps, values) of a metric's finite values
from experiments.repro_base import Reproduction, Run

CONFIG = "configs/two_stage.py"
SEEDS = (0, 1, 2)
BATCHES = 4  # held-out batches per checkpoint (the band)
KEY = "curv/critical_sharpness"
# The criterion, fixed before the runs it judges.
WINDOWS = 20  # equal step windows of the checkpoints
EARLY = 0.2  # the early phase: the first 20 % of the steps
FALL = 0.7  # early fall: min window median in the early phase ≤ 0.7 × the first window's
RISE = 1.5  # rise: last window median ≥ 1.5 × that minimum ...
RANK = 0.7  # ... and Spearman(window median, step) ≥ 0.7 from the minimum's window on


def _label(seed: int) -> str:
  return f"seed{seed}"


def _seeds(rows: dict[str, list[dict]]) -> list[int]:
  """The seeds with rows (all of them; ``--smoke`` trains the first only)."""
  return [s for s in SEEDS if _label(s) in rows]


def _runs(smoke: bool) -> list[Run]:
  spec = f"{CONFIG}:smoke" if smoke else CONFIG
  return [Run(_label(s), spec, {"seed": s, "progress_bar": False})
          for s in (SEEDS[:1] if smoke else SEEDS)]


def _collect(workdir: str, run_dirs: dict[str, str], smoke: bool) -> dict[str, list[dict]]:
  """λ_c on every checkpoint of every run (``experiments.measure``), each row marked with its
  stage (1 before ``data.switch_step``, 2 from it on)."""
  from experiments import measure  # pylint: disable=g-import-not-at-top
  del workdir, smoke
  out = {}
  for label, run_dir in run_dirs.items():
    switch = int(measure.load_run_config(run_dir).data.switch_step)
    rows = measure.measure_run(run_dir, probes=("critical",), batches=BATCHES,
                               progress_bar=False, plot=False)
    out[label] = [{**r, "stage": 2 if switch and r["step"] >= switch else 1} for r in rows]
  return out


class Shape(NamedTuple):
  """One seed's curve against the criterion (windowed medians of λ_c)."""
  first: float  # the first window's median
  peak: float  # the largest window median up to ``low``'s window
  low: float  # the smallest window median in the early phase
  low_step: float  # its window centre
  fall: float  # low / first (judged)
  peak_fall: float  # low / peak (shown)
  end: float  # the last window's median
  rise: float  # end / low
  rank: float  # Spearman(window median, step) from the low's window on
  stage2_rise: float  # last / first λ_c of stage 2 (shown, not judged)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation of the ranks (average ranks for ties; Spearman 1904)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if x.size < 3:
    return float("nan")
  return float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])


def shape(rows: list[dict]) -> Shape:
  """The criterion's figures for one seed's checkpoint rows."""
  steps, lam = series(rows, KEY, positive=True)
  centres, med = criteria.window_medians(steps, lam, WINDOWS)
  ok = np.isfinite(med)
  c, m = centres[ok], med[ok]
  early = c <= steps.min() + EARLY * (steps.max() - steps.min())
  j = int(np.argmin(np.where(early, m, np.inf)))
  peak = float(m[:j + 1].max())
  stage2 = [r[KEY] for r in rows
            if r.get("stage") == 2 and r.get(KEY) is not None and np.isfinite(r[KEY])]
  s2 = stage2[-1] / stage2[0] if len(stage2) >= 2 else float("nan")
  return Shape(float(m[0]), peak, float(m[j]), float(c[j]), float(m[j] / m[0]),
               float(m[j] / peak), float(m[-1]), float(m[-1] / m[j]), _spearman(c[j:], m[j:]),
               float(s2))


def _judge(rows: dict[str, list[dict]]) -> tuple[str, bool | str]:
  parts, falls, rises = [], [], []
  for seed in _seeds(rows):
    s = shape(rows[_label(seed)])
    falls.append(s.fall <= FALL)
    rises.append(s.rise >= RISE and s.rank >= RANK)
    parts.append(f"seed {seed}: early min/first window = {s.fall:.2f} (λ_c {s.first:.0f} → "
                 f"{s.low:.0f} at step ≈ {s.low_step:.0f}; min/early max = {s.peak_fall:.2f}), "
                 f"end/min = {s.rise:.2f}, Spearman = {s.rank:.2f}; stage 2 last/first "
                 f"checkpoint = {s.stage2_rise:.2f}")
  verdict = True if all(falls) and all(rises) else ("partly" if all(rises) else False)
  if len(parts) < len(SEEDS):  # --smoke: one seed, not a verdict on the claim
    verdict = False
    parts.append(f"only {len(parts)} of {len(SEEDS)} seeds")
  return "; ".join(parts) + f" ({WINDOWS} windowed medians)", verdict


def _plot(rows: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [3, 2]})
  get = lambda r, k: np.array([x.get(k, np.nan) if x.get(k) is not None else np.nan for x in r],
                              np.float64)
  for i, seed in enumerate(_seeds(rows)):
    r = rows[_label(seed)]
    s = get(r, "step")
    ax.plot(s, get(r, KEY), "o-", ms=2.5, lw=0.9, color=f"C{i}", label=f"seed {seed}")
    ax.fill_between(s, get(r, f"{KEY}/min"), get(r, f"{KEY}/max"), color=f"C{i}", alpha=0.15,
                    lw=0)
    centres, med = criteria.window_medians(*series(r, KEY, positive=True), WINDOWS)
    ax.plot(centres, med, "s", ms=4, mfc="none", color=f"C{i}")
  first = rows[_label(_seeds(rows)[0])]
  switch = next((x["step"] for x in first if x.get("stage") == 2), None)
  lr = ax.twinx()
  lr.plot(get(first, "step"), get(first, "train/lr"), color="0.5", ls="--", lw=1)
  lr.set_ylabel("learning rate η (dashed)", color="0.4")
  if switch is not None:
    ax.axvline(switch, color="k", lw=0.8, ls=":")
  ax.set_yscale("log")
  ax.set_xlabel("step (checkpoint)")
  ax.set_ylabel(r"$\lambda_c$ (median, min–max over held-out batches)")
  ax.set_title("both stages (squares: windowed medians; dotted: start of stage 2)", fontsize=9)
  ax.legend(fontsize=8, loc="lower right")
  _plot_stage2(ax2, rows)
  fig.suptitle("Kalra et al. 2026 Fig. 4 in miniature: tiny GPT, AdamW, code → code/prose mix, "
               r"$\lambda_c$ measured offline on the checkpoints", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_stage2(ax, rows: dict[str, list[dict]]) -> None:
  """Stage 2 from the last stage-1 checkpoint on: the mean over seeds with the range across
  seeds (the paper's mid-training panel shows the band across its three runs)."""
  runs = [{x["step"]: x.get(KEY) for x in rows[_label(s)]} for s in _seeds(rows)]
  switch = next((x["step"] for x in rows[_label(_seeds(rows)[0])] if x.get("stage") == 2), None)
  if switch is None:
    return
  before = [s for s in runs[0] if s < switch]
  steps = sorted(s for s in runs[0] if s >= (max(before) if before else switch))
  table = np.array([[r.get(s) if r.get(s) is not None else np.nan for s in steps]
                    for r in runs], np.float64)
  ax.plot(steps, np.nanmean(table, 0), "o-", color="k", ms=3, lw=1,
          label=f"mean of {len(runs)} seeds")
  ax.fill_between(steps, np.nanmin(table, 0), np.nanmax(table, 0), color="0.6", alpha=0.35,
                  lw=0, label="range across seeds")
  ax.axvline(switch, color="k", lw=0.8, ls=":")
  ax.set_xlabel("step (checkpoint)")
  ax.set_title("stage 2 (mid-training on the code/prose mix)", fontsize=9)
  ax.legend(fontsize=8, loc="upper left")


REPRODUCTIONS = (
    Reproduction(
        "two_stage", "Kalra et al. 2026, Fig. 4",
        f"λ_c on the checkpoints, per seed ({len(SEEDS)} seeds), {WINDOWS} windowed medians: "
        f"early fall (min window median in the first {EARLY:.0%} of steps ≤ {FALL} × the "
        f"first window's), then a steady rise (last window ≥ {RISE} × that "
        f"minimum and Spearman correlation of the window medians with step ≥ {RANK} from the "
        "minimum on); yes if "
        "every seed meets both, partly if every seed meets the rise",
        _runs, _judge, _plot, collect=_collect),
)
