r"""Curvature probes measured afterwards on a run's saved checkpoints.

  python -m experiments.measure --workdir=RUN [--probes=critical,lambda_max] [--batches=4]
      [--batch_size=0] [--direction=update] [--split=eval] [--steps=100,200] [--out=RUN/offline]

Kalra et al. 2026 (arXiv 2601.16979, Fig. 4) measure the critical sharpness of OLMo
checkpoints after training: a fast early fall, then a steady rise. This command does the same
for any run of ``experiments.run`` that kept checkpoints (``config.checkpoint``; set
``checkpoint.keep_preliminary=-1`` to keep every save). It reads ``RUN/config.json``, rebuilds
the data, model, loss and optax chain from it, and for every checkpoint the run kept (all
tiers, emergency saves included; ``--steps`` picks some) restores the train state and measures,
on ``--batches`` held-out batches that are the same for every checkpoint (batch ``b`` is
held-out examples ``[b·n, (b+1)·n)``, ``n`` = ``--batch_size``, by default the run's training
batch size, or the held-out set split into ``--batches`` parts for a full-batch run;
``--split=train`` takes them from the training split instead, and ``--split=train
--batches=1`` on a full-batch run measures on the run's own batch, as the online probes did):

* ``critical``: :math:`\lambda_c = 2/\eta_c`, :math:`\eta_c = \min\{\eta>0 :
  L(\theta-\eta\Delta\theta) > L(\theta)\}` (``curvature.critical_sharpness``, with the
  batch's gradient for the slope), along :math:`\Delta\theta` = the unit-learning-rate update
  the saved optimizer state would take on that batch: the first part of the config's chain
  ``(preconditioner, λ_c probe, learning-rate scale)`` (``experiments.optim``) applied to the
  batch's gradient and the restored state, i.e. the direction the in-chain probe measures
  during training. Nothing is written back: JAX arrays are immutable, so the state is used
  as a copy. ``--direction=gradient`` measures along the gradient instead.
* ``directional``: :math:`\lambda_{dir} = \Delta\theta^\top H\Delta\theta/\Delta\theta^\top g`
  (one Hessian-vector product), the quadratic model of :math:`\lambda_c`.
* ``lambda_max``: the top Hessian eigenvalue of the batch loss by Lanczos
  (``curvature.hessian_eigenvalues`` with its default tolerance).

Writes ``OUT/offline_metrics.jsonl`` (one row per checkpoint: step, tier, kind, ``train/lr`` =
η of the update the checkpoint's state takes next, ``eval/loss`` (``train/loss`` with
``--split=train``) = the mean batch loss, and per
probe the median across batches with ``/min``, ``/max`` and ``/batches``; λ_c's band uses the
batches whose search ended ``ok``, every status is listed), ``OUT/offline_sharpness.png``
(λ_c against step with its band and :math:`2/\eta(t)` from the config's schedule) and
``OUT/offline_settings.json``. The run directory is only read: the checkpoints are opened
through a private mirror of symbolic links, so the checkpoint manager's own bookkeeping (its
ledger, the removal of unfinished saves) touches the mirror, not the run; a run still
training may be measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, NamedTuple, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PROBES = ("critical", "directional", "lambda_max")
DIRECTIONS = ("update", "gradient")
SPLITS = ("eval", "train")
METRICS_FILE = "offline_metrics.jsonl"
FIGURE = "offline_sharpness.png"
SETTINGS_FILE = "offline_settings.json"
OUT_DIR = "offline"
# The Lanczos start vectors come from this stream of the run's seed (the trainer's probes use
# fold_in(key(seed), 1) and its sub-streams), the same for every checkpoint.
_KEY_STREAM = 7


class MeasureError(ValueError):
  """A bad command line or run directory; the message is one line naming the cause."""


# --------------------------------------------------------------------------------------------
# The run: config, checkpoints (read-only), template state
# --------------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The validated config of the run in ``workdir`` (its ``config.json``)."""
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise MeasureError(f"--workdir={workdir}: no such directory.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise MeasureError(f"--workdir={workdir} has no config.json: not a run directory written "
                       "by python -m experiments.run.")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  if "distill" in saved:
    raise MeasureError(f"--workdir={workdir} is a distillation run; experiments.measure reads "
                       "runs of the trainer (experiments.trainer).")
  try:
    return config_lib.validate_config(ml_collections.ConfigDict(saved))
  except ValueError as e:
    raise MeasureError(f"{path}: {str(e).splitlines()[0]}") from e


