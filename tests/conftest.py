"""Settings for the whole test suite, applied before anything imports JAX.

Most of the suite's time is XLA compiling small programs, many of them several times: the
same smoke config's train step in several test modules, in both xdist workers, and again in the
child processes (the CLI runs, the SIGKILL resumes, the 8-device checks). Two settings cut it:

* One persistent compilation cache for the whole ``pytest`` invocation, shared by the xdist
  workers and every child process (they inherit ``JAX_COMPILATION_CACHE_DIR``): a program is
  compiled once and loaded everywhere else. The directory is created by the first process
  (the xdist controller, or a plain ``pytest``) and removed when it exits. Loading an
  executable instead of compiling the same program again changes no result.
* XLA's CPU backend at optimisation level 0 (``--xla_backend_optimization_level=0``), without
  LLVM's expensive passes (``--xla_llvm_disable_expensive_passes=true``): LLVM compiles about
  3x faster, and another 7-16 % with the second flag (two test modules, 2026-12-07); the
  programs run somewhat slower, which these small tests do not feel. It can move last bits against a default-level build, so the suite compares bit for bit
  only programs compiled alike; everything else uses tolerances derived from the dtype.

``LOSSLAB_TEST_XLA_DEFAULTS=1`` runs the suite at XLA's default optimisation level instead
(what a user's run compiles with). Flags the caller already set in ``XLA_FLAGS`` are kept.
"""

import os
import shutil
import tempfile

import pytest

_OWNER = "LOSSLAB_TEST_JAX_CACHE" not in os.environ
if _OWNER:
  os.environ["LOSSLAB_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="losslab-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["LOSSLAB_TEST_JAX_CACHE"])
# Cache what takes a noticeable time to compile; tiny programs are cheaper to rebuild than to
# hash, write and read.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

if os.environ.get("LOSSLAB_TEST_XLA_DEFAULTS", "") in ("", "0"):
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} --xla_backend_optimization_level=0"
  if "xla_llvm_disable_expensive_passes" not in _flags:
    _flags = f"{_flags} --xla_llvm_disable_expensive_passes=true"
  os.environ["XLA_FLAGS"] = _flags.strip()


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWNER:
    shutil.rmtree(os.environ["LOSSLAB_TEST_JAX_CACHE"], ignore_errors=True)


# --------------------------------------------------------------------------- scheduling
# With ``-n 2`` the wall time is set by how evenly the two workers finish. The long end-to-end
# tests (child processes with 8 simulated devices, two-process runs, trainer runs) go first, so
# the many short unit tests fill in around them instead of one worker finishing a long test
# alone at the end.
_LONG_FIRST = ("tests/sharding/test_sharded_process.py", "tests/sharding/test_multihost.py",
               "tests/experiments/")
# Modules whose expensive module-scoped fixtures (a straight training run, a trained teacher)
# are shared by their tests: each runs whole on one worker, so the fixture is built once.
_ONE_WORKER_MODULES = ("tests/experiments/test_experiment_monitor.py",
                       "tests/experiments/test_experiment_precision.py",
                       "tests/experiments/test_experiment_distill.py",
                       "tests/distill/test_features.py")


def _module(nodeid: str) -> str:
  return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  def rank(item):
    path = _module(item.nodeid)
    return next((i for i, p in enumerate(_LONG_FIRST) if path.startswith(p)), len(_LONG_FIRST))
  items.sort(key=rank)  # stable: collection order within a rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Hand out one test at a time (one module for ``_ONE_WORKER_MODULES``), in the order above."""
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class _Scheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      module = _module(nodeid)
      return module if module in _ONE_WORKER_MODULES else nodeid

  return _Scheduling(config, log)


# --------------------------------------------------------------------------- crashes


class Interrupted(Exception):
  """Stands in for a crash of the training process (raised by ``interrupt_at_row``)."""


@pytest.fixture
def interrupt_at_row(monkeypatch):
  """``interrupt_at_row(run, row)`` calls ``run()`` with the metric writer raising
  :class:`Interrupted` as row ``row`` is about to be written, and expects it: what a process
  killed there leaves behind (its committed checkpoints, rows ``0 … row − 1``)."""
  from experiments import records  # pylint: disable=g-import-not-at-top

  def interrupt(run, row: int) -> None:
    original = records.MetricWriter.write

    def write(self, step, metrics):
      if step == row:
        raise Interrupted(step)
      original(self, step, metrics)

    with monkeypatch.context() as m:
      m.setattr(records.MetricWriter, "write", write)
      with pytest.raises(Interrupted):
        run()

  return interrupt
