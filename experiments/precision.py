"""Mixed precision: the compute dtype from the config, and loss scaling whose state is a pytree.

Training in bfloat16 keeps float32 *master* parameters (the optimizer updates them) and runs the
forward and backward passes in the compute dtype (``experiments.models``: the models cast
their float32 parameters at each matrix product and return float32 logits, so the loss is
reduced in float32). Loss scaling multiplies the loss by ``S`` before differentiation, so small
cotangents of the backward pass stay representable, and divides the gradients by ``S`` after:

    g = ∇(S·L) / S,        finite(g) ? update : skip the update

A *dynamic* scale (Micikevicius et al. 2018, "Mixed precision training", §3.2) starts high and
halves on every step whose gradients are not finite (that update is skipped); after
``growth_interval`` finite steps in a row it doubles. With powers of two (the defaults) scaling
and unscaling are exact in binary floating point, so in float32 the scaled gradients equal the
unscaled ones bit for bit (barring overflow). bfloat16 has float32's 8 exponent bits, so its
gradients underflow far less often than float16's; here the scale mostly guards against
overflow, and skipping non-finite updates is useful at any precision.

One class, :class:`LossScale`, covers the three modes of ``config.precision.loss_scale``
('none', a static number, 'dynamic'), so the training state and its checkpoint have the same
structure whatever the mode: two scalar leaves, the scale (float32) and the count of finite
steps since the last change (int32). ``growth_interval``, ``factor`` and ``min_scale`` are
static (part of the treedef, not of the checkpoint; they come from the config).

Why not ``jmp`` (google-deepmind/jmp, whose design this follows: ``scale``/``unscale``/
``adjust``, ``all_finite``, ``select_tree``): its last PyPI release, 0.0.4, dates from January
2023, and its ``DynamicLossScale.tree_unflatten`` drops ``min_loss_scale`` (it is not in
``tree_flatten``'s data or metadata, so every jit, scan or checkpoint restore resets it to 1.0;
the fix, pull request #44, was closed without being merged). Its three classes also have
different pytree structures (the no-op and static scales have no leaves), so a checkpoint would
change shape with the mode. The mechanism is a few dozen lines; owning them costs less than a
pin on an unmaintained package. jmp's ``select_tree`` (skip a non-finite update) is upstream
in optax as ``optax.tree.where``.

Example:

>>> ls = dynamic_loss_scale(initial_scale=2.0 ** 15, growth_interval=2000)
>>> loss_fn = lambda p, x: jnp.sum((p * x) ** 2)
>>> loss, grads, finite = scaled_value_and_grad(loss_fn, ls)(jnp.ones(3), jnp.arange(3.0))
>>> [float(g) for g in grads], bool(finite)
([0.0, 2.0, 8.0], True)
>>> int(ls.adjust(finite).good_steps), float(ls.adjust(jnp.bool_(False)).loss_scale)
(1, 16384.0)
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from flax import struct
import jax
import jax.numpy as jnp

T = TypeVar("T")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOSS_SCALE_MODES = ("none", "dynamic")  # or a positive number (a static scale), as a string


@struct.dataclass
class LossScale:
  """Loss-scale state: ``loss_scale`` (float32 scalar) and ``good_steps`` (int32 scalar).

  ``growth_interval = 0`` makes the scale static (``adjust`` returns it unchanged); otherwise
  :meth:`adjust` implements, with ``f = factor``,

      finite:      good_steps += 1; if good_steps == growth_interval:
                     good_steps = 0; loss_scale = f·loss_scale (kept if f·loss_scale is inf)
      not finite:  good_steps = 0;  loss_scale = max(min_scale, loss_scale / f)

  Build one with :func:`dynamic_loss_scale`, :func:`static_loss_scale`, :func:`no_loss_scale`
  or :func:`loss_scale_from_config`.
  """

  loss_scale: jax.Array
  good_steps: jax.Array
  growth_interval: int = struct.field(pytree_node=False, default=0)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_scale: float = struct.field(pytree_node=False, default=1.0)

  @property
  def dynamic(self) -> bool:
    return self.growth_interval > 0

  def scale(self, tree: T) -> T:
    """``S·x`` for every leaf (the loss before differentiation), in the leaf's dtype."""
    return jax.tree.map(lambda x: x * self.loss_scale.astype(x.dtype), tree)

  def unscale(self, tree: T) -> T:
    """``x / S`` for every leaf, computed in (at least) float32."""
    def one(x):
      x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      return x / self.loss_scale.astype(x.dtype)
    return jax.tree.map(one, tree)

  def adjust(self, grads_finite: jax.Array) -> LossScale:
    """The state for the next step, given whether this step's gradients were all finite."""
    if not self.dynamic:
      return self
    finite = jnp.asarray(grads_finite)
    if finite.shape != () or finite.dtype != jnp.bool_:
      raise ValueError(f"LossScale.adjust: grads_finite must be a boolean scalar, got "
                       f"{finite.dtype}{list(finite.shape)}.")
    grow = self.good_steps + 1 >= self.growth_interval
    grown = self.loss_scale * jnp.float32(self.factor)
    grown = jnp.where(jnp.isfinite(grown), grown, self.loss_scale)
    shrunk = jnp.maximum(jnp.float32(self.min_scale), self.loss_scale / jnp.float32(self.factor))
    loss_scale = jnp.where(finite, jnp.where(grow, grown, self.loss_scale), shrunk)
    good_steps = jnp.where(finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32)
    return self.replace(loss_scale=loss_scale, good_steps=good_steps)