def parse_probes(spec: str) -> tuple[str, ...]:
  """``"critical,lambda_max"`` → ``("critical", "lambda_max")``; unknown names raise."""
  names = tuple(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
  bad = [p for p in names if p not in PROBES]
  if bad or not names:
    raise MeasureError(f"--probes={spec!r}: unknown probe(s) {bad or '(none given)'}; accepted: "
                       f"{', '.join(PROBES)} (comma-separated).")
  return names


def _mirror(src: str, dst: str) -> None:
  """``dst`` = ``src``'s directory tree with a symbolic link for every file.

  Unfinished saves (Orbax's ``*.orbax-checkpoint-tmp-*`` directories) are left out. The
  checkpoint manager replaces its ledger with ``os.replace`` and deletes directories, which
  act on the links and directories of ``dst`` only; restoring only reads the files.
  """
  for root, dirs, files in os.walk(src):
    dirs[:] = sorted(d for d in dirs if ".orbax-checkpoint-tmp" not in d)
    here = os.path.join(dst, os.path.relpath(root, src))
    os.makedirs(here, exist_ok=True)
    for name in files:
      os.symlink(os.path.abspath(os.path.join(root, name)), os.path.join(here, name))


@contextlib.contextmanager
def checkpoint_snapshot(workdir: str):
  """Yields a ``convergence.TieredCheckpointManager`` over a mirror of ``RUN/checkpoints``.

  The mirror (symbolic links, :func:`_mirror`) lives in a temporary directory removed on
  exit; the run's own files are never opened for writing.
  """
  import convergence  # pylint: disable=g-import-not-at-top
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  if not checkpointing.has_checkpoints(workdir):
    raise MeasureError(f"no checkpoints in {checkpointing.checkpoint_dir(workdir)}: the run "
                       "saved none (rerun it with --config.checkpoint.enabled=True and "
                       "--config.checkpoint.every=N; --config.checkpoint.save_initial=True adds "
                       "step 0).")
  tmp = tempfile.mkdtemp(prefix="losslab-measure-")
  mgr = None
  try:
    _mirror(checkpointing.checkpoint_dir(workdir), tmp)
    mgr = convergence.TieredCheckpointManager(tmp, async_save=False)
    yield mgr
  finally:
    if mgr is not None:
      mgr.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _leaf_name(path) -> str:
  """The checkpoint manifest's name of a leaf: keys, attribute names and indices joined by
  '/' (a tuple restored without a target comes back as a list or a dict of '0', '1', ...)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def fill_state(template, restored, *, step: int):
  """``template``'s structure (shapes and dtypes checked) with the leaves of ``restored``.

  ``restored`` is a target-less restore of the checkpoint's ``train`` item (nested dicts and
  lists); each template leaf is found by its path name, as the checksums name it.
  """
  saved = {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}

  def one(path, leaf):
    name = _leaf_name(path)
    if name not in saved:
      raise MeasureError(f"checkpoint {step} has no leaf train/{name}: it was not written by "
                         "this config's trainer (model or optimizer changed?).")
    x = np.asarray(saved[name])
    if x.shape != tuple(leaf.shape):
      raise MeasureError(f"checkpoint {step}: train/{name} is {list(x.shape)}, the config "
                         f"builds {list(leaf.shape)}.")
    return jnp.asarray(x, leaf.dtype)
  return jax.tree_util.tree_map_with_path(one, template)


def restore_state(mgr, setup: "Setup", step: int):
  """The TrainState of checkpoint ``step``, laid out as ``setup.template`` (:func:`fill_state`);
  a warning when the checkpoint was saved on other data than ``setup`` builds."""
  from experiments import records  # pylint: disable=g-import-not-at-top
  restored = mgr.restore(step)
  if records.to_json(restored.metadata.get("data")) != records.to_json(setup.data_info):
    logging.warning("checkpoint %d was saved on other data (%s) than config.json now "
                    "builds (%s)", step, restored.metadata.get("data"), setup.data_info)
  return fill_state(setup.template, restored.state["train"], step=step)


# --------------------------------------------------------------------------------------------
# Model, loss, direction and held-out batches from the config
# --------------------------------------------------------------------------------------------


class Setup(NamedTuple):
  """What the measurements need, rebuilt from the run's config."""
  loss_fn: Callable[[Any, Any], jax.Array]  # (params, batch) -> loss, in the probe dtype
  preconditioner: Any  # optax: gradient -> unit-learning-rate update Δθ
  schedule: Callable[[Any], jax.Array]  # step -> η
  template: Any  # the TrainState of ShapeDtypeStructs a checkpoint's ``train`` item fills
  data_info: Any  # the dataset fingerprint, compared with the checkpoints'
  dataset: Any


