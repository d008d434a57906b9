"""Token losses computed from final hidden states over sequence chunks, never materialising logits.

A distillation step with vocabulary V and N = B·T positions normally builds ``[N, V]`` logits
for both models (4.2 GB each in float32 at 8,192 × 128k) and keeps them, plus the softmaxes,
for the backward pass. :func:`chunked_token_loss` takes the two models' final hidden states
and output projections instead and walks over the flattened positions in chunks of
``chunk_size`` inside a ``lax.scan``, so that at most one chunk of logits per model,
``[chunk_size, V]``, is alive at a time. The idea and the memory anchor are Liger-Kernel's
fused linear distillation losses (Hsu et al. 2024, arXiv 2410.10989).

Two gradient modes, equal in value and gradients to the unchunked form (``chunk_size=None``):

* ``"fused"`` (default): the forward sweep computes, chunk by chunk, the loss and its vector–
  Jacobian product w.r.t. the student's hidden states, kernel, bias and the weights (a
  ``custom_vjp``); the backward pass only rescales them. Each chunk's logits are computed once:
  the same four matmuls as the unchunked form. The teacher is a constant: gradients w.r.t.
  ``teacher_hidden``, ``teacher_kernel`` and ``teacher_bias`` are zero (as under
  ``stop_gradient``), and ``temperature``, ``beta``, ``alpha`` must be Python numbers.
* ``"remat"``: plain autodiff through a scan whose body is wrapped in ``jax.checkpoint``:
  the backward pass recomputes each chunk's logits (six matmuls instead of four), but every
  input, the teacher included, gets its true gradient and higher-order derivatives work.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from distill import _divergences as dv

GRAD_MODES = ("fused", "remat")


def _project(hidden, kernel, bias, dtype):
  """logits = hidden @ kernel + bias, accumulated in ``dtype`` (float32 or wider)."""
  out = jnp.matmul(hidden, kernel, preferred_element_type=dtype).astype(dtype)
  if bias is not None:
    out = out + bias.astype(dtype)
  return out


def _check_projection(name_h, hidden, name_k, kernel, name_b, bias):
  h_shape, k_shape = tuple(jnp.shape(hidden)), tuple(jnp.shape(kernel))
  if len(h_shape) < 2:
    raise ValueError(f"`{name_h}` must be [..., H] with at least one position axis, got shape "
                     f"{h_shape}")
  if len(k_shape) != 2 or k_shape[0] != h_shape[-1]:
    raise ValueError(f"`{name_k}` must be [H, V] with H = {h_shape[-1]} (the last axis of "
                     f"`{name_h}`), got shape {k_shape}")
  if bias is not None and tuple(jnp.shape(bias)) != (k_shape[1],):
    raise ValueError(f"`{name_b}` must have shape ({k_shape[1]},), got {tuple(jnp.shape(bias))}")


def _check_args(student_hidden, student_kernel, student_bias, teacher_hidden, teacher_kernel,
                teacher_bias, chunk_size, grad_mode, reduction, temperature, beta, alpha):
  _check_projection("student_hidden", student_hidden, "student_kernel", student_kernel,
                    "student_bias", student_bias)
  _check_projection("teacher_hidden", teacher_hidden, "teacher_kernel", teacher_kernel,
                    "teacher_bias", teacher_bias)
  if jnp.shape(student_hidden)[:-1] != jnp.shape(teacher_hidden)[:-1]:
    raise ValueError(f"`teacher_hidden` positions {jnp.shape(teacher_hidden)[:-1]} must equal "
                     f"`student_hidden` positions {jnp.shape(student_hidden)[:-1]}")
  if jnp.shape(student_kernel)[1] != jnp.shape(teacher_kernel)[1]:
    raise ValueError(f"`teacher_kernel` vocabulary {jnp.shape(teacher_kernel)[1]} must equal "
                     f"`student_kernel` vocabulary {jnp.shape(student_kernel)[1]}")
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer))
                                 or isinstance(chunk_size, bool) or chunk_size < 1):
    raise ValueError(f"`chunk_size` must be an int >= 1 or None (unchunked), got "
                     f"{chunk_size!r}")
  if grad_mode not in GRAD_MODES:
    raise ValueError(f"`grad_mode` must be one of {GRAD_MODES}, got {grad_mode!r}")
  if grad_mode == "fused" and chunk_size is not None:
    if reduction == "none":
      raise ValueError("`reduction` 'none' needs `grad_mode='remat'` in the chunked form "
                       "(the fused mode precomputes the gradient of a scalar)")
    for name, v in (("temperature", temperature), ("beta", beta), ("alpha", alpha)):
      if v is not None and not dv._is_static(v):
        raise ValueError(f"`{name}` must be a Python number with `grad_mode='fused'`; use "
                         f"`grad_mode='remat'` for a traced {name}")


def _to_chunks(x, n_chunks, chunk):
  """[N, ...] -> [n_chunks, chunk, ...], zero-padded at the end."""
  pad = n_chunks * chunk - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((n_chunks, chunk) + x.shape[1:])


@functools.lru_cache(maxsize=None)
def _fused_weighted_sum(loss, temperature, beta, alpha, dtype_name):
  """custom_vjp S(hs, ks, bs, w, ht, kt, bt, labels) = Σ_i w_i d_i over [n, C, ·] chunks."""
  dtype = jnp.dtype(dtype_name)

  def chunk_sum(hs, ks, bs, w, ht, kt, bt, labels):
    d = dv.pointwise_loss(loss, _project(hs, ks, bs, dtype), _project(ht, kt, bt, dtype),
                          labels, temperature=temperature, beta=beta, alpha=alpha)
    return jnp.sum(w * d)

  def primal(hs, ks, bs, w, ht, kt, bt, labels):
    def body(acc, xs):
      hs_c, w_c, ht_c, lab_c = xs
      return acc + chunk_sum(hs_c, ks, bs, w_c, ht_c, kt, bt, lab_c), None
    total, _ = jax.lax.scan(body, jnp.zeros((), dtype), (hs, w, ht, labels))
    return total

  f = jax.custom_vjp(primal)

  def fwd(hs, ks, bs, w, ht, kt, bt, labels):
    def body(carry, xs):
      acc, gk, gb = carry
      hs_c, w_c, ht_c, lab_c = xs
      val, vjp = jax.vjp(lambda h, k, b, ww: chunk_sum(h, k, b, ww, ht_c, kt, bt, lab_c),
                         hs_c, ks, bs, w_c)
      g_h, g_k, g_b, g_w = vjp(jnp.ones((), val.dtype))
      gk = gk + g_k.astype(dtype)
      gb = None if gb is None else gb + g_b.astype(dtype)
      return (acc + val, gk, gb), (g_h, g_w)

    init = (jnp.zeros((), dtype), jnp.zeros(ks.shape, dtype),
            None if bs is None else jnp.zeros(bs.shape, dtype))
    (total, gk, gb), (g_h, g_w) = jax.lax.scan(body, init, (hs, w, ht, labels))
    zeros_t = (jnp.zeros_like(ht), jnp.zeros_like(kt), None if bt is None else jnp.zeros_like(bt),
               np.zeros(labels.shape, jax.dtypes.float0))
    return total, (g_h, gk.astype(ks.dtype), None if gb is None else gb.astype(bs.dtype), g_w,
                   zeros_t)

  def bwd(res, g):
    g_h, gk, gb, g_w, zeros_t = res
    scale = lambda x: None if x is None else (g * x.astype(g.dtype)).astype(x.dtype)
    return (scale(g_h), scale(gk), scale(gb), scale(g_w)) + zeros_t

  f.defvjp(fwd, bwd)
  return f


def _remat_values(loss, hs, ks, bs, w, ht, kt, bt, labels, *, temperature, beta, alpha, dtype):
  """[n, C] per-position w_i d_i, each chunk's logits recomputed in the backward pass."""
  @jax.checkpoint
  def body(carry, xs):
    hs_c, w_c, ht_c, lab_c = xs
    d = dv.pointwise_loss(loss, _project(hs_c, ks, bs, dtype), _project(ht_c, kt, bt, dtype),
                          lab_c, temperature=temperature, beta=beta, alpha=alpha)
    return carry, w_c * d
  _, values = jax.lax.scan(body, None, (hs, w, ht, labels))
  return values