def _state(value: float, **static) -> LossScale:
  return LossScale(jnp.asarray(value, jnp.float32), jnp.zeros((), jnp.int32), **static)


def dynamic_loss_scale(initial_scale: float = 2.0 ** 15, growth_interval: int = 2000, *,
                       factor: float = 2.0, min_scale: float = 1.0) -> LossScale:
  """A dynamic loss scale (defaults: ``2^15``, doubled after 2000 finite steps, ``≥ 1``)."""
  if not initial_scale > 0 or not min_scale > 0 or not factor > 1:
    raise ValueError(f"dynamic_loss_scale: needs initial_scale > 0, min_scale > 0 and "
                     f"factor > 1; got {initial_scale=}, {min_scale=}, {factor=}.")
  if int(growth_interval) != growth_interval or growth_interval < 1:
    raise ValueError(f"dynamic_loss_scale: growth_interval={growth_interval!r} must be an "
                     "integer >= 1.")
  return _state(initial_scale, growth_interval=int(growth_interval), factor=float(factor),
                min_scale=float(min_scale))


def static_loss_scale(value: float) -> LossScale:
  """A constant loss scale ``value`` (``adjust`` leaves it unchanged)."""
  if not value > 0:
    raise ValueError(f"static_loss_scale: value={value!r} must be > 0.")
  return _state(value)


def no_loss_scale() -> LossScale:
  """The scale 1 (exact: ``x·1`` and ``x/1`` change no bit), same structure as the others."""
  return _state(1.0)


def all_finite(tree) -> jax.Array:
  """A boolean scalar: whether every entry of every leaf of ``tree`` is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def scaled_value_and_grad(loss_fn: Callable[..., jax.Array], loss_scale: LossScale, *,
                          value_and_grad: Callable = jax.value_and_grad
                          ) -> Callable[..., tuple[jax.Array, Any, jax.Array]]:
  """``f(params, *args) -> (loss, grads, grads_finite)`` with the loss scaled by ``loss_scale``.

  Differentiates ``S·loss_fn`` with ``value_and_grad`` (default ``jax.value_and_grad``; pass
  e.g. ``lambda f: trainer.accumulate(f, n)[1]`` to accumulate over chunks), then returns the
  unscaled loss ``(S·L)/S``, the unscaled gradients ``∇(S·L)/S`` in (at least) float32 and
  whether all gradients are finite. Update the scale with ``loss_scale.adjust(grads_finite)``
  and skip a non-finite update with ``optax.tree.where``: ``params, opt_state =
  optax.tree.where(grads_finite, (new_params, new_opt_state), (params, opt_state))``.
  """
  def scaled_loss(params, *args, **kwargs):
    return loss_scale.scale(loss_fn(params, *args, **kwargs))

  vg = value_and_grad(scaled_loss)

  def fn(params, *args, **kwargs):
    loss, grads = loss_scale.unscale(vg(params, *args, **kwargs))
    return loss, grads, all_finite(grads)
  return fn


# --------------------------------------------------------------------------------------------
# From the config (``config.precision``, validated by experiments.config_lib)
# --------------------------------------------------------------------------------------------


def _dtype(name: str, key: str) -> jnp.dtype:
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.precision.{key}={name!r} is not one of {list(COMPUTE_DTYPES)}.")
  return jnp.dtype(COMPUTE_DTYPES[name])


def compute_dtype(config) -> jnp.dtype:
  """The models' compute dtype, ``config.precision.compute_dtype``."""
  return _dtype(config.precision.compute_dtype, "compute_dtype")


def probe_dtype(config) -> jnp.dtype:
  """The compute dtype of the probes' forward passes, ``config.precision.probe_dtype``."""
  return _dtype(config.precision.probe_dtype, "probe_dtype")


def loss_scale_from_config(config) -> LossScale:
  """The initial :class:`LossScale` of ``config.precision`` ('none', 'dynamic' or a number)."""
  p = config.precision
  mode = str(p.loss_scale).strip()
  if mode == "none":
    return no_loss_scale()
  if mode == "dynamic":
    return dynamic_loss_scale(float(p.initial_scale), int(p.growth_interval))
  # Anything else was checked by experiments.config_lib.validate_config: a positive number.
  return static_loss_scale(float(mode))
