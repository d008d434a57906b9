"""Pytree helpers of the curvature probes that ``optax.tree`` does not have.

Elementwise arithmetic (``sub``, ``scale``, ``cast``, ``size``, ``where``, ...) comes from
``optax.tree``. What is here: inner products and norms accumulated in at least float32
whatever the leaf dtype (``optax.tree.vdot`` accumulates in the leaves' dtype, and a bf16 dot
product loses the digits the curvature estimates live on), random pytrees drawn one group of
same-shaped leaves at a time, and argument checks with messages that name the argument.
Everything works leaf by leaf, so the probes run unchanged on sharded parameters (no
``ravel_pytree``, which would concatenate and gather).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def accum_dtype(tree: PyTree) -> jnp.dtype:
  """The dtype reductions over ``tree`` are carried out in: float32 or wider."""
  leaves = jax.tree.leaves(tree)
  dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in leaves]) if leaves else jnp.float32
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Sum over leaves of ``<a_i, b_i>``, accumulated in float32 or wider."""
  dtype = accum_dtype(a)
  parts = jax.tree.leaves(
      jax.tree.map(lambda x, y: jnp.vdot(x.astype(dtype), y.astype(dtype),
                                         precision=jax.lax.Precision.HIGHEST).real, a, b))
  return sum(parts, jnp.zeros((), dtype))


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of a pytree viewed as one vector."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_random_like(key: jax.Array, like: PyTree, kind: str = "normal") -> PyTree:
  """A random pytree shaped like ``like``: ``'normal'`` or ``'rademacher'`` (±1) entries.

  Leaves of one shape and dtype are drawn together, one ``[n, *shape]`` draw per group: the
  random-bits kernel is compiled once per distinct shape instead of once per leaf (a model
  with hundreds of same-shaped layers would otherwise spend minutes compiling), while each
  leaf keeps its own array, so nothing is ravelled into one vector.
  """
  if kind not in ("normal", "rademacher"):
    raise ValueError(f"kind must be 'normal' or 'rademacher', got {kind!r}")
  leaves, treedef = jax.tree.flatten(like)
  groups: dict = {}
  for i, x in enumerate(leaves):
    groups.setdefault((jnp.shape(x), jnp.dtype(x.dtype)), []).append(i)
  keys = jax.random.split(key, max(len(groups), 1))
  out = [None] * len(leaves)
  for k, ((shape, dtype), idx) in zip(keys, groups.items()):
    if kind == "normal":
      draw = jax.random.normal(k, (len(idx),) + shape, jnp.promote_types(dtype, jnp.float32))
    else:
      draw = jax.random.rademacher(k, (len(idx),) + shape, jnp.int8)
    for j, i in enumerate(idx):
      out[i] = draw[j].astype(dtype)
  return jax.tree.unflatten(treedef, out)


def _short(text: str, limit: int = 300) -> str:
  return text if len(text) <= limit else text[:limit] + " ..."


def check_same_structure(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
  """Raise a ValueError naming both arguments when two pytrees do not line up."""
  pa = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
  pb = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(b)[0]]
  if jax.tree.structure(a) != jax.tree.structure(b):
    only_a = [p for p in pa if p not in set(pb)][:5]
    only_b = [p for p in pb if p not in set(pa)][:5]
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same pytree structure; {name_a} has "
        f"{len(pa)} leaves, {name_b} has {len(pb)}.\n"
        f"  only in {name_a}: {_short(str(only_a))}\n  only in {name_b}: {_short(str(only_b))}\n"
        f"  {name_b}: {_short(str(jax.tree.structure(b)))}")
  for path, x, y in zip(pa, jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.shape(x) != jnp.shape(y):
      raise ValueError(
          f"`{name_a}` and `{name_b}` differ in the shape of leaf {path}: "
          f"{jnp.shape(x)} vs {jnp.shape(y)}")


def check_scalar_loss(value, name: str = "loss_fn") -> None:
  """Raise a TypeError when a loss function did not return one real scalar."""
  shape = jnp.shape(value)
  if shape != ():
    raise TypeError(
        f"`{name}` must return a scalar loss, got an array of shape {shape}; "
        "reduce it (e.g. with .mean()) or wrap it so that it returns the scalar.")
  if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
    raise TypeError(f"`{name}` must return a floating-point scalar, got dtype "
                    f"{jnp.result_type(value)}.")