def build_setup(config) -> Setup:
  """Data, the model's graph (no initialisation), loss, optimizer and state template."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  from experiments import models, optim, precision, trainer  # pylint: disable=g-import-not-at-top
  dataset = data_lib.load_dataset(config.data, config.seed)
  primary = dataset["code"] if isinstance(dataset, dict) else dataset
  # The probe dtype's graph: the probes compare losses computed as during training's probes.
  abstract = nnx.eval_shape(lambda: models.build_model(config.model, primary, config.seed,
                                                       dtype=precision.probe_dtype(config)))
  graphdef, params = models.split_params(abstract)
  schedule = optim.make_schedule(config)
  optimizer = optim.make_optimizer(config, schedule)
  loss_scale = (None if config.precision.loss_scale == "none"
                else jax.eval_shape(lambda: precision.loss_scale_from_config(config)))
  template = trainer.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                                jax.eval_shape(optimizer.tx.init, params), loss_scale)
  info = ({t: d.info for t, d in dataset.items()} if isinstance(dataset, dict)
          else dataset.info)
  return Setup(trainer.make_loss_fn(config, graphdef), optimizer.preconditioner, schedule,
               template, info, dataset)


def _chunks(arrays: dict[str, np.ndarray], count: int, size: int, what: str) -> dict:
  """The first ``count·size`` examples as ``[count, size, ...]`` arrays."""
  have = len(next(iter(arrays.values())))
  if size < 1 or count * size > have:
    raise MeasureError(f"--batches={count} of {size} {what}examples need {count * size}; the "
                       f"split has {have}. Lower --batches or --batch_size.")
  return {k: v[:count * size].reshape((count, size) + v.shape[1:]) for k, v in arrays.items()}


def measurement_batches(config, dataset, count: int, size: int = 0, split: str = "eval") -> dict:
  """``count`` disjoint batches of ``split`` stacked on a leading axis (``[count, n, ...]``).

  Batch ``b`` is the split's examples ``[b·n, (b+1)·n)``, the same for every checkpoint.
  ``size`` (``n``) 0: the run's ``batch_size``, or for a full-batch run (``batch_size=0``) the
  split (for ``train``: the run's full batch, ``full_batch_examples``) divided into ``count``
  parts; a default larger than the split allows is lowered to fit. ``split="train"`` with
  ``count=1`` on a full-batch run is the run's own batch. A ``mix`` run's batch holds both
  tasks in ``data.code_fraction``.
  """
  if split not in SPLITS:
    raise MeasureError(f"--split={split!r}: accepted: {', '.join(SPLITS)}.")
  if count < 1:
    raise MeasureError(f"--batches={count}: must be >= 1.")
  tasks = dataset if isinstance(dataset, dict) else {"": dataset}
  parts = {t: getattr(d, split) for t, d in tasks.items()}
  have = {t: len(next(iter(a.values()))) for t, a in parts.items()}
  if split == "train" and config.batch_size == 0 and config.full_batch_examples > 0:
    have = {t: min(h, config.full_batch_examples) for t, h in have.items()}
  frac = float(config.data.code_fraction)
  sizes = lambda n: ({"": n} if "" in tasks else
                     {"code": int(round(n * frac)), "prose": n - int(round(n * frac))})
  fits = lambda n: all(k * count <= have[t] for t, k in sizes(n).items())
  fit = next(n for n in range(sum(have.values()) // count, -1, -1) if fits(n))
  n = size or config.batch_size or fit
  if not size and n > fit:
    logging.warning("batches of %d examples: the %s split holds %d batches of at most %d; "
                    "using %d", n, split, count, fit, fit)
    n = fit
  if "" in tasks:
    return _chunks(parts[""], count, n, "")
  return {t: _chunks(parts[t], count, k, f"{t} ") for t, k in sizes(n).items()}


# --------------------------------------------------------------------------------------------
# The measurement (one jitted function over all batches of a checkpoint)
# --------------------------------------------------------------------------------------------


def make_measure_fn(setup: Setup, config, probes: Sequence[str], direction: str = "update"):
  """``measure(params, opt_state, batches, keys) -> {name: [count]}``, jitted.

  Per batch: the loss ``loss`` and, as ``probes`` ask, ``critical`` / ``status`` /
  ``num_evals`` (``curvature.critical_sharpness`` along Δθ with ``grad=`` the batch gradient
  and the search settings of ``config.probe``), ``directional``, ``lambda_max`` /
  ``lambda_max_residual`` / ``lambda_max_converged``. Δθ is
  ``preconditioner.update(g, opt_state[0], params)`` (``direction="update"``) or ``g``.
  """
  import curvature  # pylint: disable=g-import-not-at-top
  if direction not in DIRECTIONS:
    raise MeasureError(f"--direction={direction!r}: accepted: {', '.join(DIRECTIONS)}.")
  p = config.probe

  def one(params, opt_state, batch, key):
    loss = lambda q: setup.loss_fn(q, batch)
    l0, g = jax.value_and_grad(loss)(params)
    d = setup.preconditioner.update(g, opt_state[0], params)[0] if direction == "update" else g
    out = {"loss": l0}
    if "critical" in probes:
      cs = curvature.critical_sharpness(loss, params, d, grad=g, loss0=l0,
                                        step_guess=p.step_guess, tol_power=p.tol_power,
                                        max_evals=p.max_evals)
      out.update(critical=cs.sharpness, status=cs.status, num_evals=cs.num_evals)
    if "directional" in probes:
      out["directional"] = curvature.directional_sharpness(loss, params, d)
    if "lambda_max" in probes:
      res = curvature.hessian_eigenvalues(loss, params, k=1, key=key)
      out.update(lambda_max=res.eigenvalues[0], lambda_max_residual=res.residuals[0],
                 lambda_max_converged=res.converged)
    return out

  def measure(params, opt_state, batches, keys):
    return jax.lax.map(lambda bk: one(params, opt_state, *bk), (batches, keys))
  return jax.jit(measure)


def _band(values) -> tuple[float, float, float]:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if not v.size:
    return float("nan"), float("nan"), float("nan")
  return float(np.median(v)), float(v.min()), float(v.max())


def summarize(step: int, record, lr: float, res: dict[str, np.ndarray],
              split: str = "eval") -> dict[str, Any]:
  """One row of ``offline_metrics.jsonl`` from the per-batch results ``res`` of a checkpoint
  (the mean batch loss as ``<split>/loss``)."""
  import curvature  # pylint: disable=g-import-not-at-top
  row = {"step": step, "tier": record.tier, "kind": record.kind, "train/lr": lr,
         f"{split}/loss": float(np.mean(res["loss"])), f"{split}/loss/batches": res["loss"]}

  def add(key, values, band_of=None):
    med, lo, hi = _band(values if band_of is None else band_of)
    row.update({key: med, f"{key}/min": lo, f"{key}/max": hi, f"{key}/batches": values})

  if "critical" in res:
    ok = res["status"] == curvature.STATUS_OK
    add("curv/critical_sharpness", res["critical"], res["critical"][ok])
    row["curv/critical_status/batches"] = [curvature.STATUS_NAMES[int(s)] for s in res["status"]]
    row["curv/critical_num_evals"] = float(np.mean(res["num_evals"]))
    row["curv/lr_sharpness"] = lr * row["curv/critical_sharpness"]
  if "directional" in res:
    add("curv/directional_sharpness", res["directional"])
  if "lambda_max" in res:
    add("curv/lambda_max", res["lambda_max"])
    row["curv/lambda_max_residual/batches"] = res["lambda_max_residual"]
    row["curv/lambda_max_converged"] = bool(np.all(res["lambda_max_converged"]))
  from experiments import records  # pylint: disable=g-import-not-at-top
  return records.to_json(row)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _select(available: list[int], steps: Sequence[int] | None, ckdir: str) -> list[int]:
  if not available:
    raise MeasureError(f"no committed checkpoint in {ckdir}.")
  if not steps:
    return available
  missing = sorted(set(steps) - set(available))
  if missing:
    raise MeasureError(f"--steps: no checkpoint at {missing}; the run kept {available}.")
  return sorted(set(steps))


def measure_run(workdir: str, *, probes: Sequence[str] = ("critical",), batches: int = 4,
                batch_size: int = 0, direction: str = "update", split: str = "eval",
                out: str | None = None,
                steps: Sequence[int] | None = None, progress_bar: bool = True,
                plot: bool = True) -> list[dict[str, Any]]:
  """Measures ``probes`` on the checkpoints of the run in ``workdir``; returns the rows.

  Writes ``out`` (default ``workdir/offline``) as the module docstring says. Raises
  :class:`MeasureError` for a missing run, config or checkpoint, or a bad argument.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from experiments import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  probes = parse_probes(",".join(probes))
  if direction not in DIRECTIONS:
    raise MeasureError(f"--direction={direction!r}: accepted: {', '.join(DIRECTIONS)}.")
  if split not in SPLITS:
    raise MeasureError(f"--split={split!r}: accepted: {', '.join(SPLITS)}.")
  if batches < 1 or batch_size < 0:
    raise MeasureError(f"--batches={batches} --batch_size={batch_size}: need batches >= 1 and "
                       "batch_size >= 0 (0: the run's).")
  config = load_run_config(workdir)
  out = out or os.path.join(workdir, OUT_DIR)
  with checkpoint_snapshot(workdir) as mgr:
    chosen = _select(mgr.all_steps(), steps, checkpointing.checkpoint_dir(workdir))
    setup = build_setup(config)
    stacked = jax.device_put(measurement_batches(config, setup.dataset, batches, batch_size,
                                                 split))
    measure = make_measure_fn(setup, config, probes, direction)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), _KEY_STREAM),
                            batches)
    os.makedirs(out, exist_ok=True)
    _write_settings(out, workdir, probes, stacked, direction, split, chosen)
    rows = []
    with open(os.path.join(out, METRICS_FILE), "w", encoding="utf-8") as f:
      for step in tqdm(chosen, desc="checkpoints", disable=not progress_bar, dynamic_ncols=True):
        state = restore_state(mgr, setup, step)
        lr = float(setup.schedule(trainer.schedule_count(state.opt_state, state.step)))
        res = jax.device_get(measure(state.params, state.opt_state, stacked, keys))
        rows.append(summarize(step, mgr.record(step), lr, res, split))
        f.write(json.dumps(rows[-1], sort_keys=True) + "\n")
        f.flush()
  if plot:
    plot_offline(rows, setup.schedule, config.num_steps, os.path.join(out, FIGURE),
                 title=f"{os.path.basename(os.path.normpath(workdir))}: offline, {batches} "
                       f"{split} batches, along the {direction}")
  return rows


