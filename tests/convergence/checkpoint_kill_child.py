"""Child process for test_checkpoint_tiers.py: saves asynchronously and waits to be killed.

Usage: python checkpoint_kill_child.py DIRECTORY MEGABYTES

Saves a small state at step 1 and waits for its commit, then starts an asynchronous save of
a large state at step 2 and prints "SAVING 2" while the write is in flight; the parent
sends SIGKILL at that point. "DONE 2" is printed only if the save committed first.
"""

import sys
import time

import jax.numpy as jnp
import numpy as np

from convergence._checkpoint import TieredCheckpointManager


def states(megabytes: int):
  """The two states, reproducible by the parent."""
  small = {'w': jnp.arange(16, dtype=jnp.float32), 'step': 1}
  n = megabytes * (1 << 20) // 4
  big = {'w': jnp.asarray(np.random.default_rng(2).random(n, dtype=np.float32)), 'step': 2}
  return small, big


def main():
  directory, megabytes = sys.argv[1], int(sys.argv[2])
  small, big = states(megabytes)
  mgr = TieredCheckpointManager(directory, async_save=True)
  mgr.save(1, small, metadata={'which': 'small'})
  mgr.wait_until_finished()
  print('COMMITTED 1', flush=True)
  t = time.perf_counter()
  mgr.save(2, big, metadata={'which': 'big'})
  print('SAVING 2', flush=True)
  mgr.wait_until_finished()
  print(f'DONE 2 {time.perf_counter() - t:.3f}', flush=True)


if __name__ == '__main__':
  main()
