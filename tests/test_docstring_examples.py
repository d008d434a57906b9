"""The ``>>>`` examples in the docstrings run (issue 9 §4).

Every module of ``curvature``, ``distill`` and ``convergence`` is imported and run through
``doctest`` (one test per module, so a module without examples still has to import), plus
every module of ``experiments`` whose source holds an example. Modules are found on disk,
not from a list, so a new module or a new example is picked up. A failure shows doctest's
report. Examples print exact values only where they do not depend on the last float bit
(``round``, a tolerance, or ``...``); ``ELLIPSIS`` is on.
"""

import doctest
import importlib
import importlib.util
import io
import pathlib
import pkgutil

import pytest

ALL_MODULES = ("curvature", "distill", "convergence")
WITH_EXAMPLES = ("experiments",)
OPTIONFLAGS = doctest.ELLIPSIS


def _modules(package: str) -> list[tuple[str, pathlib.Path]]:
  # find_spec of a top-level package reads no module code: collection never imports them.
  spec = importlib.util.find_spec(package)
  out = [(package, pathlib.Path(spec.origin))]
  for info in pkgutil.iter_modules(spec.submodule_search_locations):
    if not info.ispkg:
      out.append((f"{package}.{info.name}",
                  pathlib.Path(info.module_finder.path) / f"{info.name}.py"))
  return out


def _module_names() -> list[str]:
  names = [n for p in ALL_MODULES for n, _ in _modules(p)]
  names += [n for p in WITH_EXAMPLES for n, path in _modules(p)
            if ">>>" in path.read_text(encoding="utf-8")]
  return names


MODULES = _module_names()


def _run_doctests(name: str) -> tuple[int, int, str]:
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(verbose=False, optionflags=OPTIONFLAGS)
  report = io.StringIO()
  for test in finder.find(module, name):
    runner.run(test, out=report.write)
  return runner.failures, runner.tries, report.getvalue()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  failed, attempted, report = _run_doctests(name)
  if failed:
    pytest.fail(f"{failed} of {attempted} docstring examples of {name} failed:\n{report}",
                pytrace=False)


def test_modules_and_examples_are_found():
  assert {"curvature._critical", "distill._divergences", "convergence._lag"} <= set(MODULES)
  # The examples of critical_sharpness, hessian_eigenvalues, the probe, hinton_loss, ...
  paths = dict(m for p in ALL_MODULES for m in _modules(p))
  for name in ("curvature._critical", "curvature._lanczos", "curvature._transforms",
               "curvature._preconditioned", "distill._divergences"):
    assert ">>>" in paths[name].read_text(encoding="utf-8"), name
