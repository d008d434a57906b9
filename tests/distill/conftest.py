"""Fixtures shared by the distillation tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.models import GPT


def _random_gpt(depth, width, heads, seed, vocab=37, context=12):
  """An ``experiments.models.GPT`` with NumPy-random parameters.

  Shapes come from ``nnx.eval_shape``; the values are filled from NumPy, which skips the
  per-shape compilation of eager NNX initialisers (seconds each on a busy CPU)."""
  abstract = nnx.eval_shape(lambda: GPT(vocab, context, depth=depth, width=width,
                                        num_heads=heads, rngs=nnx.Rngs(params=0)))
  graph, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    v = rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(1 + 0.1 * v if "scale" in jax.tree_util.keystr(path) else 0.1 * v)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill,
                                                                  nnx.to_pure_dict(state)))
  return nnx.merge(graph, state)


@pytest.fixture(scope="session")
def random_gpt():
  """The factory ``random_gpt(depth, width, heads, seed, vocab=37, context=12)``."""
  return _random_gpt
