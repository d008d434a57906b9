"""What a paper reproduction is: its runs, its criterion, its judge and its figure.

Each reproduction module (``experiments/reproduce.py`` and the ``experiments/repro_*.py``
modules) builds :class:`Reproduction` values; ``experiments.reproduce`` collects them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from experiments.plots import series  # (steps, values) of a metric's finite values

EOS = "configs/edge_of_stability.py"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a reproduction: a config spec, overrides and a label."""
  label: str
  config: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reproduction:
  """A published claim, the runs that test it, and how to judge and draw them."""
  name: str
  figure: str  # the paper's figure, e.g. "Kalra et al. 2026, Fig. 2"
  claim: str  # the criterion in words, with its thresholds
  runs: Callable[[bool], list[Run]]  # smoke -> runs
  # rows per label -> (measured text, verdict: True, False or "partly")
  judge: Callable[[dict[str, list[dict]]], tuple[str, bool | str]]
  plot: Callable[[dict[str, list[dict]], str], None]  # rows per label, path
  # Optional stage after the runs: (workdir, run directory per label, smoke) -> rows per label.
  # Default: each run's metrics.jsonl. Offline measurements (probes on saved checkpoints, a
  # fine-tuning grid from a run's checkpoint, a cost table) return their own rows here.
  collect: Callable[[str, dict[str, str], bool], dict[str, list[dict]]] | None = None


def threshold(rows: list[dict], key: str) -> np.ndarray:
  """2/η(t) at each step where ``key`` was measured (η as logged in ``train/lr``)."""
  lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
  steps, _ = series(rows, key)
  return np.array([2.0 / lr.get(int(s), np.nan) for s in steps])
