"""Fixtures shared by the experiment tests."""

import os

import jax
import pytest

_CACHE_EVERYTHING = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                     "jax_persistent_cache_min_entry_size_bytes": -1}


@pytest.fixture(scope="module")
def compile_cache():
  """The suite's persistent compilation cache (``tests/conftest.py``), caching every program.

  Modules that run the same small config many times opt in with
  ``pytestmark = pytest.mark.usefixtures("compile_cache")``; repeat runs (and child processes,
  which inherit ``JAX_COMPILATION_CACHE_DIR``) reuse the first run's executables, even those
  that compile faster than the suite-wide threshold. Yields the cache directory.
  """
  saved = {k: getattr(jax.config, k) for k in _CACHE_EVERYTHING}
  for k, v in _CACHE_EVERYTHING.items():
    jax.config.update(k, v)
  yield os.environ["JAX_COMPILATION_CACHE_DIR"]
  for k, v in saved.items():
    jax.config.update(k, v)
