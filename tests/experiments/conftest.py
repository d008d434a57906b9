"""Fixtures shared by the experiment tests."""

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

_CACHE_OPTIONS = {"jax_compilation_cache_dir": None,
                  "jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": -1}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for one test module (restored afterwards).

  Modules that run the same small config many times opt in with
  ``pytestmark = pytest.mark.usefixtures("compile_cache")``; repeat runs reuse the first
  run's executables. Yields the cache directory (a subprocess can share it).
  """
  path = str(tmp_path_factory.mktemp("jax_cache"))
  saved = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
  compilation_cache.reset_cache()
  for k, v in {**_CACHE_OPTIONS, "jax_compilation_cache_dir": path}.items():
    jax.config.update(k, v)
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
