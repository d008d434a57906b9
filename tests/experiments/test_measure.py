"""``experiments.measure``: probes on a finished run's checkpoints, against references computed
here from the restored arrays (NumPy float64 Adam step, line search and finite-difference
Hessian), and the run directory left byte-identical."""

import hashlib
import json
import os
import shutil

from absl import flags
import jax
import numpy as np
import pytest

import convergence
from experiments import config_lib
from experiments import data as data_lib
from experiments import measure
from experiments import models
from experiments import trainer

pytestmark = pytest.mark.usefixtures("compile_cache")

# Full-batch Adam on a 64-8-10 tanh MLP: small enough for a dense Hessian (610 parameters),
# and the direction comes from a non-trivial optimizer state (Adam's moments).
OVERRIDES = {"num_steps": 12, "checkpoint.every": 4, "checkpoint.keep_preliminary": -1,
             "checkpoint.save_initial": True,
             "checkpoint.async_save": False, "model.widths": (8,), "data.subset_size": 128,
             "monitor.enabled": False, "probe.preconditioned_every": 0, "eval_every": 0,
             "progress_bar": False, "plots": False}
BATCHES = 2
STEP = 8  # the checkpoint checked against the references


def _hashes(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  """A 12-step run with checkpoints 0, 4, 8, 12, measured offline; hashes before and after."""
  base = tmp_path_factory.mktemp("measure")
  workdir, out = str(base / "run"), str(base / "offline")
  config = config_lib.load_config("configs/edge_of_stability.py:adam,smoke", OVERRIDES)
  trainer.train_and_evaluate(config, workdir)
  # An unfinished save of a run still training: a manager opened on the run itself would
  # delete it; the measurement must leave it alone.
  tmp_save = os.path.join(workdir, "checkpoints", "16.orbax-checkpoint-tmp-1")
  os.makedirs(tmp_save)
  with open(os.path.join(tmp_save, "partial"), "w") as f:
    f.write("half-written")
  before = _hashes(workdir)
  rows = measure.measure_run(workdir, probes=("critical", "lambda_max"), batches=BATCHES,
                             out=out, progress_bar=False)
  after = _hashes(workdir)
  return config, workdir, out, rows, before, after, _restored(workdir, base, STEP)


@pytest.fixture(scope="module")
def batch0(measured):
  """Held-out batch 0 in float64: the first num_eval // BATCHES examples (a full-batch run)."""
  config = measured[0]
  ds = data_lib.load_dataset(config.data, config.seed)
  n = ds.num_eval // BATCHES
  return ds.eval["x"][:n].astype(np.float64), ds.eval["y"][:n].astype(np.float64)


def test_rows_and_files(measured):
  config, _, out, rows, _, _, _ = measured
  assert [r["step"] for r in rows] == [0, 4, 8, 12]  # every checkpoint the run kept
  with open(os.path.join(out, measure.METRICS_FILE), encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == json.loads(json.dumps(rows))
  assert os.path.getsize(os.path.join(out, measure.FIGURE)) > 10_000
  for r in rows:
    assert r["tier"] in convergence.CHECKPOINT_TIERS and r["kind"] == "regular"
    assert r["train/lr"] == pytest.approx(config.optimizer.learning_rate, rel=1e-7)
    lam = r["curv/critical_sharpness/batches"]
    assert len(lam) == BATCHES and r["curv/critical_status/batches"] == ["ok"] * BATCHES
    assert r["curv/critical_sharpness/min"] <= r["curv/critical_sharpness"] <= (
        r["curv/critical_sharpness/max"])
    assert r["curv/critical_sharpness"] == pytest.approx(float(np.median(lam)), rel=1e-12)


def test_run_directory_unchanged(measured):
  _, _, _, _, before, after, _ = measured
  assert after == before  # the unfinished save included


def test_step_0_is_the_initialisation(measured, tmp_path):
  """``checkpoint.save_initial``: checkpoint 0 holds the model as built from the seed, before
  any update, with a fresh optimizer state."""
  config, workdir = measured[0], measured[1]
  state = _restored(workdir, tmp_path, 0)
  ds = data_lib.load_dataset(config.data, config.seed)
  _, init = models.split_params(models.build_model(config.model, ds, config.seed))
  got, want = jax.tree.leaves(state["params"]), jax.tree.leaves(init)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # the same program on one host
  assert int(state["step"]) == 0 and int(state["opt_state"][0][0]["count"]) == 0


def _restored(workdir, tmp_path, step):
  """The train state of checkpoint ``step``, read from a copy of the run's checkpoints."""
  copy = str(tmp_path / "copy_of_checkpoints")
  shutil.copytree(os.path.join(workdir, "checkpoints"), copy,
                  ignore=shutil.ignore_patterns("*orbax-checkpoint-tmp*"))
  mgr = convergence.TieredCheckpointManager(copy, async_save=False)
  try:
    return mgr.restore(step).state["train"]
  finally:
    mgr.close()


def _flat(params):
  """float64 ``(W0, b0, W1, b1)`` of the 64-8-10 MLP."""
  h, o = params["hidden"]["0"], params["out"]
  return [np.asarray(a, np.float64) for a in (h["kernel"], h["bias"], o["kernel"], o["bias"])]


def _loss_grad(theta, x, y):
  """MSE ``0.5·mean_n ‖tanh(xW0 + b0)W1 + b1 − y‖²`` and its gradient (backprop by hand)."""
  w0, b0, w1, b1 = theta
  h = np.tanh(x @ w0 + b0)
  r = h @ w1 + b1 - y
  dr = r / len(x)
  dh = (dr @ w1.T) * (1.0 - h ** 2)
  return 0.5 * np.mean(np.sum(r ** 2, -1)), [x.T @ dh, dh.sum(0), h.T @ dr, dr.sum(0)]


def _adam_direction(state, g, o):
  """Adam's unit-LR update from the saved moments: ``m̂/(√v̂ + ε)`` after one more step."""
  adam = state["opt_state"][0][0]
  count = int(adam["count"]) + 1
  out = []
  for mu, nu, gi in zip(_flat(adam["mu"]), _flat(adam["nu"]), g):
    m = o.b1 * mu + (1 - o.b1) * gi
    v = o.b2 * nu + (1 - o.b2) * gi ** 2
    out.append((m / (1 - o.b1 ** count)) / (np.sqrt(v / (1 - o.b2 ** count)) + o.eps))
  return out


def _eta_c(f, lo=1e-6, hi=1e3):
  """The smallest η > 0 with ``f(η) > 0``: a fine geometric scan, then bisection."""
  grid = np.geomspace(lo, hi, 6000)
  first = next(i for i, e in enumerate(grid) if f(e) > 0)
  a, b = grid[first - 1], grid[first]
  for _ in range(80):
    m = 0.5 * (a + b)
    a, b = (a, m) if f(m) > 0 else (m, b)
  return 0.5 * (a + b)


def test_critical_sharpness_matches_line_search(measured, batch0):
  config, _, _, rows, _, _, state = measured
  theta = _flat(state["params"])
  x, y = batch0
  l0, g = _loss_grad(theta, x, y)
  row = next(r for r in rows if r["step"] == STEP)
  # The loss is a float32 mean of 148×10 squares: within 1e-5 relative of the float64 one.
  assert row["eval/loss/batches"][0] == pytest.approx(l0, rel=1e-5)
  d = _adam_direction(state, g, config.optimizer)
  f = lambda eta: _loss_grad([t - eta * di for t, di in zip(theta, d)], x, y)[0] - l0
  eta = _eta_c(f)
  # The search stops with 1 − lower/upper ≤ 2^-k and reports the midpoint, so
  # |λ_c/λ_c* − 1| ≤ 2^-k/(2 − 2^-k) (k = probe.tol_power = 4: 1/31). It compares float32
  # losses: a trial whose |f| is below their rounding (≤ 32 ulp of L0 for a float32 sum of
  # 1,480 terms, pairwise) may be misclassified, which moves η_c* by at most that over |f'(η*)|.
  k = config.probe.tol_power
  slope = (f(eta * (1 + 1e-6)) - f(eta * (1 - 1e-6))) / (2e-6 * eta)
  rounding = 32 * np.finfo(np.float32).eps * l0 / (abs(slope) * eta)
  got = row["curv/critical_sharpness/batches"][0]
  assert abs(got / (2.0 / eta) - 1) <= 2.0 ** -k / (2 - 2.0 ** -k) + rounding


def test_lambda_max_matches_dense_hessian(measured, batch0):
  _, _, _, rows, _, _, state = measured
  theta = _flat(state["params"])
  x, y = batch0
  sizes = [t.size for t in theta]

  def grad_vec(v):
    parts = np.split(v, np.cumsum(sizes)[:-1])
    g = _loss_grad([p.reshape(t.shape) for p, t in zip(parts, theta)], x, y)[1]
    return np.concatenate([gi.ravel() for gi in g])

  v0 = np.concatenate([t.ravel() for t in theta])
  h = 1e-5  # central differences in float64: O(h²) truncation, O(1e-16/h) rounding ≈ 1e-10
  hess = np.stack([(grad_vec(v0 + h * e) - grad_vec(v0 - h * e)) / (2 * h)
                   for e in np.eye(v0.size)], 1)
  top = np.linalg.eigvalsh(0.5 * (hess + hess.T))[-1]
  row = next(r for r in rows if r["step"] == STEP)
  assert row["curv/lambda_max_converged"]
  # A Ritz value lies within residual·|λ| of an eigenvalue (curvature.HessianEigenvalues);
  # 1e-4 relative more covers the float32 Hessian-vector products (the library's float32
  # Lanczos-vs-eigh tolerance).
  residual = row["curv/lambda_max_residual/batches"][0]
  assert abs(row["curv/lambda_max/batches"][0] - top) <= (residual + 1e-4) * top


def test_bad_arguments_fail_with_one_line(measured, tmp_path):
  workdir = measured[1]
  cases = [
      (dict(workdir=str(tmp_path / "absent")), "no such directory"),
      (dict(workdir=str(tmp_path)), "has no config.json"),
      (dict(workdir=workdir, probes=("critical", "hessian")), "unknown probe(s) ['hessian']"),
      (dict(workdir=workdir, steps=[5]), "no checkpoint at [5]; the run kept [0, 4, 8, 12]"),
  ]
  empty = tmp_path / "no_checkpoints"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty)
  cases.append((dict(workdir=str(empty)), "no checkpoints in"))
  for kwargs, message in cases:
    with pytest.raises(measure.MeasureError) as e:
      measure.measure_run(out=str(tmp_path / "out"), progress_bar=False, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_command_line_exits_with_one_line(measured, tmp_path):
  fv = flags.FlagValues()
  measure.define_flags(fv)
  for argv, message in (
      ([f"--workdir={measured[1]}", "--probes=hessian"], "measure error: --probes='hessian'"),
      ([f"--workdir={tmp_path}"], "measure error: --workdir="),
      ([], "usage error: --workdir=RUN is required"),
  ):
    fv.unparse_flags()
    fv(["measure"] + argv)
    with pytest.raises(SystemExit) as e:
      measure.main(["measure"])
    assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code), argv