def chunked_token_loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, *,
                       loss="forward_kl", student_bias=None, teacher_bias=None, labels=None,
                       mask=None, weights=None, temperature=1.0, beta=0.5, alpha=None,
                       reduction="mean", chunk_size=1024, grad_mode="fused") -> jax.Array:
  r"""A token loss of :data:`distill.TOKEN_LOSSES` from hidden states, over position chunks.

  .. math:: z_s = h_s W_s + b_s,\quad z_t = h_t W_t + b_t,\qquad
     L = \mathrm{reduce}_i\big(w_i m_i\, d(z_{s,i}, z_{t,i})\big),

  with :math:`d` exactly the per-position function of :func:`distill.token_loss` (same
  temperature, β, α, :math:`T^2` conventions) and the reductions of
  :mod:`distill._divergences`. Positions (all axes but the last of the hidden states) are
  flattened and cut into chunks of ``chunk_size``; a last partial chunk is zero-padded with
  weight 0. Logits are accumulated in float32 (or wider) whatever the input dtype. Memory:
  a few ``[chunk_size, V]`` float32 arrays instead of several ``[N, V]`` (see
  ``benchmarks/distill_bench.py``). Reference for the approach: Liger-Kernel fused linear
  distillation (Hsu et al. 2024, arXiv 2410.10989).

  Args:
    student_hidden: ``[..., H_s]`` final hidden states :math:`h_s` of the student.
    student_kernel: ``[H_s, V]`` output projection :math:`W_s` (Flax ``Dense`` kernel layout;
      pass ``embedding.T`` for tied embeddings).
    teacher_hidden: ``[..., H_t]`` teacher hidden states, same position axes.
    teacher_kernel: ``[H_t, V]`` teacher output projection.
    loss: a name of :data:`distill.TOKEN_LOSSES`.
    student_bias, teacher_bias: optional ``[V]`` biases.
    labels: ``[...]`` integer hard labels, required by ``"hinton"``.
    mask: optional ``[...]`` padding mask; masked positions are zeroed before the projection,
      so they contribute nothing, not even NaN.
    weights: optional ``[...]`` float per-position weights.
    temperature, beta, alpha: as in :func:`distill.token_loss`.
    reduction: ``"mean"``, ``"token_mean"``, ``"sum"``, or ``"none"`` (remat / unchunked only).
    chunk_size: positions per chunk; ``None`` computes the unchunked form (full logits), the
      reference the chunked form equals.
    grad_mode: ``"fused"`` or ``"remat"`` (see the module docstring). In ``"fused"`` the
      teacher's inputs get zero gradients.

  Returns:
    A float32 (or wider) scalar, or ``[...]`` for ``reduction="none"``.

  NaN: NaN in the hidden states or projections at unmasked positions gives a NaN loss.

  Example:
    >>> import jax.numpy as jnp
    >>> h_s, w_s = jnp.ones((2, 5, 8)), jnp.zeros((8, 11))
    >>> h_t, w_t = jnp.ones((2, 5, 4)), jnp.zeros((4, 11))
    >>> float(chunked_token_loss(h_s, w_s, h_t, w_t, chunk_size=3))
    0.0
  """
  _check_args(student_hidden, student_kernel, student_bias, teacher_hidden, teacher_kernel,
              teacher_bias, chunk_size, grad_mode, reduction, temperature, beta, alpha)
  positions = tuple(jnp.shape(student_hidden)[:-1])
  v = jnp.shape(student_kernel)[1]
  dv.check_token_args(jax.ShapeDtypeStruct(positions + (v,), jnp.float32),
                      jax.ShapeDtypeStruct(positions + (v,), jnp.float32), mask=mask,
                      weights=weights, labels=labels, temperature=temperature,
                      reduction=reduction)
  dv.check_loss_name(loss, labels, beta, alpha)
  dtype = dv.compute_dtype(student_hidden, student_kernel, teacher_hidden, teacher_kernel)

  student_hidden, teacher_hidden, labels = dv.sanitize(mask, student_hidden, teacher_hidden,
                                                       labels)
  w = dv.effective_weights(mask, weights, positions, dtype)

  if chunk_size is None:
    values = w * dv.pointwise_loss(
        loss, _project(student_hidden, student_kernel, student_bias, dtype),
        _project(teacher_hidden, teacher_kernel, teacher_bias, dtype), labels,
        temperature=temperature, beta=beta, alpha=alpha)
    return _reduce(values, w, mask, reduction, positions, dtype)

  n = math.prod(positions)
  chunk = min(int(chunk_size), n)
  n_chunks = -(-n // chunk)
  lab = jnp.zeros(positions, jnp.int32) if labels is None else labels.astype(jnp.int32)
  hs = _to_chunks(student_hidden.reshape(n, -1), n_chunks, chunk)
  ht = _to_chunks(teacher_hidden.reshape(n, -1), n_chunks, chunk)
  wc = _to_chunks(w.reshape(n), n_chunks, chunk)
  lc = _to_chunks(lab.reshape(n), n_chunks, chunk)

  if grad_mode == "remat":
    values = _remat_values(loss, hs, student_kernel, student_bias, wc, ht, teacher_kernel,
                           teacher_bias, lc, temperature=temperature, beta=beta, alpha=alpha,
                           dtype=dtype)
    values = values.reshape(-1)[:n].reshape(positions)
    return _reduce(values, w, mask, reduction, positions, dtype)

  f = _fused_weighted_sum(loss, float(temperature), float(beta),
                          None if alpha is None else float(alpha), jnp.dtype(dtype).name)
  total = f(hs, student_kernel, student_bias, wc, ht, teacher_kernel, teacher_bias, lc)
  return _reduce_total(total, w, mask, reduction, positions, dtype)


def _reduce(values, w, mask, reduction, positions, dtype):
  """values are already w_i d_i (0 at masked positions)."""
  if reduction == "none":
    return values
  return _reduce_total(jnp.sum(values), w, mask, reduction, positions, dtype)


def _reduce_total(total, w, mask, reduction, positions, dtype):
  if reduction == "sum":
    return total
  if reduction == "mean":
    return dv.safe_divide(total, jnp.sum(w))
  den = (jnp.asarray(math.prod(positions), dtype) if mask is None
         else jnp.sum(jnp.asarray(mask).astype(dtype)))
  return dv.safe_divide(total, den)


def chunked_token_entropy(hidden, kernel, bias=None, *, temperature=1.0, chunk_size=1024
                          ) -> jax.Array:
  r"""Per-position entropy :math:`H_i = -\sum_v p_{iv}\log p_{iv}` of ``softmax((hW + b)/T)``.

  Nats, float32 or wider, shape ``hidden.shape[:-1]``, computed over chunks of ``chunk_size``
  positions without holding ``[N, V]`` logits (``chunk_size=None``: unchunked). Not
  differentiated through (wrapped in ``stop_gradient``): it feeds
  :func:`distill.importance_weights` from the teacher. NaN hidden states give NaN entropies.
  """
  _check_projection("hidden", hidden, "kernel", kernel, "bias", bias)
  dv._check_temperature(temperature)
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"`chunk_size` must be an int >= 1 or None, got {chunk_size!r}")
  from distill._weights import token_entropy
  hidden, kernel, bias = jax.lax.stop_gradient((hidden, kernel, bias))
  dtype = dv.compute_dtype(hidden, kernel)
  positions = tuple(hidden.shape[:-1])
  if chunk_size is None:
    return token_entropy(_project(hidden, kernel, bias, dtype), temperature=temperature)
  n = math.prod(positions)
  chunk = min(int(chunk_size), n)
  n_chunks = -(-n // chunk)
  hc = _to_chunks(hidden.reshape(n, -1), n_chunks, chunk)
  out = jax.lax.map(lambda h: token_entropy(_project(h, kernel, bias, dtype),
                                            temperature=temperature), hc)
  return out.reshape(-1)[:n].reshape(positions)
