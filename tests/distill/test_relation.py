"""MiniLM v2 relation distillation against a float64 NumPy implementation.

Reference: for each relation pair (X, Y) and relation head a, R_a = softmax(X_a Y_aᵀ/√d_r) with
d_r = D/A_r per model, and the loss is the mean over heads and query rows of
KL(R^T ‖ R^S), summed over pairs (Wang et al. 2021, eq. 3–5), written with explicit loops.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill import _features as F
from distill import _relation as R


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_relation_loss(student, teacher, heads, relations, mask=None, causal=False):
  total = 0.0
  b, t, _ = student["q"].shape
  mask = np.ones((b, t)) if mask is None else mask
  for rel in relations:
    kls, rows = 0.0, 0.0
    for n in range(b):
      for a in range(heads):
        probs = []
        for feats in (teacher, student):
          x, y = feats[rel[0]][n], feats[rel[1]][n]
          dr = x.shape[-1] // heads
          xa, ya = x[:, a * dr:(a + 1) * dr], y[:, a * dr:(a + 1) * dr]
          logits = xa @ ya.T / np.sqrt(dr)
          keep = (mask[n][None, :] > 0) & (np.tril(np.ones((t, t))) > 0 if causal else True)
          logits = np.where(keep, logits, -np.inf)
          probs.append(_np_softmax(logits))
        pt, ps = probs
        for i in range(t):
          if mask[n, i] == 0:
            continue
          nz = pt[i] > 0
          kls += np.sum(pt[i][nz] * (np.log(pt[i][nz]) - np.log(ps[i][nz])))
          rows += 1
    total += kls / rows
  return total


def _feats(rng, b, t, d, scale=1.0):
  return {n: rng.normal(size=(b, t, d)) * scale for n in "qkv"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("widths", [(16, 16), (12, 24)])
def test_relation_loss_matches_numpy(dtype, causal, widths):
  rng = np.random.default_rng(sum(widths) + causal)
  student, teacher = _feats(rng, 2, 6, widths[0]), _feats(rng, 2, 6, widths[1], 1.5)
  mask = np.ones((2, 6))
  mask[1, 4:] = 0
  relations = ("qq", "kk", "vv", "qk")
  expected = _np_relation_loss(student, teacher, 4, relations, mask, causal)
  ctx = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
  with ctx:
    cast = lambda f: {n: jnp.asarray(v, dtype) for n, v in f.items()}
    fn = jax.jit(lambda s, t, m: R.minilm_relation_loss(s, t, num_relation_heads=4,
                                                        relations=relations, mask=m,
                                                        causal=causal))
    out = fn(cast(student), cast(teacher), jnp.asarray(mask, dtype))
  assert out.dtype == dtype
  np.testing.assert_allclose(float(out), expected, rtol=1e-10 if dtype == "float64" else 2e-5)


def test_zero_when_teacher_equals_student_and_gradient_finite():
  rng = np.random.default_rng(0)
  x = {n: jnp.asarray(v, jnp.float32) for n, v in _feats(rng, 2, 8, 16).items()}
  loss = jax.jit(lambda s, t: R.minilm_relation_loss(s, t, num_relation_heads=2))
  assert abs(float(loss(x, x))) < 1e-6
  g = jax.jit(jax.grad(lambda s: R.minilm_relation_loss(s, x, num_relation_heads=2,
                                                        causal=True)))(x)
  for leaf in jax.tree.leaves(g):
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert float(loss({n: v * 2 for n, v in x.items()}, x)) > 1e-3


def test_invariant_to_width_under_head_isometry():
  # Embed each relation head of a width-8 student into a width-20 teacher head by an
  # isometry scaled by (d_t/d_s)^(1/4): X_t Y_tᵀ/√d_t = X_s Y_sᵀ/√d_s, so the loss is 0.
  rng = np.random.default_rng(1)
  heads, ds, dt = 2, 4, 10
  student = _feats(rng, 2, 5, heads * ds)
  iso, _ = np.linalg.qr(rng.normal(size=(dt, ds)))        # [dt, ds], orthonormal columns
  scale = (dt / ds) ** 0.25
  teacher = {}
  for n, v in student.items():
    parts = [v[..., a * ds:(a + 1) * ds] @ iso.T * scale for a in range(heads)]
    teacher[n] = np.concatenate(parts, -1)
  cast = lambda f: {n: jnp.asarray(v, jnp.float32) for n, v in f.items()}
  out = R.minilm_relation_loss(cast(student), cast(teacher), num_relation_heads=heads)
  assert abs(float(out)) < 1e-5
  # without the scale the temperatures differ and the loss is positive
  unscaled = {n: v / scale for n, v in teacher.items()}
  assert float(R.minilm_relation_loss(cast(student), cast(unscaled),
                                      num_relation_heads=heads)) > 1e-4


def test_bf16_inputs_compute_in_float32():
  rng = np.random.default_rng(2)
  s = {n: jnp.asarray(v, jnp.bfloat16) for n, v in _feats(rng, 1, 6, 8).items()}
  t = {n: jnp.asarray(v, jnp.bfloat16) for n, v in _feats(rng, 1, 6, 16).items()}
  out = R.minilm_relation_loss(s, t, num_relation_heads=2)
  assert out.dtype == jnp.float32 and float(out) >= 0


def test_relations_from_real_gpts_of_different_widths(random_gpt):
  teacher = random_gpt(2, 24, 4, 0, vocab=29, context=8)
  student = random_gpt(1, 12, 2, 1, vocab=29, context=8)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 29)
  t_graph, t_params = nnx.split(teacher, nnx.Param)
  s_graph, s_params = nnx.split(student, nnx.Param)

  @jax.jit
  def loss(s_params, tokens):
    _, ft = F.collect_intermediates(nnx.merge(t_graph, t_params), tokens, slices=("qkv",))
    _, fs = F.collect_intermediates(nnx.merge(s_graph, s_params), tokens, slices=("qkv",))
    return R.minilm_relation_loss(R.split_qkv(fs["qkv"][-1]), R.split_qkv(ft["qkv"][-1]),
                                  num_relation_heads=3, causal=True)

  value, grads = jax.value_and_grad(loss)(s_params, tokens)
  assert np.isfinite(float(value)) and float(value) > 0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_relation_heads=0), "num_relation_heads"),
    (dict(num_relation_heads=3), "num_relation_heads"),      # 3 does not divide 8
    (dict(num_relation_heads=2, relations=("qq", "ab")), "relations"),
    (dict(num_relation_heads=2, relations="qq"), "relations"),
])
def test_bad_arguments_name_themselves(kwargs, name):
  x = {n: jnp.ones((1, 4, 8)) for n in "qkv"}
  with pytest.raises(ValueError, match=f"`{name}`"):
    R.minilm_relation_loss(x, x, **kwargs)


def test_missing_or_misshaped_features_are_named():
  x = {n: jnp.ones((1, 4, 8)) for n in "qkv"}
  with pytest.raises(ValueError, match="`teacher`"):
    R.minilm_relation_loss(x, {"q": x["q"], "k": x["k"]}, num_relation_heads=2)
  with pytest.raises(ValueError, match="`student"):
    R.minilm_relation_loss({n: jnp.ones((4, 8)) for n in "qkv"}, x, num_relation_heads=2)
  with pytest.raises(ValueError, match="`qkv`"):
    R.split_qkv(jnp.ones((2, 4, 8)))
