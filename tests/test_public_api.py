"""The packages' public API: ``__all__`` is the namespace, building blocks stay in modules.

Each of ``curvature``, ``distill`` and ``convergence`` exports exactly its ``__all__`` (no
public name beside it, none missing); the building blocks behind the public functions are
importable from their modules but not exported; and the naming rule holds: every exported
``*_probe`` is an optax transformation.
"""

import importlib
import inspect

import pytest

PACKAGES = ("curvature", "distill", "convergence")
BUILDING_BLOCKS = {
    "curvature._lanczos": ("lanczos_tridiag", "LanczosDecomposition"),
    "curvature._tree": ("tree_vdot", "tree_norm", "tree_random_like"),
    "distill._divergences": ("pointwise_loss", "REDUCTIONS"),
    "distill._fusion": ("weighted_sum", "fuse"),
    "distill._strategy": ("scale_by_group_schedule",),
    "distill._weights": ("weights_from_scores", "default_importance_scores"),
    "convergence._network": ("joint_log_table", "decay_evidence", "unknown_context",
                             "node_log_likelihood", "detect_conflict"),
    "convergence._windows": ("steady_state_gain", "MetricWindowState"),
    "convergence._anomaly": ("robust_zscore",),
    "convergence._checkpoint": ("retained_steps",),
}


@pytest.mark.parametrize("package", PACKAGES)
def test_namespace_is_all(package):
  module = importlib.import_module(package)
  public = {n for n in vars(module) if not n.startswith("_")}
  assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"
  assert public == set(module.__all__), (sorted(public - set(module.__all__)),
                                         sorted(set(module.__all__) - public))


@pytest.mark.parametrize("module_name", sorted(BUILDING_BLOCKS))
def test_building_blocks_stay_in_their_modules(module_name):
  module = importlib.import_module(module_name)
  package = importlib.import_module(module_name.split(".")[0])
  for name in BUILDING_BLOCKS[module_name]:
    assert hasattr(module, name), f"{module_name}.{name}"
    assert name not in package.__all__ and not hasattr(package, name), name


@pytest.mark.parametrize("package", PACKAGES)
def test_every_probe_is_an_optax_transformation(package):
  module = importlib.import_module(package)
  for name in module.__all__:
    if name.endswith("_probe"):
      returns = inspect.signature(getattr(module, name)).return_annotation
      assert "GradientTransformation" in str(returns), name


def test_plot_status_codes_match_the_library():
  # experiments.plots keeps its own copy of the codes so that plotting needs no JAX.
  import curvature  # pylint: disable=g-import-not-at-top
  from experiments import plots  # pylint: disable=g-import-not-at-top
  assert (plots._STATUS_NO_RISE, plots._STATUS_NOT_DESCENT, plots._STATUS_NONFINITE,
          plots._STATUS_UNRESOLVED) == (curvature.STATUS_NO_RISE, curvature.STATUS_NOT_DESCENT,
                                        curvature.STATUS_NONFINITE, curvature.STATUS_UNRESOLVED)
