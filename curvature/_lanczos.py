"""Lanczos with full reorthogonalisation on pytrees, and the top Hessian eigenvalues.

With several devices the Krylov basis is a pytree shaped like the parameters whose leaves
carry a leading axis ``[m, *leaf_shape]``; nothing is ravelled, so the iteration runs
unchanged on sharded parameters; the start vector is tied to the parameters' sharding
(:func:`shard_like`), so each basis leaf is laid out like its parameter leaf instead of being
gathered. With one device, where nothing can be sharded, the parameters are ravelled into
one vector and the basis is one ``[m, P]`` array (:func:`_can_ravel`): one kernel per basis
operation instead of one per leaf. Both paths run the same code on the same start vector.
The basis and the projected matrix are kept in float32, or float64 when the parameters are
float64 (``_tree.accum_dtype``), whatever the parameter dtype.

Every step orthogonalises against the whole basis twice (CGS2) and records all the
coefficients, so the projected matrix ``Q A Q^T`` is built densely; it is tridiagonal up to
round-off for plain Lanczos, and arrow-plus-tridiagonal after a thick restart (Wu & Simon
2000), with no special cases in the code. :func:`top_eigenpairs` runs one step per iteration
of a ``lax.while_loop`` and stops at the first basis size whose Ritz residuals meet ``tol``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax.experimental.shard_alike import shard_alike
import jax.numpy as jnp
from jax import lax
import optax

from curvature import _hvp
from curvature import _tree

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

_HIGHEST = lax.Precision.HIGHEST


class LanczosDecomposition(NamedTuple):
  """``A Q^T = Q^T T + beta_m q_m e_m^T`` after ``m`` steps from a single start vector.

  Attributes:
    basis: pytree with leaves ``[m, *leaf_shape]``; row ``j`` is the Lanczos vector
      :math:`q_j` (orthonormal rows).
    alphas: ``[m]`` diagonal of the tridiagonal :math:`T`.
    betas: ``[m]``; ``betas[:-1]`` are :math:`T`'s off-diagonal entries and ``betas[-1]`` is
      :math:`\\beta_m`, the norm of the residual after the last step (0 when the Krylov
      space became invariant).
  """
  basis: PyTree
  alphas: jax.Array
  betas: jax.Array


class HessianEigenvalues(NamedTuple):
  """Top eigenpairs of a symmetric operator from (thick-restarted) Lanczos.

  Attributes:
    eigenvalues: ``[k]``, largest first (Ritz values).
    eigenvectors: pytree whose leaves are ``[k, *leaf_shape]`` (unit Ritz vectors, in the
      Krylov dtype: float32 or wider), or ``None`` when not requested.
    residuals: ``[k]`` relative Ritz residuals
      :math:`\\|A y_i - \\theta_i y_i\\| / \\max_j |\\theta_j|`. An exact eigenvalue lies
      within ``residuals[i] * max|theta|`` of ``eigenvalues[i]`` (usually much closer: about
      the square of that over the gap to the next eigenvalue).
    num_iters: matrix-vector products spent (a traced int): the basis size at which the
      residuals first met ``tol``, plus the steps of any restarts. This is the cost.
    converged: whether every residual is ``<= tol``. False means the answer is not to be
      trusted at that tolerance: raise ``num_iters`` (the basis size) or ``max_restarts``.
  """
  eigenvalues: jax.Array
  eigenvectors: Optional[PyTree]
  residuals: jax.Array
  num_iters: jax.Array
  converged: jax.Array


# ----------------------------------------------------------------------------------------
# Basis algebra: leaves of the basis are [m, *s], leaves of a vector are [*s].


def _basis_dot(basis: PyTree, v: PyTree) -> jax.Array:
  """``Q v``: the ``[m]`` inner products of every basis row with ``v``."""
  parts = [jnp.tensordot(q, x, axes=x.ndim, precision=_HIGHEST)
           for q, x in zip(jax.tree.leaves(basis), jax.tree.leaves(v))]
  return sum(parts[1:], parts[0])


def _basis_combine(coeffs: jax.Array, basis: PyTree) -> PyTree:
  """``coeffs @ Q``: for ``coeffs`` of shape ``[m]`` a vector, of shape ``[r, m]`` a stack."""
  return jax.tree.map(lambda q: jnp.tensordot(coeffs, q, axes=1, precision=_HIGHEST), basis)


def _orthogonalise(basis: PyTree, w: PyTree) -> tuple[PyTree, jax.Array]:
  """Classical Gram-Schmidt against every basis row, twice ("twice is enough").

  Unfilled rows are zero and contribute nothing. Returns the projected vector and the sum
  of the coefficients of both passes (``Q w`` for the input ``w``, to round-off). The pass
  is the body of a two-trip loop: traced and compiled once, per leaf two products.
  """
  def one_pass(_, carry):
    w, total = carry
    c = _basis_dot(basis, w)
    return optax.tree.sub(w, _basis_combine(c, basis)), total + c

  zeros = jnp.zeros(jax.tree.leaves(basis)[0].shape[:1], _tree.accum_dtype(basis))
  return lax.fori_loop(0, 2, one_pass, (w, zeros))


def _set_row(basis: PyTree, j, v: PyTree) -> PyTree:
  # mode="drop": writing row m (after the last step) is a no-op.
  return jax.tree.map(lambda q, x: q.at[j].set(x.astype(q.dtype), mode="drop"), basis, v)


def _get_row(basis: PyTree, j) -> PyTree:
  return jax.tree.map(lambda q: lax.dynamic_index_in_dim(q, j, keepdims=False), basis)


def cast_like(v: PyTree, like: PyTree) -> PyTree:
  """``v`` with each leaf cast to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), v, like)