def _write_settings(out, workdir, probes, stacked, direction, split, steps) -> None:
  first_axis1 = lambda tree: int(jax.tree.leaves(tree)[0].shape[1])
  n = ({t: first_axis1(v) for t, v in stacked.items()} if "code" in stacked
       else first_axis1(stacked))
  settings = {"workdir": os.path.abspath(workdir), "probes": list(probes),
              "batches": int(next(iter(jax.tree.leaves(stacked))).shape[0]),
              "batch_size": n, "direction": direction, "split": split, "steps": list(steps)}
  with open(os.path.join(out, SETTINGS_FILE), "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2, sort_keys=True)
    f.write("\n")


def plot_offline(rows: list[dict], schedule, num_steps: int, path: str, *, title: str) -> None:
  """λ_c (median, min–max band across batches) against step, with λ_dir, λ_max and 2/η(t)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.8))
  t = np.unique(np.linspace(0, num_steps, 2000).astype(np.int64))
  eta = np.asarray(jax.vmap(schedule)(jnp.asarray(t)), np.float64)
  keep = eta > 0
  ax.plot(t[keep], 2.0 / eta[keep], color="k", ls="--", lw=1.2, label=r"$2/\eta(t)$")
  s = np.array([r["step"] for r in rows])
  series = (("curv/critical_sharpness", r"$\lambda_c$ (median, min–max)", "C2", "o"),
            ("curv/directional_sharpness", r"$\lambda_{dir}$", "C1", "s"),
            ("curv/lambda_max", r"$\lambda_{max}$", "C0", "^"))
  for key, label, colour, marker in series:
    if not rows or key not in rows[0]:
      continue
    get = lambda k: np.array([r[k] if r[k] is not None else np.nan for r in rows], np.float64)
    ax.plot(s, get(key), color=colour, marker=marker, ms=4, lw=1.2, label=label)
    ax.fill_between(s, get(f"{key}/min"), get(f"{key}/max"), color=colour, alpha=0.2, lw=0)
  ax.set_yscale("log")
  ax.set_xlabel("step (checkpoint)")
  ax.set_ylabel("sharpness")
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(loc="best", fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_FLAGS = flags.FLAGS  # the FlagValues define_flags filled (tests pass their own)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's absl flags, defined on first use rather than at import, so the module
  imports beside ``experiments.run`` (which has a ``--workdir`` of its own)."""
  global _FLAGS
  _FLAGS = flag_values
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("workdir", None, "Run directory of experiments.run to measure.", **fv)
  flags.DEFINE_string("probes", "critical", f"Comma list of probes: {', '.join(PROBES)}.",
                      **fv)
  flags.DEFINE_integer("batches", 4, "Held-out batches per checkpoint (the band).", **fv)
  flags.DEFINE_integer("batch_size", 0, "Examples per batch; 0: the run's batch_size (full "
                       "batch: the held-out split divided into --batches parts).", **fv)
  flags.DEFINE_enum("direction", "update", list(DIRECTIONS),
                    "λ_c along the optimizer's unit-LR update or along the gradient.", **fv)
  flags.DEFINE_enum("split", "eval", list(SPLITS), "Batches from the held-out split (eval) or "
                    "the training split (train; with --batches=1 a full-batch run's own batch).",
                    **fv)
  flags.DEFINE_list("steps", [], "Checkpoint steps to measure (default: every one kept).", **fv)
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/offline).", **fv)
  flags.DEFINE_bool("progress_bar", True, "A progress bar over the checkpoints.", **fv)


