"""Our Lanczos (``curvature.hessian_eigenvalues``) against matfree's at equal accuracy.

    pip install matfree                             # or: pip install -e ".[bench]"
    python benchmarks/lanczos_bench.py              # 1.5 min, idle 2 cores (Hessian cached)
    python benchmarks/lanczos_bench.py --quick      # one compile and 5 timings per program

Model: a tanh MLP 64-40-36-44-10 (6,154 parameters), MSE on scikit-learn's digits (all 1,797
images as one batch). Two checkpoints: "separated", at initialisation (relative gaps between
the top five eigenvalues 7-13 %), and "clustered", after 1,000 steps of full-batch gradient
descent at η = 0.1, at the edge of stability (λ1 ≈ 2/η = 20; λ1 and λ2 0.9 % apart). The
reference is ``eigh`` of the dense float64 Hessian (6,154 HVPs), cached in the temp directory.

For each checkpoint, k ∈ {1, 5} and dtype ∈ {float32, float64}:

* ours: ``hessian_eigenvalues(loss, params, k=k)`` with its defaults (it checks the residuals
  after every step and stops at the first basis whose residuals meet ``tol``); its error is
  max_i |θ_i − λ_i| / |λ_i|. On one device the parameters are ravelled into one vector.
* matfree 0.6: ``eig.eigh_partial(decomp.tridiag_sym(m, reortho="full"))``, the same HVP and
  the same start vector, at m* = the smallest basis whose error is ≤ ours, or ≤ 10 eps when
  ours is below that (equal accuracy; ``*`` marks m* chosen by 10 eps or by matfree's own
  floor). m* is read off one long
  matfree run (the leading m × m block of its tridiagonal is what ``tridiag_sym(m)`` returns)
  and then run as its own program. It is the most favourable fixed size for matfree, one a
  user without the dense Hessian could not pick.
* floors: ours with ``tol=0, max_restarts=0`` (the whole default basis) and matfree's smallest
  error over m ≤ 60.

Times are the fastest of interleaved warm calls (ours, matfree, ours, ...), compile time is
lowering plus XLA compilation, the fastest of the repeats: on a shared machine the minimum is
the program's own cost. The ratios are ours / matfree. An HVP is nearly the whole cost of a
step on both sides, so the time ratio follows the HVP ratio (ours / m*), which does not
depend on the machine's load. In float32 the residual test (``tol`` = 1e-4, which certifies a
relative error of 1e-4) passes 0-2 steps after the Ritz values reach float32's round-off,
where m* stops (its target is 10 eps there, rows marked ``*``): that is the price of the
certificate, which matfree's fixed basis does not give.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import scipy.linalg  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top

import curvature  # pylint: disable=g-import-not-at-top,wrong-import-position
from curvature import _lanczos  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = (64, 40, 36, 44, 10)
MATFREE_MAX = 60


def loss_fn(params, x, y):
  h = x
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, -1))


def checkpoints():
  """``{name: float32 params}`` and the float32 data: initialisation and 1,000 GD steps."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, labels = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jax.nn.one_hot(jnp.asarray(labels), 10, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  params = [{"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
             "b": jnp.zeros(b, jnp.float32)} for a, b in zip(SIZES[:-1], SIZES[1:])]
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p,
                                        jax.grad(loss_fn)(p, x, y)))
  trained = jax.lax.fori_loop(0, 1000, lambda _, p: step(p), params)
  return {"separated": params, "clustered": trained}, (x, y)


def dense_top(params32, data32, k: int = 5) -> np.ndarray:
  """Top-``k`` eigenvalues of the float64 Hessian at the float32 checkpoint (cached)."""
  p64, (x, y) = _cast((params32, data32), jnp.float64)
  flat, unravel = ravel_pytree(p64)
  digest = hashlib.sha1(np.asarray(flat).tobytes()).hexdigest()[:16]
  path = os.path.join(tempfile.gettempdir(), f"losslab_lanczos_bench_{digest}.npy")
  if os.path.exists(path):
    return np.load(path)[:k]
  grad = jax.grad(lambda f: loss_fn(unravel(f), x, y))
  columns = jax.jit(lambda f, vs: jax.vmap(lambda v: jax.jvp(grad, (f,), (v,))[1])(vs))
  n = flat.size
  eye = np.eye(n)
  hess = np.concatenate([np.asarray(columns(flat, eye[i:i + 256])) for i in range(0, n, 256)])
  hess = 0.5 * (hess + hess.T)
  top = scipy.linalg.eigh(hess, eigvals_only=True, subset_by_index=[n - 10, n - 1])[::-1]
  np.save(path, top)
  return top[:k]


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