def shard_like(v: PyTree, like: PyTree) -> PyTree:
  """``v`` laid out like ``like``, leaf by leaf, under whatever sharding ``like`` gets.

  Inside ``jit`` the parameters' sharding is invisible to Python (a tracer's spec is empty
  in the default "auto" mode), so no sharding can be passed to
  ``with_sharding_constraint``. ``shard_alike`` instead puts each leaf of ``v`` in one
  sharding group with the matching leaf of ``like``: XLA's propagation then gives both the
  same layout, whatever the caller's mesh (nothing on one device). A random start vector
  has no sharding of its own; without this tie the propagation replicated most of the
  Krylov basis ``[m, *leaf_shape]`` on every device (tests/sharding/check_probes.py checks
  the compiled buffers and the per-device memory). :func:`top_eigenpairs` ties its start
  vector to ``like``; :func:`lanczos_tridiag` starts from the caller's ``v0``, which the
  caller ties (as ``spectral_density`` does). Leaves must have equal shapes; dtypes may
  differ.
  """
  return jax.tree.map(lambda x, p: shard_alike(x, p)[0], v, like)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = (h ^ (h >> shift)) * jnp.uint32(mult)
  return h ^ (h >> 16)


def _hash_vector(like: PyTree, seed: jax.Array) -> PyTree:
  """A pseudo-random vector shaped like ``like``: entries in ``[-1/2, 1/2)`` hashed from
  (``seed``, the global index of each scalar), in ``like``'s accumulation dtype.

  A Lanczos start or restart vector only has to be generic with respect to the operator.
  Integer hashing compiles to a few elementwise ops per leaf, where ``jax.random``'s
  threefry sampler is compiled once per distinct leaf shape: on a 6-leaf MLP it was 40 %
  of the whole compile time of :func:`top_eigenpairs` (CPU), and a PRNG per leaf inside
  the loop body doubled it. Being elementwise in the index, it needs no communication
  on sharded leaves.
  """
  dtype = _tree.accum_dtype(like)
  s = _fmix32(jnp.asarray(seed).astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(1))
  leaves, treedef = jax.tree.flatten(like)
  out, offset = [], 0
  for x in leaves:
    n = lax.iota(jnp.uint32, x.size) + jnp.uint32(offset % 2**32)
    h = _fmix32(_fmix32(n ^ s) + s)
    out.append(((h >> 8).astype(dtype) * 2.0**-24 - 0.5).reshape(x.shape))
    offset += x.size
  return jax.tree.unflatten(treedef, out)


def _key_seed(key: jax.Array) -> jax.Array:
  """The words of a PRNG key (raw ``uint32[2]`` or typed) folded into one ``uint32``."""
  words = jnp.ravel(jax.random.key_data(key)).astype(jnp.uint32)
  seed = jnp.uint32(0)
  for i in range(words.shape[0]):
    seed = _fmix32(seed ^ words[i])
  return seed


def _can_ravel(like: PyTree) -> bool:
  """Whether the Krylov basis may be one ``[m, P]`` array instead of a pytree of leaves.

  With one device in the process nothing can be sharded, so ravelling the parameters into
  one vector gathers nothing, and every basis operation (the CGS2 products, row reads and
  writes, the start vector) becomes one kernel instead of one per leaf: fewer kernels per
  step and a program that compiles in a fraction of the time. With several devices the
  parameters' layout is invisible inside ``jit`` (a tracer carries no sharding in the
  default mode), so the basis stays a pytree laid out like them (:func:`shard_like`).
  """
  del like  # The decision depends on the process, not on the values.
  return jax.device_count() == 1


