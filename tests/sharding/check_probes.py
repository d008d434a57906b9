"""Curvature probes, distillation losses and a convergence monitor on sharded parameters.

Runs in its own process with 8 simulated CPU devices (``test_sharded_process.py``). Every
probe runs jitted twice: on single-device inputs (the reference) and on the same values
laid out on a mesh, parameters sharded FSDP-style (each leaf along its largest dimension
divisible by the axis size, else replicated) and the batch split over all devices. Meshes:
``('data', 'fsdp') = (2, 4)`` with the parameters on ``fsdp``, and, for the cheaper checks,
``('data',) = (8,)`` with the parameters on ``data`` (ZeRO-3 style). Dense references
(``jax.hessian`` + ``eigh``, the per-example Jacobian) check the single-device answers.
Compilation dominates the run time on a CPU, so the Lanczos-based probes share one jitted
program per layout, and the optax probe and the anomaly guard share one train step.

Tolerances. Sharding changes only the order of float32 reductions (a mean over the batch
becomes per-device partial sums plus an all-reduce; a matmul over a sharded contraction axis
becomes partial products plus a reduce-scatter). A reordered sum of n terms moves by at most
~log2(n) ulps of the magnitude of its terms, so with n <= 64 and the O(1)-conditioned chain
matmul -> tanh -> matmul -> log-softmax -> mean, scalars and vectors (in norm: single entries
near 0 carry no relative digits) agree to ``RTOL_REDUCE`` = 1e-5 ~ 80 eps32. Converged
Lanczos eigenvalues from two Krylov bases that differ by rounding agree to the float32
Lanczos tolerance of STYLE.md, ``RTOL_LANCZOS`` = 1e-4 (``default_tol(float32)``).
Bisection steps are dyadic numbers chosen by the sign of ``L(θ - ηΔθ) - L0`` alone, so with
equal signs the bracket is bit-identical and is asserted exactly.
"""

import math
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import convergence
import curvature
import distill

RTOL_REDUCE = 1e-5
RTOL_LANCZOS = 1e-4
N = 64  # batch: 8 examples per device
D_IN, WIDTH, CLASSES = 6, 32, 5  # 357 parameters in 3 leaves (compile time grows per leaf)

# name -> (mesh shape, axis names, the axis the parameters are sharded on)
MESHES = {"2d": ((2, 4), ("data", "fsdp"), "fsdp"), "1d": ((8,), ("data",), "data")}


def fsdp_spec(shape, axis: str, size: int) -> P:
  """Shard along the largest dimension divisible by ``size``; replicate when there is none."""
  for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[d] % size == 0:
      return P(*[axis if i == d else None for i in range(len(shape))])
  return P()


class Layout:
  """A mesh, FSDP shardings for parameter-shaped trees and a data sharding for batches."""

  def __init__(self, name, devices):
    shape, axes, self.param_axis = MESHES[name]
    self.name = name
    self.mesh = Mesh(np.array(devices[:math.prod(shape)]).reshape(shape), axes)
    self.size = self.mesh.shape[self.param_axis]
    self.batch_spec = P(axes)  # the leading axis over every device

  def param_spec(self, x) -> P:
    return fsdp_spec(np.shape(x), self.param_axis, self.size)

  def params(self, tree):
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(self.mesh, self.param_spec(x))), tree)

  def batch(self, tree):
    return jax.device_put(tree, NamedSharding(self.mesh, self.batch_spec))


def single(tree):
  """The reference layout: every leaf on device 0."""
  return jax.device_put(tree, jax.devices()[0])


def assert_laid_out_like(layout, tree, params, leading=0):
  """Each leaf of ``tree`` (``[*lead, *leaf_shape]``) is sharded like its parameter leaf."""
  flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    want = NamedSharding(layout.mesh, P(*[None] * leading, *layout.param_spec(flat_params[path])))
    assert v.sharding.is_equivalent_to(want, v.ndim), (
        f"{jax.tree_util.keystr(path)}: {v.sharding.spec} is not {want.spec}")