def _rel_err(got, want) -> float:
  got = np.asarray(got, np.float64)
  return float(np.max(np.abs(got - want[:got.size]) / np.abs(want[:got.size])))


def _compile(fn, args, repeats: int):
  best, compiled = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()   # a fresh trace each time
    best = min(best, time.perf_counter() - t0)
  return compiled, best


def _interleaved(calls, repeats: int) -> list[float]:
  """Fastest of ``repeats`` interleaved warm calls of each: on a shared, loaded machine the
  minimum is the time the program needs, the median mostly the neighbours' load."""
  for fn, args in calls:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for t, (fn, args) in zip(times, calls):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      t.append(time.perf_counter() - t0)
  return [float(np.min(t)) for t in times]


def ours_fn(k: int, **kwargs):
  def run(params, x, y):
    out = curvature.hessian_eigenvalues(lambda p: loss_fn(p, x, y), params, k=k, **kwargs)
    return out.eigenvalues, out.num_iters, out.converged
  return run


def matfree_fn(m: int, k: int):
  from matfree import decomp, eig  # pylint: disable=g-import-not-at-top
  alg = eig.eigh_partial(decomp.tridiag_sym(m, reortho="full"))

  def run(params, x, y, v0):
    vals, _ = alg(lambda v: curvature.hvp(lambda p: loss_fn(p, x, y), params, v), v0)
    return vals[::-1][:k]                    # eigh: ascending
  return run


def matfree_errors(params, data, v0, ref, k: int) -> np.ndarray:
  """matfree's top-k error for every basis m = k .. MATFREE_MAX, from one long run."""
  from matfree import decomp  # pylint: disable=g-import-not-at-top
  m_max = min(MATFREE_MAX, ravel_pytree(params)[0].size)

  @jax.jit
  def tridiag(params, x, y, v0):
    av = lambda v: curvature.hvp(lambda p: loss_fn(p, x, y), params, v)
    return decomp.tridiag_sym(m_max, reortho="full")(av, v0).J_small

  t = np.asarray(tridiag(params, *data, v0), np.float64)
  errs = np.full(m_max + 1, np.inf)
  for m in range(k, m_max + 1):
    errs[m] = _rel_err(np.linalg.eigvalsh(t[:m, :m])[::-1][:k], ref)
  return errs


def compare(name, params32, data32, ref, k, dtype, args):
  """One row: ours at its defaults vs matfree at equal accuracy, plus both floors."""
  params, data = _cast((params32, data32), dtype)
  # matfree gets our default start vector (a hash of PRNGKey(0)), in the parameters' dtype.
  key_seed = _lanczos._key_seed(jax.random.PRNGKey(0))  # pylint: disable=protected-access
  v0 = _lanczos._hash_vector(params, key_seed)  # pylint: disable=protected-access
  v0 = jax.tree.map(lambda a, p: a.astype(p.dtype), v0, params)
  ours, c_ours = _compile(ours_fn(k), (params, *data), args.compile_repeats)
  vals, hvps, converged = ours(params, *data)
  err = _rel_err(vals, ref)
  errs = matfree_errors(params, data, v0, ref, k)
  floor_mf = float(np.min(errs))
  # Errors below 10 eps are round-off (float32 runs scatter between 2e-8 and 5e-7 from one
  # program to the next): equal accuracy there is reaching 10 eps, not a lucky digit.
  target = max(err, floor_mf, 10 * float(jnp.finfo(dtype).eps))
  m_star = int(np.argmax(errs <= target))
  mf, c_mf = _compile(matfree_fn(m_star, k), (params, *data, v0), args.compile_repeats)
  err_mf = _rel_err(mf(params, *data, v0), ref)
  t_ours, t_mf = _interleaved([(ours, (params, *data)), (mf, (params, *data, v0))],
                              args.repeats)
  floor_ours = _rel_err(jax.jit(ours_fn(k, tol=0.0, max_restarts=0))(params, *data)[0], ref)
  return dict(checkpoint=name, dtype=jnp.dtype(dtype).name, k=k, hvps=int(hvps),
              converged=bool(converged), err=err, m_star=m_star,
              m_star_note="" if target == err else "*", err_mf=err_mf, t_ours=t_ours,
              t_mf=t_mf, c_ours=c_ours, c_mf=c_mf, floor_ours=floor_ours, floor_mf=floor_mf)