def _raveller(like: PyTree, dtype) -> tuple[Callable[[PyTree], jax.Array],
                                            Callable[[jax.Array], PyTree]]:
  """``(flatten, unflatten)`` between pytrees shaped like ``like`` and ``[P]`` vectors.

  Both use ``dtype`` (the basis dtype): ``flatten`` casts every leaf to it, ``unflatten``
  returns leaves in it, so a ``matvec`` sees the same dtype on either path. Leaves are
  concatenated in ``jax.tree.leaves`` order, the order :func:`_hash_vector` numbers the
  scalars in, so both paths start from the same vector.
  """
  leaves, treedef = jax.tree.flatten(like)
  shapes = [jnp.shape(x) for x in leaves]
  sizes = [math.prod(s) for s in shapes]

  def flatten(tree: PyTree) -> jax.Array:
    if jax.tree.structure(tree) != treedef:
      raise ValueError(f"`matvec` must return a pytree structured like the parameters "
                       f"{treedef}, got {jax.tree.structure(tree)}")
    parts = [jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(tree)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def unflatten(v: jax.Array) -> PyTree:
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
      out.append(lax.slice_in_dim(v, offset, offset + size).reshape(shape))
      offset += size
    return jax.tree.unflatten(treedef, out)

  return flatten, unflatten


def _normalise(v: PyTree, norm) -> PyTree:
  return optax.tree.scale(jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0), v)


class _Krylov(NamedTuple):
  """A Lanczos basis being built: rows ``0 .. j`` orthonormal (row ``j`` is the next to
  expand unless ``pending``), rows past ``j`` zero, so products with the whole basis need
  no mask. The last remainder is not kept past a full basis (it would be one more
  parameter-sized buffer in the loop state): see ``restart`` in :func:`_lanczos_loop`."""
  basis: PyTree           # [m, *leaf_shape] leaves
  proj: jax.Array         # [m, m] Q A Q^T, leading j x j block filled
  beta: jax.Array         # norm of the last remainder (0 after a breakdown)
  j: jax.Array            # steps taken in this basis
  matvecs: jax.Array      # matvecs in all (steps, and iterations after a breakdown)
  pending: jax.Array      # the last step broke down: row j still needs a fresh direction
  broke: jax.Array        # some step broke down


def _start(v0: PyTree, m: int) -> _Krylov:
  dtype = _tree.accum_dtype(v0)
  v0 = optax.tree.cast(v0, dtype)
  q = _normalise(v0, _tree.tree_norm(v0))
  basis = _set_row(jax.tree.map(lambda x: jnp.zeros((m,) + x.shape, dtype), v0), 0, q)
  zero, false = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
  return _Krylov(basis, jnp.zeros((m, m), dtype), jnp.zeros((), dtype), zero, zero, false,
                 false)


def _advance(matvec: MatVec, kr: _Krylov) -> tuple[_Krylov, jax.Array]:
  """One Lanczos step on row ``j``, or, after a breakdown, a fresh direction for row ``j``.

  A step computes ``A q_j``, orthogonalises it against the whole basis (CGS2), writes the
  coefficients into row and column ``j`` of ``proj`` and the normalised remainder into row
  ``j + 1`` (dropped when ``j + 1 = m``). Breakdown (nothing of ``A q_j`` left beyond
  round-off: an invariant subspace) sets the coupling to 0 and leaves row ``j + 1`` to the
  next call, which orthogonalises a :func:`_hash_vector` instead (its matvec is discarded):
  ``proj`` splits into blocks whose eigenvalues are all eigenvalues of ``A``, which is also
  how repeated eigenvalues get their multiplicity. Both kinds share one orthogonalisation,
  so it is compiled once. NaN is never flagged as a breakdown: it propagates.

  Returns the new state and whether a step was taken (``matvecs`` counts both kinds).
  """
  dtype = kr.proj.dtype
  stepped = ~kr.pending
  # A select, not a lax.cond: the cond around the matvec made every step 25 % slower (CPU),
  # and an iteration after a breakdown is rare enough to afford a discarded matvec.
  # Restart seeds count down from 2^32 - 1; start vectors use hashed key words.
  row = _get_row(kr.basis, kr.j)
  fresh = _hash_vector(row, ~kr.matvecs.astype(jnp.uint32))
  x = jax.tree.map(lambda f, a: jnp.where(kr.pending, f, a), fresh,
                   optax.tree.cast(matvec(row), dtype))
  x, coeffs = _orthogonalise(kr.basis, x)
  beta = _tree.tree_norm(x)
  # ||A q_j||^2 = ||coeffs||^2 + beta^2 to round-off (x = Q^T coeffs + remainder): one
  # fewer pass over the leaves than measuring it.
  scale = jnp.sqrt(jnp.sum(coeffs ** 2) + beta ** 2)
  broke = stepped & (beta <= 10 * jnp.finfo(dtype).eps * scale)
  beta = jnp.where(broke, jnp.zeros_like(beta), beta)
  q = _normalise(x, beta)                     # zero after a breakdown: row j + 1 stays zero
  j = kr.j
  # Row and column j of proj become the coefficients with beta below the diagonal (nothing
  # when j + 1 = m): one elementwise select, where scatters compiled to several kernels.
  idx = jnp.arange(kr.proj.shape[0])
  col = coeffs + jnp.where(idx == j + 1, beta, 0)
  proj = jnp.where(stepped & (idx[:, None] == j), col[None, :],
                   jnp.where(stepped & (idx[None, :] == j), col[:, None], kr.proj))
  basis = _set_row(kr.basis, jnp.where(stepped, j + 1, j), q)
  step = stepped.astype(j.dtype)
  return _Krylov(basis, proj, jnp.where(stepped, beta, kr.beta), j + step, kr.matvecs + 1,
                 broke, kr.broke | broke), stepped


