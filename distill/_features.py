"""Feature distillation: per-sublayer intermediates and the losses that match them.

Seed 001's cross-layer feature objective. From every transformer block four slices are read —
the attention branch before its residual add, the LayerNorm output that feeds the FFN, the FFN
pre-activation and the block output — without touching the model code (``nnx.capture`` with
``method_outputs``, see :func:`collect_intermediates`). Each slice has its own measure:

* direction (attention output, normalised input): cosine distance plus an angular penalty,
  :func:`cosine_angular_loss`;
* distribution (FFN pre-activation): MMD with a mixture-of-Gaussians kernel whose bandwidths
  follow the median heuristic of each batch, :func:`mmd` / :class:`MMDKernel` (learned
  bandwidths are an option, to be trained by ascent);
* function (block output): L1 reconstruction of the teacher's feature through a small learned
  head, :func:`reconstruction_l1` / :class:`ReconstructionHead`.

Student layers are paired with teacher layers by :func:`layer_map` (uniform, last, custom),
widths are bridged by learned linear maps, and layers are weighted by
:func:`geometric_layer_weights`. :class:`FeatureDistiller` puts these together.

All losses compute in float32, or in the input's dtype when it is wider.

References: Romero et al. 2015 (FitNets, hint layers with a learned regressor); Sun et al.
2019 (Patient KD, layer mappings "skip" and "last"); Jiao et al. 2020 (TinyBERT, uniform
mapping g(m) = m·L_t/L_s); Gretton et al. 2012 (MMD, JMLR 13); Li et al. 2017 (MMD-GAN, learned
kernels); Huang & Wang 2017 (distillation by neuron-selectivity MMD).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST

SLICES = ("attn_out", "norm_out", "pre_act", "block_out")
"""The four slices of seed 001, in the order the data flows through a block."""

GPT_SLICE_PATHS: dict[str, tuple[str, ...]] = {
    # attention branch output, before ``x + attn(ln1(x))``
    "attn_out": ("attn",),
    # LayerNorm after the attention residual, the FFN's input (``ln2``)
    "norm_out": ("ln2",),
    # FFN pre-activation, ``fc(ln2(x))`` before GELU
    "pre_act": ("fc",),
    # block output (the residual stream after the block)
    "block_out": (),
    # extras, not in ``SLICES``: the LayerNorm in front of attention and the fused QKV
    # projection (for relation distillation and attention maps)
    "attn_norm": ("ln1",),
    "qkv": ("attn", "qkv"),
}
"""Where each slice lives inside a block of ``experiments.models.GPT``: the attribute path of
the submodule whose ``__call__`` output is the slice (``()`` is the block itself)."""

LOSS_KINDS = ("cosine", "mmd", "l1")
MMD_BANDWIDTHS = ("median", "learned")
DEFAULT_SLICE_LOSSES = {"attn_out": "cosine", "norm_out": "cosine", "pre_act": "mmd",
                        "block_out": "l1"}
"""Seed 001's measure for each slice."""

LAYER_MAPS = ("uniform", "last", "custom")


# ----------------------------------------------------------------------------- helpers


def compute_dtype(*arrays) -> jnp.dtype:
  """float32, or the inputs' dtype when it is a wider float (float64 under ``enable_x64``)."""
  dtype = jnp.result_type(*[jnp.asarray(a).dtype for a in arrays])
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def _check_same_shape(a, b, name_a: str, name_b: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"`{name_a}` and `{name_b}` must have the same shape, got {a.shape} and "
                     f"{b.shape}; project the student's width first (see FeatureDistiller).")


def _position_weights(mask, lead_shape, dtype, name: str = "mask") -> jax.Array:
  """A mask/weights array broadcast to ``lead_shape`` (the shape without the feature axis)."""
  if mask is None:
    return jnp.ones(lead_shape, dtype)
  mask = jnp.asarray(mask)
  try:
    return jnp.broadcast_to(mask.astype(dtype), lead_shape)
  except ValueError:
    raise ValueError(f"`{name}` of shape {mask.shape} does not broadcast to the positions "
                     f"{lead_shape} (the features' shape without the last axis).") from None


def _weighted_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), jnp.finfo(values.dtype).tiny)


