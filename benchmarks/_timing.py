"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

import time

import jax
import numpy as np


def median_time(fn, *args, repeats: int, warmup: int = 1) -> float:
  """Median wall time of ``fn(*args)`` in seconds, after ``warmup`` untimed calls.

  Every call is synchronised with ``jax.block_until_ready``, so asynchronous dispatch does
  not hide device time.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