def _ritz(proj: jax.Array, beta, j, size: Optional[int] = None
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ritz pairs of the leading ``j x j`` block of ``proj``, largest first, and residuals.

  The block is diagonalised inside the leading ``size x size`` corner (``j <= size <= m``;
  ``None``: ``m``), since an ``eigh`` costs :math:`O(size^3)`. The ``size - j`` unfilled
  positions get a diagonal below every eigenvalue of the block (``-(1 + 2 sum|proj|)``,
  under minus its spectral radius) and no coupling, so their eigenvalues sort last and the
  first ``j`` columns of ``S`` are the block's eigenvectors, zero outside it; the outputs
  are padded back to ``[m]`` and ``[m, m]`` (``theta`` with that diagonal, ``S`` with
  zeros). The relative residual of pair ``i`` is
  :math:`\\max(|\\beta_j S_{j-1,i}| / \\max_{l<j} |\\theta_l|, \\epsilon)` (Parlett, *The
  Symmetric Eigenvalue Problem*, §13.1; Wu & Simon 2000 for the arrow after a restart),
  floored at the dtype's epsilon. All NaN when ``proj`` is not finite.
  """
  m = proj.shape[0]
  size = m if size is None else size
  filled = jnp.arange(m) < j
  pad = -(1 + 2 * jnp.sum(jnp.abs(proj)))
  block = jnp.where(filled[:, None] & filled[None, :], proj, 0)[:size, :size]
  theta, s = jnp.linalg.eigh(block + jnp.diag(jnp.where(filled[:size], 0, pad)))
  theta, s = theta[::-1], s[:, ::-1]
  if size < m:
    theta = jnp.concatenate([theta, jnp.full((m - size,), pad, theta.dtype)])
    s = jnp.zeros((m, m), s.dtype).at[:size, :size].set(s)
  scale = jnp.maximum(jnp.abs(theta[0]), jnp.abs(theta[j - 1]))
  residuals = jnp.abs(beta * s[j - 1, :]) / jnp.where(scale > 0, scale, 1.0)
  # Below the dtype's epsilon the formula measures LAPACK deflating a tiny coupling to an
  # exact 0, not the true residual (which round-off keeps above ~eps): floor it there, so a
  # tolerance below eps is never reported as met.
  residuals = jnp.maximum(residuals, jnp.finfo(proj.dtype).eps)
  finite = jnp.all(jnp.isfinite(proj))
  nan = lambda x: jnp.where(finite, x, jnp.nan)
  return nan(theta), nan(s), nan(residuals)


def _check_sizes(m: int) -> tuple[int, ...]:
  """Corner sizes a residual check diagonalises in: 8, 16, 32, ... below ``m``, and ``m``.

  A check at basis size ``j`` uses the smallest corner ``>= j``, so while the basis is
  small a check costs a small ``eigh`` (an ``eigh`` of 16 is a tenth of one of 55 on a CPU
  core) and checking after every step stays cheap; each size is one more branch to compile.
  """
  sizes, size = [], 8
  while size < m:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (m,)


# ----------------------------------------------------------------------------------------


def lanczos_tridiag(matvec: MatVec, v0: PyTree, num_iters: int) -> LanczosDecomposition:
  r"""``num_iters`` Lanczos steps with full reorthogonalisation, jit-compatible.

  For a symmetric operator :math:`A` (given as ``matvec``) and a start vector :math:`v_0`,
  builds orthonormal :math:`q_0 = v_0/\|v_0\|, q_1, \dots, q_{m-1}` and the tridiagonal
  :math:`T = Q A Q^\top` with :math:`\alpha_j = q_j^\top A q_j` and
  :math:`\beta_j = \|A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}\|`. Every new vector is
  orthogonalised against the whole basis twice (classical Gram-Schmidt, CGS2), which keeps
  ghost copies of converged eigenvalues out (Lanczos 1950; Parlett, *The Symmetric
  Eigenvalue Problem*, ch. 13). Cost: ``num_iters`` matvecs plus :math:`O(m^2 P)` flops;
  memory :math:`m \times P` in the basis dtype. This is the building block of stochastic
  Lanczos quadrature, which needs a fixed length; for eigenvalues use
  :func:`top_eigenpairs`, which stops as soon as the residuals are small.

  Breakdown (:math:`\beta_j \approx 0`: an invariant Krylov space, e.g. an operator of rank
  below ``num_iters``) continues from a fresh orthogonal direction with :math:`\beta_j = 0`:
  no NaN and no spurious eigenvalues. Non-finite input is not masked: a NaN from ``matvec``
  gives NaN entries in ``T``; every step is taken once (a breakdown adds one iteration), so
  the loop always terminates.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``v0``; it receives vectors in the basis
      dtype (float32 or wider) and its output is cast to that dtype.
    v0: non-zero start vector (pytree); its structure and shapes define the space.
    num_iters: number of steps ``m`` (a Python int, ``1 <= m <= dim``).

  Returns:
    A :class:`LanczosDecomposition` ``(basis, alphas, betas)``.
  """
  unflatten = None
  if _can_ravel(v0):
    flatten, unflatten = _raveller(v0, _tree.accum_dtype(v0))
    matvec = (lambda mv: lambda v: flatten(mv(unflatten(v))))(matvec)
    v0 = flatten(v0)
  kr = _start(v0, num_iters)
  kr = lax.while_loop(lambda kr: kr.j < num_iters, lambda kr: _advance(matvec, kr)[0], kr)
  betas = jnp.concatenate([jnp.diagonal(kr.proj, 1), kr.beta[None]])
  basis = kr.basis if unflatten is None else jax.vmap(unflatten)(kr.basis)
  return LanczosDecomposition(basis, jnp.diagonal(kr.proj), betas)


def tridiag_eigh(alphas: jax.Array, betas: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigen-decomposition of the ``m x m`` tridiagonal (``betas[-1]`` is ignored).

  Returns ``(theta [m] ascending, S [m, m])`` with ``T = S diag(theta) S^T``; NaN everywhere
  when ``T`` has a non-finite entry (LAPACK's output on such input is not meaningful).
  """
  off = betas[:-1]
  t = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  theta, s = jnp.linalg.eigh(t)
  finite = jnp.all(jnp.isfinite(t))
  return jnp.where(finite, theta, jnp.nan), jnp.where(finite, s, jnp.nan)


def default_num_iters(k: int, dim: int) -> int:
  """Default cap on the Krylov basis size: ``min(dim, max(40, 5 k + 30))``.

  Lanczos stops earlier, at the first checked basis size whose top-``k`` residuals meet
  ``tol``; the cap is what one cycle may use before a thick restart. Measured in float64
  against ``eigh`` of the dense Hessian of tanh MLPs, as the largest relative error over
  the top k after m unrestarted steps:

  - 2,285 params: k=1: m=20 2e-7, m=30 4e-15. k=5: m=20 4e-2, m=30 8e-4, m=40 6e-11.
  - 5,530 params: k=1: m=20 6e-9, m=30 6e-16. k=5: m=20 7e-2, m=30 3e-3, m=40 1e-7,
    m=50 3e-11. k=10: m=60 2e-3, m=70 1e-6. k=20: m=90 8e-3, m=110 1e-5.

  So the cap (40 for k = 1, 55 for k = 5, 80 for k = 10, 130 for k = 20) leaves room for
  typical Hessians to converge without a restart, while the residual test stopped the
  benchmark's runs (a 6,154-parameter MLP, top-1 and top-5) after 16-27 steps
  (``benchmarks/lanczos_bench.py``). A clustered top of the spectrum (gaps of
  1e-4 relative) needs restarts: no fixed length is enough there.
  """
  return min(dim, max(40, 5 * k + 30))


def default_tol(dtype) -> float:
  """Default relative residual tolerance: 1e-6 for float64 bases, 1e-4 for float32.

  A relative residual ``r`` bounds the eigenvalue error by ``r * max|theta|`` (and in
  practice by about ``r**2 / gap``), so these meet the 1e-5 (float64) and 1e-4 (float32)
  relative accuracy the tests demand even for the worst case; both sit well above the
  round-off floor of the residual (~1e-13 in float64, ~1e-6 in float32 on the test models).
  """
  return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_lanczos_args(dim: int, k: int, num_iters: Optional[int],
                       max_restarts: int = 0, check_every: int = 1) -> int:
  """Static checks shared by the Lanczos probes; returns the (clipped) basis size."""
  if not _is_int(k) or k < 1:
    raise ValueError(f"`k` must be an int >= 1, got {k!r}")
  if k > dim:
    raise ValueError(f"`k`={k} exceeds the dimension of the parameters ({dim} scalars)")
  if not _is_int(max_restarts) or max_restarts < 0:
    raise ValueError(f"`max_restarts` must be an int >= 0, got {max_restarts!r}")
  if not _is_int(check_every) or check_every < 1:
    raise ValueError(f"`check_every` must be an int >= 1, got {check_every!r}")
  if num_iters is None:
    return default_num_iters(int(k), dim)
  if not _is_int(num_iters) or num_iters <= 0:
    raise ValueError(f"`num_iters` must be a positive int or None, got {num_iters!r}")
  num_iters = min(int(num_iters), dim)
  if num_iters < k:
    raise ValueError(f"`num_iters`={num_iters} must be >= `k`={k}: m Lanczos steps give at "
                     "most m Ritz values")
  return num_iters


# Residuals are checked every this many steps. A check is an ``eigh`` of the smallest corner
# of 8, 16, 32, ..., m that holds the basis (``_check_sizes``): 0.01-0.08 ms up to j = 32 on
# one CPU core, 0.13-0.27 ms at m = 40-55, against 2.4 ms (float32) for one HVP of the
# 6,154-parameter MLP of benchmarks/lanczos_bench.py and far more on larger models. Checking
# every step costs ~1-2 % there and stops at the first converged basis size, where checking
# every 2nd step (with the m x m ``eigh`` alone) cost 2-4 % and half a step on average.
DEFAULT_CHECK_EVERY = 1


class _State(NamedTuple):
  """The carry of :func:`top_eigenpairs`' loop; the Ritz fields are valid when ``checked``."""
  kr: _Krylov
  restarts: jax.Array
  theta: jax.Array        # [m] Ritz values, largest first
  s: jax.Array            # [m, m] their eigenvectors in the basis
  residuals: jax.Array    # [m] relative residuals
  checked: jax.Array      # theta, s, residuals belong to the current proj
  first_check: jax.Array  # smallest j whose remainder couples to row j - 1 only


def _lanczos_loop(matvec: MatVec, v0: PyTree, *, k: int, m: int, tol: float,
                  max_restarts: int, check_every: int) -> _State:
  """Lanczos from ``v0``, one step per iteration, until the top-``k`` residuals meet ``tol``.

  Residuals are checked (:func:`_ritz`) after every ``check_every``-th step once there are
  ``k`` Ritz values, and when the basis is full. The loop stops at the first check where
  every top-``k`` residual is ``<= tol``; after a breakdown only at a full basis, since an
  invariant Krylov space holds one copy of a repeated eigenvalue and its Ritz values have
  residual 0 whether or not they are the top ones. A full basis that fails the test is
  thick-restarted (Wu & Simon 2000): the ``p = min((m + k) // 2, m - 1)`` leading Ritz
  vectors are kept and the iteration continues, at most ``max_restarts`` times. Thick restart
  needs the last remainder ``q_m`` as row ``p``; instead of carrying it through the loop, the
  kept Ritz vector with the largest coupling :math:`|\beta_m s_{m-1,i}|` goes to row
  ``p - 1`` and is expanded again: :math:`A y_i - \theta_i y_i = \beta_m s_{m-1,i} q_m`, so
  its remainder is ``q_m`` (one extra matvec per restart, counted in ``num_iters``). Until
  the step on row ``p`` has computed the couplings of every kept vector to ``q_m`` (the arrow),
  the residual formula does not hold, so the first check after a restart is at ``j > p``.
  A non-finite Ritz value ends the loop. On exit ``checked`` holds the verdict: every
  top-``k`` residual ``<= tol``.
  """
  p = max(1, min((m + k) // 2, m - 1))
  kr = _start(v0, m)
  dtype = kr.proj.dtype

  def accepted(st):
    ok = jnp.all(st.residuals[:k] <= tol) & (st.kr.j >= k)
    return ok & (~st.kr.broke | (st.kr.j == m))

  def stop_steps(st):
    finite = jnp.all(jnp.isfinite(st.theta[:k]))
    return st.checked & (accepted(st) | ~finite | (st.kr.j == m))

  def stop_cycles(st):
    finite = jnp.all(jnp.isfinite(st.theta[:k]))
    return accepted(st) | ~finite | (st.restarts >= max_restarts)

  def restart(st):
    # Kept Ritz vectors, the one most coupled to q_m last (it is expanded again).
    last = jnp.argmax(jnp.abs(st.s[m - 1, :p]))
    order = jnp.arange(p).at[last].set(p - 1).at[p - 1].set(last)
    coeffs = jnp.zeros((m, m), dtype).at[:p].set(st.s[:, order].T)
    proj = jnp.zeros((m, m), dtype).at[jnp.arange(p), jnp.arange(p)].set(st.theta[order])
    kr = st.kr._replace(basis=_basis_combine(coeffs, st.kr.basis), proj=proj,
                        j=jnp.asarray(p - 1, st.kr.j.dtype), pending=jnp.asarray(False))
    return st._replace(kr=kr, restarts=st.restarts + 1, checked=jnp.asarray(False),
                       first_check=jnp.asarray(min(p + 1, m), jnp.int32))

  def step(st):
    # The only call of ``matvec``: traced and compiled once.
    kr, stepped = _advance(matvec, st.kr)
    due = (stepped & (kr.j >= k) & (kr.j >= st.first_check)
           & ((kr.j % check_every == 0) | (kr.j == m)))
    # The switch sees the m x m matrices only: a branch copies the operands it passes through.
    # Branch 0 keeps the last check; branch i diagonalises in the i-th corner size.
    sizes = _check_sizes(m)
    keep = lambda proj, beta, j, theta, s, residuals: (theta, s, residuals)
    checks = [(lambda size: lambda proj, beta, j, *_: _ritz(proj, beta, j, size))(size)
              for size in sizes]
    which = jnp.where(due, 1 + jnp.searchsorted(jnp.asarray(sizes), kr.j), 0)
    theta, s, residuals = lax.switch(which, [keep] + checks, kr.proj, kr.beta, kr.j,
                                     st.theta, st.s, st.residuals)
    return st._replace(kr=kr, theta=theta, s=s, residuals=residuals, checked=due)

  def cycle(st):
    # Steps until a check passes or the basis is full; every cycle after the first starts
    # with a restart (the cond runs once per cycle, so its copy of the basis is rare).
    st = lax.cond(st.kr.j == m, restart, lambda st: st, st)
    return lax.while_loop(lambda st: ~stop_steps(st), step, st)

  nan = jnp.full((m,), jnp.nan, dtype)
  zero = jnp.zeros((), jnp.int32)
  state = _State(kr, zero, nan, jnp.zeros((m, m), dtype), nan, jnp.asarray(False), zero)
  state = lax.while_loop(lambda st: ~st.checked | ~stop_cycles(st), cycle, state)
  return state._replace(checked=accepted(state))


def top_eigenpairs(matvec: MatVec, like: PyTree, *, k: int = 1, num_iters: Optional[int] = None,
                   key: Optional[jax.Array] = None, return_eigenvectors: bool = False,
                   tol: Optional[float] = None, max_restarts: int = 20,
                   check_every: int = DEFAULT_CHECK_EVERY) -> HessianEigenvalues:
  r"""Largest-``k`` (algebraic) eigenpairs of a symmetric operator by Lanczos, stopped on residuals.

  Generic entry for the curvature probes (Hessian, preconditioned Hessian, covariance).
  Lanczos with full reorthogonalisation runs from a pseudo-random start vector (hashed from
  ``key``) and stops at the first basis size ``j`` (checked every ``check_every`` steps) at
  which every top-``k`` relative Ritz residual :math:`|\beta_j s_{j-1,i}| / \max|\theta|`
  is ``<= tol``. If the basis reaches ``m = num_iters`` first, a thick restart (Wu & Simon,
  SIAM J. Matrix Anal. Appl. 22, 2000) keeps the ``p = min((m + k) // 2, m - 1)`` leading
  Ritz vectors and continues, at most ``max_restarts`` times (:func:`_lanczos_loop`). Memory
  stays ``m x P`` (twice that for the moment of a restart). Everything is inside
  ``lax.while_loop``, so it jits and the operator is compiled once.

  ``matvec`` receives vectors in the basis dtype (float32 or wider, ``_tree.accum_dtype``
  of ``like``); cast them with :func:`cast_like` before a narrower computation such as a
  bf16 HVP. A NaN from ``matvec`` ends the loop at the next check with NaN eigenvalues.

  Args:
    matvec: ``v -> A v`` for a symmetric ``A`` on pytrees shaped like ``like``.
    like: a pytree giving the structure, shapes and dtype of the space (e.g. ``params``).
    k: number of eigenpairs, ``1 <= k <= dim``.
    num_iters: largest Krylov basis ``m >= k`` (steps per cycle); ``None`` ->
      :func:`default_num_iters`; clipped to ``dim``.
    key: PRNG key for the start vector; ``None`` means ``jax.random.PRNGKey(0)``.
    return_eigenvectors: also return the Ritz vectors (a ``[k, m] x [m, P]`` product).
    tol: relative residual target; ``None`` -> :func:`default_tol` of the basis dtype.
    max_restarts: cap on restarts (``0``: at most ``num_iters`` steps).
    check_every: steps between residual checks (each an ``eigh`` of at most ``m x m``, see
      :func:`_check_sizes`); the basis is also checked when full.

  Returns:
    :class:`HessianEigenvalues`; ``num_iters`` counts the matvecs spent.
  """
  dim = optax.tree.size(like)
  m = check_lanczos_args(dim, k, num_iters, max_restarts, check_every)
  key = jax.random.PRNGKey(0) if key is None else key
  dtype = _tree.accum_dtype(like)
  tol = default_tol(dtype) if tol is None else tol
  ravel = _can_ravel(like)
  if ravel:
    # One [m, P] basis; the start vector is the same as the pytree path's (same hash of
    # the same global indices).
    flatten, unflatten = _raveller(like, dtype)
    matvec = (lambda mv: lambda v: flatten(mv(unflatten(v))))(matvec)
    v0 = _hash_vector(jnp.zeros((dim,), dtype), _key_seed(key))
  else:
    # Tied to ``like``'s sharding: the basis rows, written from v0 onwards, inherit it.
    v0 = shard_like(_hash_vector(like, _key_seed(key)), like)
  st = _lanczos_loop(matvec, v0, k=k, m=m, tol=tol, max_restarts=max_restarts,
                     check_every=check_every)
  vectors = None
  if return_eigenvectors:
    vectors = _basis_combine(st.s[:, :k].T, st.kr.basis)
    vectors = jax.vmap(unflatten)(vectors) if ravel else vectors
  return HessianEigenvalues(st.theta[:k], vectors, st.residuals[:k], st.kr.matvecs,
                            st.checked)


def hessian_eigenvalues(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, *, k: int = 1,
                        num_iters: Optional[int] = None, key: Optional[jax.Array] = None,
                        return_eigenvectors: bool = False, tol: Optional[float] = None,
                        max_restarts: int = 20,
                        check_every: int = DEFAULT_CHECK_EVERY) -> HessianEigenvalues:
  r"""Top-``k`` eigenvalues of the Hessian :math:`H = \nabla^2 L(\theta)` by Lanczos.

  Runs Lanczos with full reorthogonalisation on the Hessian-vector product
  :math:`v \mapsto H v` (forward-over-reverse, :func:`curvature.hvp`), never forming
  :math:`H`, and returns the ``k`` largest Ritz values (largest *algebraic*: negative
  curvature is reported as negative numbers; the most negative eigenvalue is not sought).
  The top Ritz value converges from below.

  It stops at the first basis size whose top-``k`` relative Ritz residuals are all below
  ``tol`` (1e-6 in float64, 1e-4 in float32), checked after every step (``check_every``), so
  it spends as many HVPs as the spectrum needs (``result.num_iters``; 16-27 for top-1 and
  top-5 on the MLP Hessians of ``benchmarks/lanczos_bench.py``). The basis holds at most
  ``num_iters = min(dim, max(40, 5k + 30))`` vectors (40 for k = 1, 55 for k = 5); when the
  top of the spectrum is clustered and that is not enough, thick restarts continue until the
  residuals pass, at most ``max_restarts = 20`` times. The tests check top-5 to 1e-5
  relative (float64) with the defaults on an MLP, an attention model and a spectrum with
  relative gaps of 1e-4, and top-1 to 1e-4 in float32. ``converged`` says whether the
  tolerance was met; check it.

  Cost: ``result.num_iters`` HVPs plus :math:`O(m^2 P)` flops of reorthogonalisation per
  step and an ``m x m`` ``eigh`` per check; memory ``m x P`` in float32 or wider.
  The function is jit-compatible (``k``, ``num_iters``, ``return_eigenvectors``, ``tol``,
  ``max_restarts`` and ``check_every`` are static); pass ``params`` and the batch as
  arguments of the jitted function, not as closed-over constants. Bad arguments raise at
  trace time.

  Non-finite input: a NaN or inf in the loss, the parameters or an HVP gives NaN
  eigenvalues and residuals and ``converged=False``; the loop stops, it never hangs.

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` (bind the batch with a closure or ``partial``).
    params: the point :math:`\theta`, any pytree of float arrays (float64 params give a
      float64 Krylov basis; anything narrower gives float32).
    k: number of eigenvalues, ``1 <= k <= dim``.
    num_iters: largest Krylov basis (steps per cycle), ``>= k``, clipped to ``dim``;
      ``None`` as above. With ``max_restarts=0`` this is at most ``num_iters`` steps.
    key: PRNG key for the start vector; ``None`` means ``jax.random.PRNGKey(0)``.
    return_eigenvectors: also return unit Ritz vectors as a pytree with leading axis ``k``.
    tol: relative residual target, see :class:`HessianEigenvalues`; ``None`` as above.
    max_restarts: cap on thick restarts.
    check_every: steps between residual checks (``1``: after every step).

  Returns:
    :class:`HessianEigenvalues` ``(eigenvalues [k] descending, eigenvectors, residuals [k],
    num_iters, converged)``.

  Reference: C. Lanczos, J. Res. Nat. Bur. Standards 45 (1950); K. Wu & H. Simon,
  "Thick-restart Lanczos method for large symmetric eigenvalue problems" (2000); as a
  Hessian probe, Ghorbani, Krishnan & Xiao, ICML 2019 (arXiv 1901.10159).

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 6.0) * p ** 2)   # H = diag(1, ..., 5)
    >>> out = hessian_eigenvalues(loss, jnp.zeros(5), k=2)
    >>> [round(float(e), 4) for e in out.eigenvalues], bool(out.converged)
    ([5.0, 4.0], True)
  """
  _hvp.check_loss_fn(loss_fn, params)
  matvec = lambda v: _hvp.hvp(loss_fn, params, cast_like(v, params))
  return top_eigenpairs(matvec, params, k=k, num_iters=num_iters, key=key,
                        return_eigenvectors=return_eigenvectors, tol=tol,
                        max_restarts=max_restarts, check_every=check_every)