def close(a, b, rtol, what):
  """``|a - b| <= rtol |b|``, in the Euclidean norm for vectors and pytrees."""
  a, b = flat(a), flat(b)
  err = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert err <= rtol, f"{what}: relative difference {err:.3g} > {rtol:g}"


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------- the model


def init_params(seed=0):
  """A tanh MLP whose leaves cover the three FSDP cases: sharded along the output axis
  (``hidden``), along the contraction axis (``head``), and replicated (``bias``: 5 entries)."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.normal(size=s).astype(np.float32)
  return {"hidden": normal(D_IN, WIDTH) / math.sqrt(D_IN),
          "head": normal(WIDTH, CLASSES) / math.sqrt(WIDTH), "bias": 0.1 * normal(CLASSES)}


def make_batch(seed=1, heterogeneous=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D_IN)).astype(np.float32)
  if heterogeneous:
    # Device s holds rows 8s..8s+7 on both meshes; its inputs are scaled by 2^(s/2 - 1), so
    # the curvature of each shard's own loss differs several-fold from the others'.
    x = x * np.repeat(2.0 ** (np.arange(8) / 2 - 1), N // 8)[:, None].astype(np.float32)
  return {"x": x, "y": rng.integers(0, CLASSES, size=(N,)).astype(np.int32)}


def per_example_loss(params, batch):
  logits = jnp.tanh(batch["x"] @ params["hidden"]) @ params["head"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def loss_fn(params, batch):
  return jnp.mean(per_example_loss(params, batch))


@pytest.fixture(scope="module", params=list(MESHES))
def layout(request, devices):
  return Layout(request.param, devices)


@pytest.fixture(scope="module")
def layout_2d(devices):
  return Layout("2d", devices)


# ------------------------------------------------------------------- critical sharpness


@jax.jit
def _gd_sharpness(params, batch):
  g = jax.grad(loss_fn)(params, batch)
  res = curvature.critical_sharpness(lambda p: loss_fn(p, batch), params, g, tol_power=6,
                                     method="bisect")
  return res, g


@jax.jit
def _sharpness_along(params, batch, direction):
  return curvature.critical_sharpness(lambda p: loss_fn(p, batch), params, direction,
                                      tol_power=6, method="bisect")


def test_critical_sharpness_compares_the_global_mean_loss(layout):
  """λ_c on a batch split over 8 devices is λ_c of the whole batch, not of any one shard.

  The shards are built to disagree (inputs scaled 0.5x .. 5.7x by shard), so a search that
  compared a shard-local loss, or any one device's value, would land on that shard's λ_c.
  """
  params, batch = init_params(), make_batch(heterogeneous=True)
  ref, g_ref = _gd_sharpness(single(params), single(batch))
  got, g = _gd_sharpness(layout.params(params), layout.batch(batch))
  assert int(ref.status) == curvature.STATUS_OK
  for name in ("status", "num_evals", "lower", "upper", "sharpness"):
    # Dyadic trial steps, equal rise/no-rise signs -> the same bits (module docstring).
    assert np.array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))), name
  close(got.loss0, ref.loss0, RTOL_REDUCE, "L0")
  close(g, g_ref, RTOL_REDUCE, "gradient")
  # What each shard alone says along the same (global) direction.
  per_shard = np.array([
      float(_sharpness_along(single(params), single(jax.tree.map(lambda x: x[8 * s:8 * s + 8],
                                                                 batch)), g_ref).sharpness)
      for s in range(8)])
  assert per_shard.max() / per_shard.min() > 2, per_shard
  # The bracket's relative half-width at tol_power=6 is 2^-7: farther than that is another λ_c.
  assert np.all(np.abs(per_shard / float(got.sharpness) - 1) > 2 ** -6), (per_shard,
                                                                         got.sharpness)


# ----------------------------------------- the optax probe and the convergence monitor
# The trainer's monitor (``convergence.Monitor``) runs on host scalars after the step and
# takes ~40 s to compile here; the parameter-sized part of the convergence package is
# ``anomaly_guard``, which runs the same ``anomaly_detector`` on global norms of the sharded
# gradients and updates inside the jitted step.


def _train_step():
  """Adam with the critical-sharpness probe inside ``convergence.anomaly_guard``."""
  inner = optax.chain(optax.scale_by_adam(),
                      curvature.critical_sharpness_probe(learning_rate=0.05, directional=True),
                      optax.scale_by_learning_rate(0.05))
  tx = convergence.anomaly_guard(inner, max_consecutive_skips=2)

  @jax.jit
  def step(params, state, batch, poison):
    value_fn = lambda p: loss_fn(p, batch)
    loss, grads = jax.value_and_grad(value_fn)(params)
    loss = jnp.where(poison, jnp.nan, loss)
    updates, state = tx.update(grads, state, params, value=loss, grad=grads,
                               value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  return tx, step


TX, STEP = _train_step()
POISONED = 4  # the loss of this step is NaN: the guard must skip it


def _run(params, batch):
  state = jax.jit(TX.init)(params)
  infos = []
  for i in range(6):
    params, state = STEP(params, state, batch, i == POISONED)
    infos.append((state.info, state.inner_state[1].info))
  return params, state, infos


def test_probe_and_anomaly_guard_in_a_train_step(layout_2d):
  """Six jitted steps: the probe's λ_c (warm-started after the first), the guard's global norms
  of sharded gradients and updates, its verdicts (step 4's NaN loss is skipped), the
  parameters, and Adam's moments still laid out like the parameters."""
  layout = layout_2d
  params, batch = init_params(), make_batch()
  ref_p, ref_s, ref_i = _run(single(params), single(batch))
  got_p, got_s, got_i = _run(layout.params(params), layout.batch(batch))
  skipped = [i == POISONED for i in range(6)]
  assert [bool(g.skipped) for g, _ in got_i] == [bool(g.skipped) for g, _ in ref_i] == skipped
  assert [int(g.reason) for g, _ in got_i] == [int(g.reason) for g, _ in ref_i]
  for i, ((ref_g, ref_c), (got_g, got_c)) in enumerate(zip(ref_i, got_i)):
    close(got_g.grad_norm, ref_g.grad_norm, RTOL_REDUCE, f"step {i} grad norm")
    close(got_g.update_norm, ref_g.update_norm, RTOL_REDUCE, f"step {i} update norm")
    if i == POISONED:
      continue
    assert int(got_c.status) == int(ref_c.status) == curvature.STATUS_OK
    assert int(got_c.num_evals) == int(ref_c.num_evals), i
    # The interpolating search places trials at the root of a parabola fitted to
    # f = L(η) - L0; 3 % either side of the root (where its trials go) |f| is 0.5-1 % of L
    # on these steps, so f, hence the root and the final bracket, carry up to ~100x the
    # relative error of the losses.
    close(got_c.sharpness, ref_c.sharpness, 100 * RTOL_REDUCE, f"step {i} λ_c")
    close(got_c.directional_sharpness, ref_c.directional_sharpness, RTOL_REDUCE,
          f"step {i} directional sharpness")
  # Adam normalises each entry by its own scale, so an entry whose gradient is near its
  # rounding error moves by O(lr) differently; over 5 updates, in norm, 10x RTOL_REDUCE.
  close(got_p, ref_p, 10 * RTOL_REDUCE, "parameters after the steps")
  assert int(got_s.total_skipped) == int(ref_s.total_skipped) == 1
  adam = got_s.inner_state[0]
  assert_laid_out_like(layout, adam.mu, params)
  assert_laid_out_like(layout, adam.nu, params)


# -------------------------------------------------------------------- Lanczos family

# Krylov basis size; 48 is no other dimension of these programs, so a buffer
# [..., 48, *leaf_shape] in the compiled HLO can only be (a copy of) a basis leaf.
NUM_ITERS = 48


def _curvature_probes(params, batch, adam):
  loss = lambda p: loss_fn(p, batch)
  return {
      "hessian": curvature.hessian_eigenvalues(loss, params, k=2, num_iters=NUM_ITERS,
                                               return_eigenvectors=True),
      "preconditioned": curvature.preconditioned_sharpness(loss, params, adam,
                                                           num_iters=NUM_ITERS),
      "noise": curvature.gradient_noise_top_eigenvalue(per_example_loss, params, batch,
                                                       num_iters=NUM_ITERS),
      "trace": curvature.hessian_trace(loss, params, num_samples=64, key=jax.random.PRNGKey(3),
                                       batch_size=16),
      "density": curvature.spectral_density(loss, params, num_probes=2, num_iters=NUM_ITERS,
                                            num_grid=16, key=jax.random.PRNGKey(4)),
  }


@pytest.fixture(scope="module")
def lanczos_problem():
  """The model, an Adam state (the moments after one step, count = 1: both bias corrections
  active) and the dense references."""
  params, batch = init_params(), make_batch()
  g = jax.device_get(jax.jit(jax.grad(loss_fn))(params, batch))
  adam = optax.ScaleByAdamState(count=np.int32(1), mu=jax.tree.map(lambda x: 0.1 * x, g),
                                nu=jax.tree.map(lambda x: 0.001 * x * x, g))
  w, unravel = jax.flatten_util.ravel_pytree(params)
  hess = np.asarray(jax.jit(jax.hessian(lambda v: loss_fn(unravel(v), batch)))(w), np.float64)
  jac = np.asarray(jax.jit(jax.jacrev(lambda v: per_example_loss(unravel(v), batch)))(w),
                   np.float64)
  pinv_sqrt = 1 / np.sqrt(flat(curvature.adam_preconditioner(adam)))
  centred = jac - jac.mean(axis=0)
  dense = {
      "hessian": np.linalg.eigvalsh(hess)[::-1][:2],
      "preconditioned": np.linalg.eigvalsh(pinv_sqrt[:, None] * hess * pinv_sqrt[None, :])[-1],
      # Σ = Gcᵀ Gc / N shares its non-zero eigenvalues with the N x N Gram matrix Gc Gcᵀ / N.
      "noise": np.linalg.eigvalsh(centred @ centred.T / N)[-1],
      "trace": np.trace(hess),
  }
  return params, batch, adam, dense


def test_lanczos_probes_on_sharded_parameters(layout_2d, lanczos_problem):
  """Hessian (top 2, with Ritz vectors), preconditioned and gradient-noise eigenvalues, the
  Hutchinson trace and the SLQ density: sharded == single device (== dense where there is
  one), and no Krylov basis is gathered.

  Basis: the Ritz vectors come back laid out like the parameters; the sharded program holds
  no buffer of a whole basis leaf ``[..., m, *leaf_shape]`` of a sharded parameter anywhere
  (the single-device program has dozens: basis, CGS2 products, restart copies), so no probe
  gathers its Krylov basis; and its per-device temp memory is less than half the
  single-device one (every parameter- and batch-sized buffer shrinks 4-8x; only the
  replicated 5-entry bias and the m x m projected matrices do not).
  """
  layout = layout_2d
  params, batch, adam, dense = lanczos_problem
  fn = jax.jit(_curvature_probes)
  ref_args = single((params, batch, adam))
  got_args = (layout.params(params), layout.batch(batch),
              adam._replace(mu=layout.params(adam.mu), nu=layout.params(adam.nu)))
  ref_exe, got_exe = fn.lower(*ref_args).compile(), fn.lower(*got_args).compile()
  ref, got = ref_exe(*ref_args), got_exe(*got_args)

  for name in ("hessian", "preconditioned", "noise"):
    assert bool(ref[name].converged) and bool(got[name].converged), name
    close(ref[name].eigenvalues, dense[name], RTOL_LANCZOS, f"{name}: 1 device vs dense")
    close(got[name].eigenvalues, ref[name].eigenvalues, RTOL_LANCZOS,
          f"{name}: sharded vs 1 device")
  # Ritz vectors are unit vectors up to sign: |<u_ref, u_got>| = 1 to Lanczos accuracy.
  for i in range(2):
    u_ref = flat(jax.tree.map(lambda v: v[i], ref["hessian"].eigenvectors))
    u_got = flat(jax.tree.map(lambda v: v[i], got["hessian"].eigenvectors))
    assert abs(abs(u_ref @ u_got) - 1) < RTOL_LANCZOS, i
  assert_laid_out_like(layout, got["hessian"].eigenvectors, params, leading=1)

  # The same Rademacher probes on both layouts (threefry bits do not depend on sharding);
  # each zᵀHz sums P = 357 products, one more reordered reduction than a loss: 10x.
  close(got["trace"].estimate, ref["trace"].estimate, 10 * RTOL_REDUCE, "Hutchinson trace")
  # Independent check of the single-device estimate: within 4 standard errors of tr H.
  assert abs(float(ref["trace"].estimate) - dense["trace"]) < 4 * float(ref["trace"].std_error)
  # SLQ: Ritz values of each probe's tridiagonal (float32 Lanczos tolerance) and their
  # quadrature weights, which sum to 1 (absolute tolerance).
  close(got["density"].nodes, ref["density"].nodes, RTOL_LANCZOS, "SLQ nodes")
  np.testing.assert_allclose(got["density"].weights, ref["density"].weights, atol=RTOL_LANCZOS)

  ref_hlo, got_hlo = ref_exe.as_text(), got_exe.as_text()
  for name, x in params.items():
    if layout.param_spec(x) == P():
      continue
    full = re.compile(r"f32\[(?:\d+,)*%d,%s\]" % (NUM_ITERS, ",".join(map(str, x.shape))))
    assert full.search(ref_hlo), name  # the pattern does find the single-device basis
    assert not full.search(got_hlo), f"{name}: a whole Krylov basis leaf {full.pattern}"
  ref_temp = ref_exe.memory_analysis().temp_size_in_bytes
  got_temp = got_exe.memory_analysis().temp_size_in_bytes
  assert got_temp < ref_temp / 2, (got_temp, ref_temp)


# ------------------------------------------------------------------------- distillation

B, T, H_S, H_T, V = 8, 6, 16, 24, 64


@jax.jit
def _distill(d):
  def chunked(hs, ws):
    return distill.chunked_token_loss(hs, ws, d["ht"], d["wt"], loss="forward_kl",
                                      weights=d["weights"], temperature=2.0, chunk_size=16)

  value, grads = jax.value_and_grad(chunked, argnums=(0, 1))(d["hs"], d["ws"])
  soft = distill.soft_target_kl(d["hs"] @ d["ws"], d["ht"] @ d["wt"], temperature=2.0,
                                weights=d["weights"])
  return value, grads, soft


def test_distill_losses(layout):
  """Chunked forward KL (value and student gradients) and the soft-target KL, sharded.

  Hidden states and position weights are split over the batch, the output projections
  FSDP-style along the vocabulary, so every softmax reduces over a sharded axis.
  """
  rng = np.random.default_rng(2)
  normal = lambda *s: rng.normal(size=s).astype(np.float32)
  d = {"hs": normal(B, T, H_S), "ws": normal(H_S, V) / 4, "ht": normal(B, T, H_T),
       "wt": normal(H_T, V) / 5, "weights": rng.uniform(0.2, 3.0, size=(B, T)).astype(np.float32)}
  ref = _distill(single(d))
  got = _distill({"hs": layout.batch(d["hs"]), "ht": layout.batch(d["ht"]),
                  "weights": layout.batch(d["weights"]), "ws": layout.params(d["ws"]),
                  "wt": layout.params(d["wt"])})
  # Independent reference: the weighted mean of T^2 KL(P_T || S_T) in float64 NumPy.
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  f64 = {k: np.asarray(v, np.float64) for k, v in d.items()}
  lp = log_softmax(f64["ht"] @ f64["wt"] / 2.0)
  lq = log_softmax(f64["hs"] @ f64["ws"] / 2.0)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  exact = (f64["weights"] * kl).sum() / f64["weights"].sum()
  close(ref[0], exact, RTOL_REDUCE, "chunked forward KL (1 device) vs float64")
  close(ref[2], 4.0 * exact, RTOL_REDUCE, "soft-target KL (1 device) vs float64 T^2 KL")
  close(got[0], ref[0], RTOL_REDUCE, "chunked loss")
  close(got[1], ref[1], RTOL_REDUCE, "chunked loss gradients")
  close(got[2], ref[2], RTOL_REDUCE, "soft-target KL")
