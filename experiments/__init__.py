"""losslab.experiments — the runnable layer: models (Flax NNX), data, trainer, CLI and plots.

Run an experiment config::

  python -m experiments.run --config=configs/edge_of_stability.py:smoke --workdir=runs/eos
  python -m experiments.plots runs/eos          # redraw the plots from metrics.jsonl

or from Python::

  from experiments import load_config, train_and_evaluate
  train_and_evaluate(load_config("configs/edge_of_stability.py:smoke"), "runs/eos")

This package composes ``curvature`` (and later ``distill`` / ``convergence``); nothing in
those libraries imports it. The trainer and plots are imported on first use, so
``python -m experiments.plots`` does not pay for importing JAX.
"""

from experiments.config_lib import default_config
from experiments.config_lib import load_config
from experiments.config_lib import validate_config

_LAZY = {
    "train_and_evaluate": "experiments.trainer",
    "TrainingDiverged": "experiments.trainer",
    "TrainState": "experiments.trainer",
    "make_plots": "experiments.plots",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'experiments' has no attribute {name!r}")