def main(argv):
  """``python -m experiments.measure``: exit status 1 with a one-line message on a bad
  command line or run directory."""
  f = _FLAGS
  if len(argv) > 1:
    sys.exit(f"usage error: unexpected positional arguments {argv[1:]} (flags take the form "
             "--name=value).")
  if not f.workdir:
    sys.exit("usage error: --workdir=RUN is required (a run directory of experiments.run).")
  try:
    steps = [int(s) for s in f.steps]
  except ValueError:
    sys.exit(f"usage error: --steps={','.join(f.steps)}: give step numbers, e.g. 100,200.")
  if "verbosity" in f and not f["verbosity"].present:  # Orbax: several INFO lines a restore
    logging.set_verbosity(logging.WARNING)
  try:
    rows = measure_run(f.workdir, probes=f.probes.split(","), batches=f.batches,
                       batch_size=f.batch_size, direction=f.direction, split=f.split,
                       out=f.out, steps=steps, progress_bar=f.progress_bar)
  except MeasureError as e:
    sys.exit(f"measure error: {e}")
  out = f.out or os.path.join(f.workdir, OUT_DIR)
  print(f"measured {len(rows)} checkpoints: {os.path.join(out, METRICS_FILE)}, "
        f"{os.path.join(out, FIGURE)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
