"""Feature distillation against NumPy references and a manual recomputation of the GPT.

References: cosine / angle and L1 in float64 NumPy; MMD² by an explicit double loop over
sample pairs with the same mixture-of-Gaussians kernel (float64, 1e-6); layer maps computed by
hand; intermediates of ``experiments.models.GPT`` recomputed block by block from its
submodules.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from distill import _features as F


def _ctx(dtype):
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _tol(dtype):
  return 1e-12 if dtype == "float64" else 2e-6


# ------------------------------------------------------------------ cosine + angular


def _np_cosine_angular(s, t, lam, margin, w):
  s, t = s.astype(np.float64), t.astype(np.float64)
  cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  theta = np.arccos(np.clip(cos, -1, 1))
  per = (1 - cos) + lam * np.maximum(theta - margin, 0) ** 2
  return np.sum(per * w) / np.sum(w)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cosine_angular_matches_numpy(dtype, seed):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(3, 5, 16))
  t = s + rng.normal(size=s.shape) * rng.uniform(0.1, 3.0, size=(3, 5, 1))
  w = (rng.uniform(size=(3, 5)) > 0.3).astype(np.float64)
  with _ctx(dtype):
    sj, tj = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
    fn = jax.jit(lambda a, b, m: F.cosine_angular_loss(a, b, angular_weight=0.7, margin=0.1,
                                                       mask=m))
    out = fn(sj, tj, jnp.asarray(w))
    # the reference sees the same (rounded) inputs
    expected = _np_cosine_angular(np.asarray(sj, np.float64), np.asarray(tj, np.float64), 0.7,
                                  0.1, w)
  assert out.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
  np.testing.assert_allclose(float(out), expected, rtol=1e-10 if dtype == "float64" else 1e-5)


def test_cosine_identities_and_gradients():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  loss = jax.jit(lambda a, b: F.cosine_angular_loss(a, b, angular_weight=1.0))
  assert abs(float(loss(x, 3.0 * x))) < 1e-6                     # scale invariant, parallel
  np.testing.assert_allclose(float(loss(x, -x)), 2.0 + np.pi ** 2, rtol=1e-5)   # antiparallel
  g = jax.grad(loss)(x, x)                                        # arccos would give NaN here
  assert np.all(np.isfinite(np.asarray(g)))
  zero = jnp.zeros((1, 8))                                        # no direction: θ = π/2
  np.testing.assert_allclose(float(loss(zero, x[:1])), 1.0 + (np.pi / 2) ** 2, rtol=1e-6)
  assert np.isnan(float(loss(x.at[0, 0].set(jnp.nan), x)))


# ------------------------------------------------------------------ MMD


def _np_mmd(x, y, log_bw, pi, a=None, g=None, unbiased=False):
  x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
  a = np.ones(len(x)) if a is None else a.reshape(-1)
  g = np.ones(len(y)) if g is None else g.reshape(-1)
  sig = np.exp(log_bw)

  def k(u, v):
    d = np.sum((u - v) ** 2)
    return sum(p * np.exp(-d / (2 * s * s)) for p, s in zip(pi, sig))

  def within(z, w):
    num = den = 0.0
    for i in range(len(z)):
      for j in range(len(z)):
        if unbiased and i == j:
          continue
        num += w[i] * w[j] * k(z[i], z[j])
        den += w[i] * w[j]
    return num / den

  cross = sum(a[i] * g[j] * k(x[i], y[j]) for i in range(len(x)) for j in range(len(y)))
  return within(x, a) + within(y, g) - 2 * cross / (a.sum() * g.sum())


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_mmd_matches_double_loop(unbiased, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 5, 6))
  y = rng.normal(size=(9, 6)) * 1.5 + 0.3
  log_bw = np.log([0.7, 2.0, 4.0])
  pi = np.array([0.2, 0.5, 0.3])
  xm = (rng.uniform(size=(2, 5)) > 0.3).astype(np.float64)
  expected = _np_mmd(x, y, log_bw, pi, a=xm, unbiased=unbiased)
  with jax.enable_x64(True):
    out = jax.jit(lambda *z: F.mmd(z[0], z[1], z[2], kernel_weights=z[3], x_mask=z[4],
                                   unbiased=unbiased))(
        jnp.asarray(x), jnp.asarray(y), jnp.asarray(log_bw), jnp.asarray(pi), jnp.asarray(xm))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(float(out), expected, rtol=1e-6, atol=1e-9)
  # float32 in float32
  out32 = F.mmd(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                jnp.asarray(log_bw, jnp.float32), kernel_weights=jnp.asarray(pi, jnp.float32),
                x_mask=jnp.asarray(xm, jnp.float32), unbiased=unbiased)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(float(out32), expected, rtol=1e-4, atol=1e-6)


def test_mmd_identical_samples_and_bandwidth_gradient():
  x = jax.random.normal(jax.random.key(1), (32, 8))
  kernel = F.MMDKernel(3, bandwidth="learned", features=8)
  assert abs(float(kernel(x, x))) < 1e-6
  y = x + 1.0
  log_bw = kernel.log_bandwidths[...]
  g = jax.jit(jax.grad(lambda b: F.mmd(x, y, b)))(log_bw)
  assert g.shape == (3,) and np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
  g0 = jax.jit(jax.grad(lambda b: F.mmd(x, x, b)))(log_bw)
  assert np.all(np.isfinite(np.asarray(g0)))
  assert float(F.mmd(x, y, log_bw)) > 1e-3
  # bf16 input: float32 computation, non-negative biased statistic
  out = F.mmd(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), log_bw)
  assert out.dtype == jnp.float32 and float(out) >= 0
  mb = F.median_log_bandwidths(x, y)
  assert mb.shape == (3,) and np.all(np.isfinite(np.asarray(mb)))


def _np_median_log_bw(x, y, scales, w=None):
  z = np.concatenate([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])]).astype(np.float64)
  keep = np.ones(len(z), bool) if w is None else w > 0
  z = z[keep]
  d = np.sum((z[:, None] - z[None]) ** 2, -1)[np.triu_indices(len(z), 1)]
  return np.log(np.asarray(scales) * np.sqrt(0.5 * np.median(d)))


def test_median_log_bandwidths_match_numpy_with_masks_and_subsampling():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 7, 5)).astype(np.float32)
  y = (rng.normal(size=(4, 6, 5)) * 2.0 + 0.5).astype(np.float32)
  xm = (rng.uniform(size=(3, 7)) > 0.3).astype(np.float32)
  scales = (0.5, 1.0, 2.0)
  out = jax.jit(lambda a, b, m: F.median_log_bandwidths(a, b, scales, x_mask=m))(x, y, xm)
  w = np.concatenate([xm.reshape(-1), np.ones(24)])
  # float32 distances of O(10) summed over 5 features: relative error ~1e-6, halved by sqrt
  np.testing.assert_allclose(np.asarray(out), _np_median_log_bw(x, y, scales, w), atol=1e-5)
  sub = F.median_log_bandwidths(x, y, scales, max_samples=10)  # 45 pooled → every 5th
  z = np.concatenate([x.reshape(-1, 5), y.reshape(-1, 5)])[::5]
  np.testing.assert_allclose(np.asarray(sub), _np_median_log_bw(z, z[:0], scales), atol=1e-5)


def test_mmd_kernel_has_no_bandwidth_for_descent_to_collapse():
  """Regression: the kernel's log-bandwidths were an ``nnx.Param``, so descent on the
  distillation objective minimised MMD² over the kernel and collapsed it (300 Adam steps on
  fixed samples took MMD² 0.074 → 0.014). The default kernel now takes them from the median
  heuristic of the samples and holds no parameter: descent leaves MMD² where it is."""
  rng = np.random.default_rng(5)
  s = jnp.asarray(rng.normal(size=(1, 4, 12, 8)), jnp.float32)  # [L, B, T, D]
  t = jnp.asarray(rng.normal(size=(1, 4, 12, 8)) * 1.5 + 0.3, jnp.float32)
  distiller = F.FeatureDistiller({"pre_act": 8}, {"pre_act": 8}, num_student_layers=1,
                                 num_teacher_layers=1, slice_losses={"pre_act": "mmd"},
                                 rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(distiller, nnx.Param, ...)

  def loss(p):
    return nnx.merge(graph, p, rest)({"pre_act": s}, {"pre_act": t})[0]

  tx = optax.adam(1e-2)

  def body(carry, _):
    p, st = carry
    u, st = tx.update(jax.grad(loss)(p), st, p)
    return (optax.apply_updates(p, u), st), None

  (trained, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=100))(
      params)
  before, after = float(jax.jit(loss)(params)), float(jax.jit(loss)(trained))
  assert after == before  # the same program on the same values: bit-identical
  sample_s, sample_t = np.asarray(s[0], np.float64), np.asarray(t[0], np.float64)
  log_bw = _np_median_log_bw(sample_s, sample_t, (0.5, 1.0, 2.0))
  # float32 kernel sums over 96² pairs against float64: 1e-5 relative
  np.testing.assert_allclose(before, _np_mmd(sample_s, sample_t, log_bw, np.full(3, 1 / 3)),
                             rtol=1e-4)
  assert before > 1e-3


# ------------------------------------------------------------------ reconstruction


def test_reconstruction_l1_matches_numpy():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(2, 7, 12)).astype(np.float32)
  t = rng.normal(size=(2, 7, 20)).astype(np.float32)
  m = (rng.uniform(size=(2, 7)) > 0.4).astype(np.float32)
  head = F.ReconstructionHead(12, 20, rngs=nnx.Rngs(0))
  out = jax.jit(lambda r, tt, mm: F.reconstruction_l1(r, tt, mask=mm))(
      head(jnp.asarray(s)), jnp.asarray(t), jnp.asarray(m))
  w = np.asarray(head.linear.kernel[...], np.float64)
  b = np.asarray(head.linear.bias[...], np.float64)
  r = s.astype(np.float64) @ w + b
  expected = np.sum(np.mean(np.abs(r - t), -1) * m) / m.sum()
  np.testing.assert_allclose(float(out), expected, rtol=1e-5)
  assert head(jnp.asarray(s, jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------------------ layers


def test_layer_map_by_hand():
  assert F.layer_map(3, 12, "uniform") == (3, 7, 11)
  assert F.layer_map(4, 6, "uniform") == (1, 2, 4, 5)      # ceil(1.5)-1, 3-1, ceil(4.5)-1, 6-1
  assert F.layer_map(2, 2, "uniform") == (0, 1)
  assert F.layer_map(4, 2, "uniform") == (0, 0, 1, 1)
  assert F.layer_map(3, 12, "last") == (9, 10, 11)
  assert F.layer_map(2, 2, "last") == (0, 1)
  assert F.layer_map(3, 5, "custom", [0, 0, 4]) == (0, 0, 4)


def test_geometric_weights():
  w = np.asarray(F.geometric_layer_weights(5, 0.6))
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[1:] / w[:-1], 0.6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(F.geometric_layer_weights(4, 1.0)), 0.25)


@pytest.mark.parametrize("call, name", [
    (lambda: F.layer_map(2, 4, "skip"), "strategy"),
    (lambda: F.layer_map(4, 2, "last"), "strategy"),
    (lambda: F.layer_map(2, 4, "custom", [0]), "custom"),
    (lambda: F.layer_map(2, 4, "custom", [0, 4]), "custom"),
    (lambda: F.layer_map(0, 4), "num_student_layers"),
    (lambda: F.geometric_layer_weights(3, 0.0), "ratio"),
    (lambda: F.cosine_angular_loss(jnp.ones((2, 3)), jnp.ones((2, 4))), "student"),
    (lambda: F.cosine_angular_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), mask=jnp.ones(3)),
     "mask"),
    (lambda: F.cosine_angular_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), margin=4.0), "margin"),
    (lambda: F.mmd(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.zeros(2)), "x"),
    (lambda: F.mmd(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 2))), "log_bandwidths"),
    (lambda: F.mmd(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros(2),
                   kernel_weights=jnp.ones(3)), "kernel_weights"),
    (lambda: F.reconstruction_l1(jnp.ones((2, 3)), jnp.ones((2, 4))), "reconstruction"),
    (lambda: F.attention_from_qkv(jnp.ones((2, 4, 12)), 3), "num_heads"),
    (lambda: F.MMDKernel(0), "num_kernels"),
    (lambda: F.MMDKernel(2, bandwidth="fixed"), "bandwidth"),
    (lambda: F.median_log_bandwidths(jnp.ones((2, 3)), jnp.ones((2, 3)), max_samples=1),
     "max_samples"),
])
def test_bad_arguments_name_themselves(call, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    call()


# ------------------------------------------------------------------ intermediates from the GPT


@pytest.fixture(scope="module")
def gpts(random_gpt):
  """(teacher, student): 3 blocks of width 24 / 4 heads and 2 blocks of width 16 / 2 heads."""
  return random_gpt(3, 24, 4, 0), random_gpt(2, 16, 2, 1)


def test_intermediates_match_manual_recomputation(gpts):
  model = gpts[0]
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 37)
  slices = F.SLICES + ("attn_norm", "qkv")
  graph, params = nnx.split(model, nnx.Param)

  @jax.jit
  def collect_and_recompute(params, tokens):
    m = nnx.merge(graph, params)
    logits, feats = F.collect_intermediates(m, tokens, slices=slices)
    plain = nnx.merge(graph, params)(tokens)
    refs = {name: [] for name in slices}
    maps = []
    x = m.embed(tokens) + m.pos[...][:10]
    for block in m.blocks:
      a_in = block.ln1(x)
      attn = block.attn(a_in)
      n = block.ln2(x + attn)
      pre = block.fc(n)
      out = x + attn + block.fc_out(jax.nn.gelu(pre))
      for name, ref in (("attn_norm", a_in), ("attn_out", attn), ("norm_out", n),
                        ("pre_act", pre), ("block_out", out), ("qkv", block.attn.qkv(a_in))):
        refs[name].append(ref)
      x = out
    for i, block in enumerate(m.blocks):
      # attention maps recomputed from the collected QKV reproduce the attention output
      weights = F.attention_from_qkv(feats["qkv"][i], 4)
      v = jnp.split(feats["qkv"][i], 3, -1)[2].reshape(2, 10, 4, 6)
      mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 10, 24)
      maps.append((weights, block.attn.proj(mixed)))
    return logits, plain, feats, refs, maps

  logits, plain, feats, refs, maps = collect_and_recompute(params, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-6, atol=1e-7)
  for name in slices:
    assert feats[name].shape[0] == 3
    for i in range(3):
      np.testing.assert_allclose(np.asarray(feats[name][i]), np.asarray(refs[name][i]),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{name} of block {i}")
  for i, (weights, attn_out) in enumerate(maps):
    np.testing.assert_allclose(np.asarray(attn_out), np.asarray(feats["attn_out"][i]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0
  # eager collection on the module itself leaves the model and its classes as they were
  _, eager = F.collect_intermediates(model, tokens, slices=("block_out",))
  np.testing.assert_allclose(np.asarray(eager["block_out"]), np.asarray(feats["block_out"]),
                             rtol=1e-5, atol=1e-6)
  assert not hasattr(model, "__captures__")
  assert not hasattr(type(model.blocks[0]).__call__, "_does_capturing")


def test_feature_distiller_jit_and_gradients(gpts):
  teacher, student = gpts
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 37)
  mask = jnp.ones((2, 8)).at[1, 6:].set(0)
  dims = lambda w: {"attn_out": w, "norm_out": w, "pre_act": 4 * w, "block_out": w}
  distiller = F.FeatureDistiller(dims(16), dims(24), num_student_layers=2,
                                 num_teacher_layers=3, ratio=0.5, rngs=nnx.Rngs(3))
  assert distiller.layer_map == (1, 2)
  t_graph, t_params = nnx.split(teacher, nnx.Param)
  s_graph, s_params = nnx.split(student, nnx.Param)
  d_graph, d_params, d_rest = nnx.split(distiller, nnx.Param, ...)

  def loss_fn(s_params, d_params, t_params, tokens, mask):
    _, ft = F.collect_intermediates(nnx.merge(t_graph, t_params), tokens)
    _, fs = F.collect_intermediates(nnx.merge(s_graph, s_params), tokens)
    loss, per_layer = nnx.merge(d_graph, d_params, d_rest)(fs, jax.lax.stop_gradient(ft),
                                                           mask=mask)
    return loss, per_layer

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, per_layer), grads = step(s_params, d_params, t_params, tokens, mask)
  expected = sum(float(np.sum(np.array([2, 1]) / 3 * np.asarray(v))) for v in per_layer.values())
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  # The MMD kernel's bandwidths come from the data: nothing of it is in the trained params.
  assert "pre_act" in distiller.kernels and "kernels" not in grads[1]
  # a second call with new values does not recompile
  step(s_params, d_params, t_params, tokens + 1, mask)
  assert step._cache_size() == 1


def test_feature_distiller_bad_arguments(gpts):
  dims = {"attn_out": 8}
  with pytest.raises(ValueError, match="`slice_losses"):
    F.FeatureDistiller(dims, dims, num_student_layers=1, num_teacher_layers=1,
                       slice_losses={"attn_out": "l2"}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`teacher_dims`"):
    F.FeatureDistiller(dims, {}, num_student_layers=1, num_teacher_layers=1,
                       slice_losses={"attn_out": "cosine"}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`slices`"):
    F.collect_intermediates(gpts[1], jnp.zeros((1, 4), jnp.int32), slices=("ffn",))
  with pytest.raises(ValueError, match="`blocks`"):
    F.collect_intermediates(gpts[1], jnp.zeros((1, 4), jnp.int32), blocks="layers")