def print_table(rows):
  print("\n| checkpoint | dtype | k | ours: HVPs, error | matfree: m*, error | HVP ratio | "
        "ours ms | matfree ms | time ratio | ours compile s | matfree compile s | "
        "compile ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['checkpoint']} | {r['dtype']} | {r['k']} | {r['hvps']}"
          f"{'' if r['converged'] else ' (not converged)'}, {r['err']:.1e} | "
          f"{r['m_star']}{r['m_star_note']}, {r['err_mf']:.1e} | {r['hvps'] / r['m_star']:.2f}x | "
          f"{r['t_ours'] * 1e3:.1f} | "
          f"{r['t_mf'] * 1e3:.1f} | {r['t_ours'] / r['t_mf']:.2f}x | {r['c_ours']:.2f} | "
          f"{r['c_mf']:.2f} | {r['c_ours'] / r['c_mf']:.2f}x |")
  print("\n| checkpoint | dtype | k | ours floor (tol=0, whole default basis) | matfree floor "
        f"(best m <= {MATFREE_MAX}) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['checkpoint']} | {r['dtype']} | {r['k']} | {r['floor_ours']:.1e} | "
          f"{r['floor_mf']:.1e} |")
  time_ratios = np.array([r["t_ours"] / r["t_mf"] for r in rows])
  compile_ratios = np.array([r["c_ours"] / r["c_mf"] for r in rows])
  hvp_ratios = np.array([r["hvps"] / r["m_star"] for r in rows])
  print(f"\nHVP ratio ours/m*: median {np.median(hvp_ratios):.2f}x, range "
        f"{hvp_ratios.min():.2f}-{hvp_ratios.max():.2f}x")
  print(f"time ratio ours/matfree at equal accuracy: median {np.median(time_ratios):.2f}x, "
        f"range {time_ratios.min():.2f}-{time_ratios.max():.2f}x  [target <= 1.0x]")
  print(f"compile ratio ours/matfree: median {np.median(compile_ratios):.2f}x, range "
        f"{compile_ratios.min():.2f}-{compile_ratios.max():.2f}x  [target <= 2.0x]")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 compile, 5 timings per program")
  args = parser.parse_args()
  args.repeats, args.compile_repeats = (5, 1) if args.quick else (15, 2)
  try:
    import matfree  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise SystemExit("matfree is not installed: pip install matfree (or .[bench])") from None
  ckpts, data = checkpoints()
  print(f"parameters: {ravel_pytree(ckpts['separated'])[0].size:,}; {jax.devices()[0].platform}, "
        f"jax {jax.__version__}")
  rows = []
  for name, params in ckpts.items():
    ref = dense_top(params, data, 5)
    print(f"{name}: dense top-5 {np.round(ref, 4)}, relative gaps "
          f"{np.round(-np.diff(ref) / ref[0], 4)}", flush=True)
    for dtype in (jnp.float32, jnp.float64):
      for k in (1, 5):
        rows.append(compare(name, params, data, ref, k, dtype, args))
        r = rows[-1]
        print(f"  {r['dtype']} k={k}: ours {r['hvps']} HVPs err {r['err']:.1e}; matfree m*="
              f"{r['m_star']}{r['m_star_note']} err {r['err_mf']:.1e}; time "
              f"{r['t_ours'] / r['t_mf']:.2f}x, compile {r['c_ours'] / r['c_mf']:.2f}x",
              flush=True)
  print_table(rows)


if __name__ == "__main__":
  main()