def _apply_mask(mask, weights, dtype, *features):
  """Per-position weights :math:`w_i m_i` and the ``[..., D]`` features with masked positions
  zeroed, so that those add nothing to the value or to any gradient, NaN included (the
  convention of the token losses: ``mask`` drops a position, ``weights`` weigh the others)."""
  lead = features[0].shape[:-1]
  w = _position_weights(weights, lead, dtype, "weights")
  if mask is None:
    return w, features
  keep = _position_weights(mask, lead, dtype) > 0
  return (jnp.where(keep, w, 0.0),
          tuple(jnp.where(keep[..., None], f, jnp.zeros((), f.dtype)) for f in features))


def _safe_norm(x, axis=-1):
  """‖x‖ with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(x * x, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------- collection


def collect_intermediates(model: nnx.Module, *args, slices: Sequence[str] = SLICES,
                          blocks: str = "blocks",
                          slice_paths: Mapping[str, tuple[str, ...]] = GPT_SLICE_PATHS,
                          **kwargs) -> tuple[Any, dict[str, jax.Array]]:
  """Run ``model(*args, **kwargs)`` and return its output and per-block intermediates.

  Uses ``nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)`` (Flax 0.12):
  for the duration of the call every module's ``__call__`` output is sown, so no ``sow`` line
  is needed in the model. Slice ``name`` of block ``i`` is the ``__call__`` output of
  ``getattr(model, blocks)[i]`` followed by the attribute path ``slice_paths[name]``; with the
  defaults this reads ``experiments.models.GPT`` (see :data:`GPT_SLICE_PATHS`). Works inside
  ``jax.jit`` on a module rebuilt with ``nnx.merge``, and gradients flow through the slices.

  Caveats: ``nnx.capture`` instruments the module *classes* while the call runs, so do not run
  two collections concurrently from Python threads; a submodule called more than once per
  forward pass (weight sharing) is rejected, since its slice would be ambiguous.

  Args:
    model: an NNX module with a sequence of blocks at attribute ``blocks``.
    *args, **kwargs: the model's inputs (for GPT: tokens ``[B, T]``).
    slices: names of the slices to return (keys of ``slice_paths``).
    blocks: attribute holding the blocks (an ``nnx.List`` or list of modules).
    slice_paths: slice name → attribute path inside a block.

  Returns:
    ``(output, feats)`` with ``feats[name]`` of shape ``[L, *batch, features]`` (blocks stacked
    on the first axis), in the model's dtype.
  """
  if not isinstance(slices, (tuple, list)) or not slices:
    raise ValueError(f"`slices` must be a non-empty sequence of names, got {slices!r}")
  unknown = [s for s in slices if s not in slice_paths]
  if unknown:
    raise ValueError(f"`slices` has unknown names {unknown}; known: {sorted(slice_paths)}")
  block_list = getattr(model, blocks, None)
  if block_list is None:
    raise ValueError(f"`blocks`={blocks!r} is not an attribute of {type(model).__name__}")
  num_blocks = len(block_list)
  output, state = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
      *args, **kwargs)
  tree = nnx.to_pure_dict(state)
  feats = {}
  for name in slices:
    per_layer = []
    for i in range(num_blocks):
      node = tree.get(blocks, {}).get(i, {})
      for key in slice_paths[name]:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
      sown = node.get("__call__") if isinstance(node, Mapping) else None
      if sown is None:
        raise ValueError(f"slice {name!r}: block {i} has no submodule at "
                         f"`slice_paths[{name!r}]`={slice_paths[name]!r} that was called")
      if len(sown) != 1:
        raise ValueError(f"slice {name!r}: the submodule at {slice_paths[name]!r} of block {i} "
                         f"was called {len(sown)} times in one forward pass; expected once")
      per_layer.append(sown[0])
    feats[name] = jnp.stack(per_layer)
  return output, feats


def attention_from_qkv(qkv: jax.Array, num_heads: int, *, causal: bool = True) -> jax.Array:
  r"""Attention weights of one layer from its fused QKV projection output.

  .. math:: A_h = \operatorname{softmax}\big(Q_h K_h^\top/\sqrt{d_h} + M\big),\qquad
     [Q, K, V] = \text{qkv},\ d_h = D/H,

  with :math:`M` the causal mask (0 on and below the diagonal, −∞ above): the computation of
  ``experiments.models.CausalSelfAttention``, so ``qkv`` collected with
  ``slices=("qkv",)`` gives the model's own attention maps without a model change. float32.

  Args:
    qkv: ``[..., T, 3·D]``, the output of the fused projection (Q, K, V concatenated).
    num_heads: H, which must divide D.
    causal: apply the causal mask.

  Returns:
    ``[..., H, T, T]`` row-stochastic attention weights (queries on axis −2). NaN in ``qkv``
    gives NaN rows.
  """
  qkv = jnp.asarray(qkv)
  if qkv.ndim < 2 or qkv.shape[-1] % 3:
    raise ValueError(f"`qkv` must be [..., T, 3*D], got shape {qkv.shape}")
  d = qkv.shape[-1] // 3
  if not isinstance(num_heads, int) or num_heads < 1 or d % num_heads:
    raise ValueError(f"`num_heads` must be a positive int dividing D={d}, got {num_heads!r}")
  x = qkv.astype(compute_dtype(qkv))
  q, k, _ = jnp.split(x, 3, axis=-1)
  t = x.shape[-2]
  q = q.reshape(*q.shape[:-1], num_heads, d // num_heads)
  k = k.reshape(*k.shape[:-1], num_heads, d // num_heads)
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=_HIGHEST) / math.sqrt(d // num_heads)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits, axis=-1)


# ----------------------------------------------------------------------------- losses


def cosine_angular_loss(student: jax.Array, teacher: jax.Array, *, angular_weight: float = 1.0,
                        margin: float = 0.0, mask: jax.Array | None = None,
                        weights: jax.Array | None = None) -> jax.Array:
  r"""Cosine distance plus an angular penalty, averaged over positions.

  .. math::
     \ell = \frac{\sum_i w_i\big[(1-\cos\theta_i) + \lambda\,\max(0,\theta_i-\theta_0)^2\big]}
                 {\sum_i w_i},\quad
     \cos\theta_i = \hat s_i\cdot\hat t_i,\quad
     \theta_i = 2\,\operatorname{atan2}(\lVert\hat s_i-\hat t_i\rVert,\lVert\hat s_i+\hat t_i\rVert)

  with :math:`\hat x = x/\lVert x\rVert` over the last axis. The angle uses Kahan's atan2 form,
  accurate near 0 and π, and its gradient stays finite when student and teacher are parallel
  (``arccos`` has an infinite derivative at cos θ = 1). The cosine term keeps a gradient at all
  angles; the squared hinge penalises large deflections more (seed 001: "angular deviation
  penalty to suppress large-angle deflection"). Scale-invariant in both arguments.

  Reference: cosine hint losses, e.g. DistilBERT (Sanh et al. 2019) cosine embedding loss.

  NaN behaviour: NaN in an input at an unmasked position gives a NaN loss; at a masked
  position, nothing. A zero vector has no direction: its :math:`\hat x` is 0, so cos θ = 0 and
  θ = π/2 for that position (finite loss and gradient).

  Args:
    student, teacher: ``[..., D]`` features of the same shape (project widths first).
    angular_weight: λ ≥ 0.
    margin: θ₀ in radians, 0 ≤ θ₀ < π; angles below it are not penalised.
    mask: optional padding mask over positions (True / 1 = counts), broadcastable to
      ``student.shape[:-1]``; masked positions contribute nothing, even when NaN.
    weights: optional float per-position weights :math:`w_i` (default 1), broadcastable the
      same way.

  Returns:
    Scalar loss in [0, 2 + λπ²], float32 (or wider).
  """
  student, teacher = jnp.asarray(student), jnp.asarray(teacher)
  _check_same_shape(student, teacher, "student", "teacher")
  if student.ndim < 1:
    raise ValueError("`student` must have a feature axis, got a scalar")
  if isinstance(angular_weight, (int, float)) and angular_weight < 0:
    raise ValueError(f"`angular_weight` must be >= 0, got {angular_weight!r}")
  if isinstance(margin, (int, float)) and not 0 <= margin < math.pi:
    raise ValueError(f"`margin` must be in [0, pi), got {margin!r}")
  dtype = compute_dtype(student, teacher)
  w, (s, t) = _apply_mask(mask, weights, dtype, student.astype(dtype), teacher.astype(dtype))
  s_hat = s / jnp.maximum(_safe_norm(s), jnp.finfo(dtype).tiny)[..., None]
  t_hat = t / jnp.maximum(_safe_norm(t), jnp.finfo(dtype).tiny)[..., None]
  cos = jnp.sum(s_hat * t_hat, axis=-1)
  theta = 2.0 * jnp.arctan2(_safe_norm(s_hat - t_hat), _safe_norm(s_hat + t_hat))
  per_pos = (1.0 - cos) + angular_weight * jnp.square(jnp.maximum(theta - margin, 0.0))
  return _weighted_mean(per_pos, w)


def _sq_dists(a, b):
  d = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
       - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST))
  return jnp.maximum(d, 0.0)


def mmd(x: jax.Array, y: jax.Array, log_bandwidths: jax.Array, *,
        kernel_weights: jax.Array | None = None, x_mask: jax.Array | None = None,
        y_mask: jax.Array | None = None, unbiased: bool = False) -> jax.Array:
  r"""Squared maximum mean discrepancy with a mixture-of-Gaussians kernel.

  .. math::
     k(a,b) = \sum_{j=1}^{J}\pi_j \exp\!\Big(-\frac{\lVert a-b\rVert^2}{2\sigma_j^2}\Big),
     \quad \sigma_j = e^{\beta_j},\\
     \mathrm{MMD}^2 = \sum_{i,i'}\alpha_i\alpha_{i'}k(x_i,x_{i'})
       + \sum_{l,l'}\gamma_l\gamma_{l'}k(y_l,y_{l'}) - 2\sum_{i,l}\alpha_i\gamma_l k(x_i,y_l)

  with sample weights α = x_mask/Σx_mask, γ = y_mask/Σy_mask (uniform by default): the biased
  V-statistic of Gretton et al. (2012, JMLR 13, eq. 5), ≥ 0 and exactly 0 for identical
  samples. ``unbiased=True`` drops the diagonal terms of the two within-sample sums
  (normalising by Σ_{i≠i'} α_iα_{i'}), the U-statistic, which is unbiased but can be negative.

  The bandwidths enter as log-bandwidths β. Note the direction: MMD → 0 as every σ → 0 or ∞,
  so *minimising* it over β collapses the kernel instead of matching the distributions. Either
  take β from the data, :func:`median_log_bandwidths` (Gretton et al. 2012; what
  :class:`MMDKernel` does by default), or train β by ascent (negate their gradient, e.g.
  ``optax.scale(-1)`` on the kernel's parameters in an ``optax.multi_transform``), as
  learned-kernel MMD does (Li et al. 2017, MMD-GAN, arXiv:1705.08584).

  Memory is O(N·M) for the kernel matrices (N, M samples).

  NaN behaviour: NaN in a sample or a bandwidth gives a NaN result; a zero total weight
  gives NaN (there is no distribution to compare).

  Args:
    x: ``[..., D]`` samples from the student; every axis but the last is flattened.
    y: ``[..., D]`` samples from the teacher, same D.
    log_bandwidths: ``[J]`` log σ_j.
    kernel_weights: ``[J]`` mixture weights π_j ≥ 0 (default uniform 1/J).
    x_mask, y_mask: optional weights of shape ``x.shape[:-1]`` / ``y.shape[:-1]``.
    unbiased: use the U-statistic.

  Returns:
    Scalar MMD², float32 (or wider).
  """
  x, y, log_bw = jnp.asarray(x), jnp.asarray(y), jnp.asarray(log_bandwidths)
  if x.ndim < 2 or y.ndim < 2:
    raise ValueError(f"`x` and `y` must be [..., N, D] sample arrays, got shapes {x.shape} "
                     f"and {y.shape}")
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"`x` and `y` must have the same feature size, got {x.shape[-1]} and "
                     f"{y.shape[-1]}; project the student's width first")
  if log_bw.ndim != 1 or log_bw.shape[0] < 1:
    raise ValueError(f"`log_bandwidths` must be a non-empty vector [J], got shape {log_bw.shape}")
  dtype = compute_dtype(x, y, log_bw)
  xs = x.reshape(-1, x.shape[-1]).astype(dtype)
  ys = y.reshape(-1, y.shape[-1]).astype(dtype)
  a = _position_weights(x_mask, x.shape[:-1], dtype, "x_mask").reshape(-1)
  g = _position_weights(y_mask, y.shape[:-1], dtype, "y_mask").reshape(-1)
  if kernel_weights is None:
    pi = jnp.full(log_bw.shape, 1.0 / log_bw.shape[0], dtype)
  else:
    pi = jnp.asarray(kernel_weights, dtype)
    if pi.shape != log_bw.shape:
      raise ValueError(f"`kernel_weights` must have the shape of `log_bandwidths` "
                       f"{log_bw.shape}, got {pi.shape}")
  inv_two_var = 0.5 * jnp.exp(-2.0 * log_bw.astype(dtype))

  def kernel(p, q):
    # Σ_j π_j exp(−d·c_j) as J separate [N, M] terms: the same sum as an einsum over a
    # [J, N, M] stack, whose gradient XLA's CPU backend ran ~280× slower (14.1 s vs 0.05 s
    # for one 2,048 × 2,048 kernel matrix, J = 3).
    d = _sq_dists(p, q)
    return sum(pi[j] * jnp.exp(-d * inv_two_var[j]) for j in range(pi.shape[0]))

  def within(p, w):
    k = kernel(p, p)
    total = w @ k @ w
    norm = jnp.sum(w) ** 2
    if unbiased:
      total = total - jnp.sum(w * w * jnp.diagonal(k))
      norm = norm - jnp.sum(w * w)
    return total / norm

  cross = (a @ kernel(xs, ys) @ g) / (jnp.sum(a) * jnp.sum(g))
  return within(xs, a) + within(ys, g) - 2.0 * cross


def median_log_bandwidths(x: jax.Array, y: jax.Array,
                          scales: Sequence[float] = (0.5, 1.0, 2.0), *,
                          x_mask: jax.Array | None = None, y_mask: jax.Array | None = None,
                          max_samples: int | None = None) -> jax.Array:
  r"""Log-bandwidths ``log(s · σ_med)`` from the median heuristic.

  :math:`\sigma_{med}^2 = \tfrac12\operatorname{median}_{i\ne j}\lVert z_i - z_j\rVert^2` over
  the pooled samples z = x ∪ y (Gretton et al. 2012, JMLR 13, §8), so that the middle kernel
  has :math:`\exp(-d^2/2\sigma^2) = e^{-1}` at the median distance. Samples with zero weight in
  ``x_mask`` / ``y_mask`` take no part. ``max_samples`` caps the cost, O(n²) for n pooled
  samples: every ⌈n / max_samples⌉-th pooled sample is used (a deterministic subsample).
  σ_med is floored at tiny^(1/4) of the dtype (identical samples); non-finite samples give
  non-finite bandwidths.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"`x` and `y` must have the same feature size, got {x.shape[-1]} and "
                     f"{y.shape[-1]}")
  if max_samples is not None and not (isinstance(max_samples, int) and max_samples >= 2):
    raise ValueError(f"`max_samples` must be an int >= 2 or None, got {max_samples!r}")
  dtype = compute_dtype(x, y)
  z = jnp.concatenate([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])]).astype(dtype)
  w = jnp.concatenate([_position_weights(x_mask, x.shape[:-1], dtype, "x_mask").reshape(-1),
                       _position_weights(y_mask, y.shape[:-1], dtype, "y_mask").reshape(-1)])
  if max_samples is not None and z.shape[0] > max_samples:
    stride = -(-z.shape[0] // max_samples)
    z, w = z[::stride], w[::stride]
  d = _sq_dists(z, z)
  pair = (w[:, None] > 0) & (w[None, :] > 0) & ~jnp.eye(z.shape[0], dtype=bool)
  sigma = jnp.sqrt(0.5 * jnp.nanmedian(jnp.where(pair, d, jnp.nan)))
  # Floor: identical samples (σ_med = 0) give bandwidths whose 1/(2σ²) stays finite, so MMD²
  # is 0 rather than 0·∞ = NaN. NaN in the samples still gives NaN (nanmedian would skip it).
  sigma = jnp.maximum(sigma, jnp.finfo(dtype).tiny ** 0.25)
  sigma = jnp.where(jnp.all(jnp.isfinite(z)), sigma, jnp.nan)
  return jnp.log(jnp.asarray(scales, dtype) * sigma)


def reconstruction_l1(reconstruction: jax.Array, target: jax.Array, *,
                      mask: jax.Array | None = None,
                      weights: jax.Array | None = None) -> jax.Array:
  r"""Mean absolute error between a reconstruction and the teacher's feature.

  .. math:: \ell = \frac{\sum_i w_i \frac1D\sum_d |r_{id} - t_{id}|}{\sum_i w_i}

  with :math:`w_i` = ``weights`` (default 1) times the padding ``mask`` (True / 1 = counts),
  both over ``shape[:-1]``, as in :func:`cosine_angular_loss`. Use with
  :class:`ReconstructionHead`: ``r = head(student_feature)``. NaN in an input at an unmasked
  position gives NaN; at a masked position, nothing. Arguments ``[..., D]`` of one shape.
  """
  reconstruction, target = jnp.asarray(reconstruction), jnp.asarray(target)
  _check_same_shape(reconstruction, target, "reconstruction", "target")
  dtype = compute_dtype(reconstruction, target)
  w, (r, t) = _apply_mask(mask, weights, dtype, reconstruction.astype(dtype),
                          target.astype(dtype))
  per_pos = jnp.mean(jnp.abs(r - t), axis=-1)
  return _weighted_mean(per_pos, w)


# ----------------------------------------------------------------------------- layers


def layer_map(num_student_layers: int, num_teacher_layers: int, strategy: str = "uniform",
              custom: Sequence[int] | None = None) -> tuple[int, ...]:
  r"""Teacher layer (0-based) paired with each student layer.

  * ``"uniform"``: :math:`g(i) = \lceil (i+1)\,L_t/L_s\rceil - 1`, the TinyBERT map
    g(m) = m·L_t/L_s (1-based) rounded up; e.g. L_s = 3, L_t = 12 → (3, 7, 11); L_s = 4,
    L_t = 6 → (1, 2, 4, 5); works when L_s > L_t too (teacher layers repeat).
  * ``"last"``: the top L_s teacher layers, :math:`g(i) = L_t - L_s + i` (PKD-Last);
    needs L_s ≤ L_t.
  * ``"custom"``: ``custom`` itself, one teacher index per student layer.

  The last student layer always meets the last teacher layer under "uniform" and "last".
  """
  for name, value in (("num_student_layers", num_student_layers),
                      ("num_teacher_layers", num_teacher_layers)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}")
  ls, lt = num_student_layers, num_teacher_layers
  if strategy == "uniform":
    return tuple(-(-((i + 1) * lt) // ls) - 1 for i in range(ls))
  if strategy == "last":
    if ls > lt:
      raise ValueError(f"`strategy`='last' needs num_student_layers <= num_teacher_layers, got "
                       f"{ls} > {lt}")
    return tuple(lt - ls + i for i in range(ls))
  if strategy == "custom":
    if custom is None or len(custom) != ls:
      raise ValueError(f"`custom` must list one teacher layer per student layer ({ls}), got "
                       f"{custom!r}")
    if any(not isinstance(c, int) or not 0 <= c < lt for c in custom):
      raise ValueError(f"`custom` entries must be ints in [0, {lt}), got {tuple(custom)!r}")
    return tuple(custom)
  raise ValueError(f"`strategy` must be one of {LAYER_MAPS}, got {strategy!r}")


def geometric_layer_weights(num_layers: int, ratio: float = 0.7) -> jax.Array:
  r"""Depth-decaying layer weights :math:`w_l = r^l / \sum_{m<L} r^m`, l = 0 the shallowest.

  They sum to 1 and :math:`w_{l+1}/w_l = r`: with r < 1 shallow layers weigh most (seed 001:
  learn lexical and syntactic structure first); r = 1 is uniform. float32.
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"`num_layers` must be a positive int, got {num_layers!r}")
  if not (isinstance(ratio, (int, float)) and ratio > 0 and math.isfinite(ratio)):
    raise ValueError(f"`ratio` must be a finite number > 0, got {ratio!r}")
  w = jnp.asarray([float(ratio) ** l for l in range(num_layers)], jnp.float32)
  return w / jnp.sum(w)


# ----------------------------------------------------------------------------- modules


class MMDKernel(nnx.Module):
  r"""Mixture-of-Gaussians MMD² (:func:`mmd`) with data-driven or learned bandwidths.

  ``kernel(x, y, x_mask=None, y_mask=None)`` is :func:`mmd` with J bandwidths
  :math:`\sigma_j`:

  * ``bandwidth="median"`` (default): :math:`\sigma_j = s_j\,\sigma_{med}` with the median
    heuristic of the call's pooled samples (:func:`median_log_bandwidths`, computed under
    ``stop_gradient`` on at most ``max_median_samples`` samples) and
    :math:`s = \mathrm{geomspace}(0.5, 2, J)`. The module holds no parameter, so it can sit
    inside a model whose every ``nnx.Param`` is trained by descent.
  * ``bandwidth="learned"``: ``log_bandwidths`` is an ``nnx.Param`` ``[J]``. MMD² falls to 0
    as every σ → 0 or ∞, so these must be trained by gradient *ascent* (the MMD-GAN min-max,
    Li et al. 2017), never in the same descent step as the student.

  Args:
    num_kernels: J.
    bandwidth: ``"median"`` or ``"learned"``.
    init_log_bandwidths: learned: ``[J]`` initial log σ (default log of geomspace(0.5, 2, J)·√D
      when ``features`` is given, else of geomspace(0.5, 2, J)).
    features: learned: D, to scale the default bandwidths (‖a − b‖² grows with D).
    unbiased: use the U-statistic.
    max_median_samples: median: the cap on pooled samples in the median (its cost is
      quadratic in them).
  """

  def __init__(self, num_kernels: int = 3, *, bandwidth: str = "median",
               init_log_bandwidths=None, features: int | None = None, unbiased: bool = False,
               max_median_samples: int = 1024):
    if not isinstance(num_kernels, int) or num_kernels < 1:
      raise ValueError(f"`num_kernels` must be a positive int, got {num_kernels!r}")
    if bandwidth not in MMD_BANDWIDTHS:
      raise ValueError(f"`bandwidth` must be one of {MMD_BANDWIDTHS}, got {bandwidth!r}")
    self.bandwidth = bandwidth
    self.unbiased = unbiased
    self.max_median_samples = max_median_samples
    # geomspace(0.5, 2, J): the middle kernel at σ_med for odd J
    self.scales = tuple(0.5 * 4.0 ** (j / (num_kernels - 1)) if num_kernels > 1 else 0.5
                        for j in range(num_kernels))
    if bandwidth == "median":
      if init_log_bandwidths is not None:
        raise ValueError("`init_log_bandwidths` is for bandwidth='learned'; 'median' takes "
                         "the bandwidths from the data")
      return
    if init_log_bandwidths is None:
      scale = math.sqrt(features) if features else 1.0
      init = jnp.log(jnp.geomspace(0.5, 2.0, num_kernels) * scale).astype(jnp.float32)
    else:
      init = jnp.asarray(init_log_bandwidths, jnp.float32)
      if init.shape != (num_kernels,):
        raise ValueError(f"`init_log_bandwidths` must have shape ({num_kernels},), got "
                         f"{init.shape}")
    self.log_bandwidths = nnx.Param(init)

  def __call__(self, x, y, *, x_mask=None, y_mask=None):
    if self.bandwidth == "learned":
      log_bw = self.log_bandwidths[...]
    else:
      log_bw = jax.lax.stop_gradient(median_log_bandwidths(
          x, y, self.scales, x_mask=x_mask, y_mask=y_mask,
          max_samples=self.max_median_samples))
    return mmd(x, y, log_bw, x_mask=x_mask, y_mask=y_mask, unbiased=self.unbiased)


class ReconstructionHead(nnx.Module):
  """A small learned projection head ``nnx.Linear(student_width, teacher_width)``.

  Seed 001's "task-aware reconstruction": the student's block output is mapped back into the
  teacher's feature space and must match the teacher's feature there in L1. We read "the
  teacher's actual input feature at that position" as the teacher block's output, which is
  exactly the input its next block consumes (the residual stream), so the student learns a
  representation that the teacher's later layers could use. Float32 in and out.
  """

  def __init__(self, student_width: int, teacher_width: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(student_width, teacher_width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return self.linear(x.astype(compute_dtype(x)))


class FeatureDistiller(nnx.Module):
  r"""Seed 001's layered feature loss with learned width projections.

  .. math::
     \mathcal L = \sum_{s\in\text{slices}}\sum_{i<L_s} w_i\,
       \ell_s\big(P_{s,i}(h^S_{s,i}),\ h^T_{s,g(i)}\big)

  with :math:`g` = :func:`layer_map`, :math:`w` = :func:`geometric_layer_weights`, and per
  slice the measure :math:`\ell_s` of ``slice_losses``: ``"cosine"``
  (:func:`cosine_angular_loss`), ``"mmd"`` (:func:`mmd` with one :class:`MMDKernel` per slice,
  median-heuristic bandwidths of each layer pair; positions are the samples) or ``"l1"``
  (:func:`reconstruction_l1`).
  :math:`P_{s,i}` is a bias-free ``nnx.Linear`` from the student's to the teacher's width for
  "cosine" and "mmd" (the identity, with no parameters, when the widths agree and
  ``always_project`` is False), and a :class:`ReconstructionHead` for "l1".

  Args:
    student_dims, teacher_dims: slice name → feature size (e.g. ``{"pre_act": 4 * width}``).
    num_student_layers, num_teacher_layers: block counts.
    mapping: ``"uniform"``, ``"last"`` or ``"custom"`` (with ``custom_map``).
    ratio: the geometric ratio of the layer weights.
    slice_losses: slice name → one of ``LOSS_KINDS``; defaults to seed 001's choice.
    angular_weight, margin: of the cosine loss.
    num_kernels: Gaussians per MMD kernel.
    always_project: give "cosine"/"mmd" slices a learned projection even at equal widths.
    rngs: ``nnx.Rngs`` for the projections.

  Call: ``distiller(student_feats, teacher_feats, mask=None, weights=None) -> (loss,
  per_layer)`` with the feature dicts of :func:`collect_intermediates` (``[L, B, T, D]`` per
  slice), the padding ``mask`` and float per-position ``weights`` ``[B, T]`` (as in the token
  losses) and ``per_layer[slice]`` the unweighted ``[L_s]`` losses. NaN in a feature makes
  the loss NaN.
  """

  def __init__(self, student_dims: Mapping[str, int], teacher_dims: Mapping[str, int], *,
               num_student_layers: int, num_teacher_layers: int, mapping: str = "uniform",
               custom_map: Sequence[int] | None = None, ratio: float = 0.7,
               slice_losses: Mapping[str, str] | None = None, angular_weight: float = 1.0,
               margin: float = 0.0, num_kernels: int = 3, always_project: bool = False,
               rngs: nnx.Rngs):
    slice_losses = dict(DEFAULT_SLICE_LOSSES if slice_losses is None else slice_losses)
    if not slice_losses:
      raise ValueError("`slice_losses` must name at least one slice")
    for name, kind in slice_losses.items():
      if kind not in LOSS_KINDS:
        raise ValueError(f"`slice_losses[{name!r}]` must be one of {LOSS_KINDS}, got {kind!r}")
      for arg, dims in (("student_dims", student_dims), ("teacher_dims", teacher_dims)):
        if name not in dims:
          raise ValueError(f"`{arg}` has no width for slice {name!r}")
    self.layer_map = layer_map(num_student_layers, num_teacher_layers, mapping, custom_map)
    self.layer_weights = nnx.Variable(geometric_layer_weights(num_student_layers, ratio))
    self.slice_losses = slice_losses
    self.angular_weight, self.margin = angular_weight, margin
    projections, kernels = {}, {}
    for name, kind in slice_losses.items():
      ds, dt = int(student_dims[name]), int(teacher_dims[name])
      if kind == "l1":
        projections[name] = nnx.List([ReconstructionHead(ds, dt, rngs=rngs)
                                      for _ in range(num_student_layers)])
      elif ds != dt or always_project:
        projections[name] = nnx.List([nnx.Linear(ds, dt, use_bias=False, rngs=rngs)
                                      for _ in range(num_student_layers)])
      if kind == "mmd":
        kernels[name] = MMDKernel(num_kernels)  # no parameter: see MMDKernel
    self.projections = nnx.Dict(projections)
    self.kernels = nnx.Dict(kernels)

  def __call__(self, student_feats: Mapping[str, jax.Array],
               teacher_feats: Mapping[str, jax.Array], *, mask=None, weights=None):
    layer_weights = self.layer_weights[...]
    total = jnp.zeros((), jnp.float32)
    per_layer = {}
    for name, kind in self.slice_losses.items():
      for arg, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if name not in feats:
          raise ValueError(f"`{arg}` has no slice {name!r}")
      hs, ht = jnp.asarray(student_feats[name]), jnp.asarray(teacher_feats[name])
      if hs.shape[0] != len(self.layer_map):
        raise ValueError(f"`student_feats[{name!r}]` has {hs.shape[0]} layers, expected "
                         f"{len(self.layer_map)}")
      if max(self.layer_map) >= ht.shape[0]:
        raise ValueError(f"`teacher_feats[{name!r}]` has {ht.shape[0]} layers; the layer map "
                         f"{self.layer_map} needs {max(self.layer_map) + 1}")
      losses = []
      for i, j in enumerate(self.layer_map):
        s = hs[i].astype(compute_dtype(hs[i]))
        if name in self.projections:
          s = self.projections[name][i](s)
        t = ht[j]
        if kind == "cosine":
          loss = cosine_angular_loss(s, t, angular_weight=self.angular_weight,
                                     margin=self.margin, mask=mask, weights=weights)
        elif kind == "mmd":
          m = None
          if mask is not None or weights is not None:
            m, (s, t) = _apply_mask(mask, weights, jnp.float32, s, t)
          loss = self.kernels[name](s, t, x_mask=m, y_mask=m)
        else:
          loss = reconstruction_l1(s, t, mask=mask, weights=weights)
        losses.append(loss.astype(jnp.float32))
      per_layer[name] = jnp.stack(losses)
      total = total + jnp.sum(layer_weights * per_layer[name])
    return total, per_layer
