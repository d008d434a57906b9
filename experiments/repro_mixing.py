r"""Kalra et al. 2026, Fig. 5: relative critical sharpness of code and prose along a mix's update.

The paper (arXiv 2601.16979, §5, Fig. 5) takes a pre-trained checkpoint (OLMo-2 7B), does not
update it, and for each mixing ratio r of a fine-tuning mix measures every evaluation task's
loss along the mix's update: λ_c^{task←mix(r)} = 2/η_c, η_c = min{η : L_task(θ − ηΔθ_r) >
L_task(θ)}, with a band across batches. The curves cross at the mix with the largest usable
learning rate; fine-tuning over (r, η) stays "in the basin" of a task (its performance does
not degrade) when η is below that task's critical learning rate.

In miniature: a tiny GPT pre-trained on Python standard-library code (``configs/data_mixing.py:
pretrain``; the "pre-training data", as DCLM in the paper) and the Python reference manual's
prose (the new task, as Math). r is the code share of the mix's loss, r·L_code + (1 − r)·L_prose.

* The update of the mix, as the authors' code computes it (``language/utils/
  critical_learning_rate.py``, ``adam_fn``, and ``utils/optimizers.py``, ``AdamW._compute_
  update``: a virtual step from the optimizer state, which is empty when fine-tuning starts
  from a checkpoint loaded without it, as ``language/finetune_gpt_adam_forward_ckpts.py``
  does): the first AdamW step at unit learning rate, Δθ_r = g_r/(|g_r| + ε) + γθ with g_r the
  mix's gradient on a training batch of each task.
* K pairs (training batch k of each task → Δθ_r(k); held-out batch k of each task → the
  monitored losses): λ_c per pair, median and min/max across the K pairs
  (``curvature.relative_sharpness_matrix`` with the held-out gradients as ``grads=``, then
  ``curvature.sharpness_band``).
* A fine-tuning grid from the same checkpoint: a fresh AdamW at a constant η for
  ``FT_STEPS`` steps on the mix r, for r in ``GRID_RATIOS`` and ``GRID_LRS`` learning
  rates log-spaced from ⅓× the smallest to 3× the largest predicted 2/λ_c at those ratios;
  each task's held-out loss before and after.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.repro_base import Reproduction, Run

CONFIG = "configs/data_mixing.py"
TASKS = ("code", "prose")
GRID_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Code share of the mix's loss: 0, 0.1, ..., 1 and the grid's ratios.
RATIOS = tuple(sorted({round(0.1 * i, 1) for i in range(11)} | set(GRID_RATIOS)))
GRID_LRS = 5  # learning rates per ratio in the fine-tuning grid
FT_STEPS = 24  # fine-tuning steps per grid cell
# (pairs K, sequences per task in a training batch, in a held-out batch) — full / smoke.
SIZES = {False: (8, 128, 64), True: (2, 4, 8)}


def _runs(smoke: bool) -> list[Run]:
  return [Run("pretrain", f"{CONFIG}:pretrain,smoke" if smoke else f"{CONFIG}:pretrain")]


def _pretrained(run_dir: str):
  """``(config, setup, params, {task: Dataset})``: the run's last checkpoint and both corpora
  in the run's vocabulary (``experiments.measure`` rebuilds the model from config.json)."""
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  from experiments import measure  # pylint: disable=g-import-not-at-top
  config = measure.load_run_config(run_dir)
  setup = measure.build_setup(config)
  with measure.checkpoint_snapshot(run_dir) as mgr:
    step = max(mgr.all_steps())
    state = measure.restore_state(mgr, setup, step)
  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.name = "mix"
  return config, setup, state.params, data_lib.load_dataset(data_config, config.seed)


def _stack(tokens: np.ndarray, count: int, size: int, rng=None) -> jax.Array:
  """``count`` batches of ``size`` windows, ``[count, size, T + 1]``: the first ones, or a
  seeded draw without replacement when ``rng`` is given."""
  idx = np.arange(count * size) if rng is None else rng.permutation(len(tokens))[:count * size]
  return jnp.asarray(tokens[idx].reshape((count, size) + tokens.shape[1:]))


def _sweep_fn(loss, preconditioner, probe):
  """Jitted ``sweep(params, train, held, ratios) -> (per_pair [R, K, 2, 1], band [R, 2, 1])``."""
  import curvature  # pylint: disable=g-import-not-at-top
  lm = lambda p, tokens: loss(p, {"tokens": tokens})

  def sweep(params, train, held, ratios):
    grads = {t: jax.lax.map(lambda b: jax.grad(lm)(params, b), train[t]) for t in TASKS}
    l0g = {t: jax.lax.map(lambda b: jax.value_and_grad(lm)(params, b), held[t]) for t in TASKS}
    fresh = preconditioner.init(params)

    def at_ratio(r):
      def at_pair(k):
        g = jax.tree.map(lambda c, s: r * c[k] + (1.0 - r) * s[k], grads["code"],
                         grads["prose"])
        direction = preconditioner.update(g, fresh, params)[0]
        fns = [functools.partial(lambda p, t: lm(p, held[t][k]), t=t) for t in TASKS]
        return curvature.relative_sharpness_matrix(
            fns, params, [direction], grads=[jax.tree.map(lambda x: x[k], l0g[t][1])
                                             for t in TASKS],
            loss0s=[l0g[t][0][k] for t in TASKS], step_guesses=probe.step_guess,
            tol_power=probe.tol_power, max_evals=probe.max_evals)
      per = jax.lax.map(at_pair, jnp.arange(next(iter(train.values())).shape[0]))
      return per, curvature.sharpness_band(per, axis=0)
    return jax.lax.map(at_ratio, ratios)
  return jax.jit(sweep)


def _finetune_fn(loss, preconditioner):
  """Jitted ``finetune(params, r, lr, train, held) -> [2]``: each task's held-out loss after
  ``len(train[task])`` steps of a fresh AdamW at constant ``lr`` on r·L_code + (1−r)·L_prose."""
  lm = lambda p, tokens: loss(p, {"tokens": tokens})

  def finetune(params, r, lr, train, held):
    def step(carry, batch):
      p, state = carry
      g = jax.grad(lambda q: r * lm(q, batch[0]) + (1.0 - r) * lm(q, batch[1]))(p)
      u, state = preconditioner.update(g, state, p)
      return (jax.tree.map(lambda a, b: a - lr * b, p, u), state), None
    (p, _), _ = jax.lax.scan(step, (params, preconditioner.init(params)),
                             (train["code"], train["prose"]))
    return jnp.stack([lm(p, held[t]) for t in TASKS])
  return jax.jit(finetune)


def _collect(workdir: str, run_dirs: dict[str, str], smoke: bool) -> dict[str, list[dict]]:
  """The probe sweep over ``RATIOS`` and the fine-tuning grid, from the pre-trained run."""
  del workdir
  config, setup, params, tasks = _pretrained(run_dirs["pretrain"])
  pairs, n_train, n_held = SIZES[smoke]
  rng = np.random.default_rng(config.seed)
  train = {t: _stack(tasks[t].train["tokens"], pairs, n_train, rng) for t in TASKS}
  held = {t: _stack(tasks[t].eval["tokens"], pairs, n_held) for t in TASKS}
  per, band = jax.device_get(_sweep_fn(setup.loss_fn, setup.preconditioner, config.probe)(
      params, train, held, jnp.asarray(RATIOS, jnp.float32)))
  sweep = [{"r": r, **{f"{t}/{k}": float(getattr(band, k)[i, ti, 0])
                       for ti, t in enumerate(TASKS) for k in ("median", "min", "max")},
            **{f"{t}/not_descent": int(band.num_not_descent[i, ti, 0]) for ti, t in
               enumerate(TASKS)},
            **{f"{t}/status": [int(s) for s in per.status[i, :, ti, 0]]
               for ti, t in enumerate(TASKS)}} for i, r in enumerate(RATIOS)]
  lrs = grid_learning_rates(sweep)
  steps = 2 if smoke else FT_STEPS
  ft_train = {t: _stack(tasks[t].train["tokens"], steps, n_train, rng) for t in TASKS}
  held_all = {t: h.reshape((-1,) + h.shape[2:]) for t, h in held.items()}
  finetune = _finetune_fn(setup.loss_fn, setup.preconditioner)
  before = np.asarray(jax.device_get(finetune(params, 0.0, 0.0, ft_train, held_all)))
  grid = []
  for r in GRID_RATIOS:
    for lr in lrs:
      after = np.asarray(jax.device_get(finetune(params, r, lr, ft_train, held_all)))
      grid.append({"r": r, "lr": float(lr), "steps": steps, **{f"{t}/before": float(before[i])
                                                for i, t in enumerate(TASKS)},
                   **{f"{t}/change": float(after[i] - before[i]) for i, t in enumerate(TASKS)}})
  return {"sweep": sweep, "grid": grid}


def _at(sweep: list[dict], key: str, r: float) -> float:
  return next(row[key] for row in sweep if abs(row["r"] - r) < 1e-9)


def grid_learning_rates(sweep: list[dict]) -> np.ndarray:
  """``GRID_LRS`` rates log-spaced from ⅓× the smallest to 3× the largest finite positive
  2/λ_c (median) of either task at ``GRID_RATIOS``."""
  eta = np.array([2.0 / _at(sweep, f"{t}/median", r) for r in GRID_RATIOS for t in TASKS])
  eta = eta[np.isfinite(eta) & (eta > 0)]
  if not eta.size:
    return np.geomspace(1e-4, 1e-1, GRID_LRS)
  return np.geomspace(eta.min() / 3.0, eta.max() * 3.0, GRID_LRS)


def crossing(sweep: list[dict]) -> tuple[float, float, int]:
  """``(r*, η*, sign changes)``: where log λ_code − log λ_prose (medians) changes sign, by
  linear interpolation (NaN when it never does; the first change when it does several
  times), and η* = 2/λ_c there, the largest usable η of the mix r*."""
  r = np.array([row["r"] for row in sweep])
  lam = {t: np.array([row[f"{t}/median"] for row in sweep]) for t in TASKS}
  with np.errstate(divide="ignore", invalid="ignore"):
    d = np.log(lam["code"]) - np.log(lam["prose"])  # ±inf where one side is 0 or inf
  sign = np.sign(d)
  ok = ~np.isnan(sign) & (sign != 0)
  rs, ds, ss = r[ok], d[ok], sign[ok]
  changes = np.flatnonzero(ss[1:] != ss[:-1])
  if not changes.size:
    return float("nan"), float("nan"), 0
  i = changes[0]
  w = (0.5 if not (np.isfinite(ds[i]) and np.isfinite(ds[i + 1]))
       else ds[i] / (ds[i] - ds[i + 1]))
  r_star = float(rs[i] + w * (rs[i + 1] - rs[i]))
  lam_star = max(float(np.exp(np.interp(r_star, r, np.log(lam[t])))) for t in TASKS)
  return r_star, 2.0 / lam_star, int(changes.size)


def prediction_table(rows: dict[str, list[dict]]) -> dict[str, int]:
  """Counts of (cell, task) cases: ``below`` (η < 2/λ_c^{task←mix(r)}), ``below_held`` (and
  the task's held-out loss did not rise), ``above``, ``above_held`` (and it rose); cases
  whose λ_c is NaN (no batch counted) are left out."""
  out = {"below": 0, "below_held": 0, "above": 0, "above_held": 0}
  for cell in rows["grid"]:
    for t in TASKS:
      lam = _at(rows["sweep"], f"{t}/median", cell["r"])
      if np.isnan(lam):
        continue
      rose = cell[f"{t}/change"] > 0
      side = "above" if cell["lr"] * lam > 2.0 else "below"
      out[side] += 1
      out[f"{side}_held"] += int(rose == (side == "above"))
  return out


CLAIM = ("(a) along the mix's update, λ_c^{code←mix(r)} falls and λ_c^{prose←mix(r)} rises "
         "from r = 0 to r = 1 (code share; medians over 8 pairs of training and held-out "
         "batches, the end points compared) and the two cross once, at r* strictly inside "
         "(0, 1); (b) over the 5 × 5 (r, η) fine-tuning grid (24 AdamW steps from the "
         "checkpoint), in the (cell, task) cases with η < 2/λ_c^{task←mix(r)} (at least 10 of "
         "the 50), the task's held-out loss does not rise in ≥ 80 % (the paper's \"in-basin "
         "runs do not deteriorate\"); the converse (η above → the loss rises) is reported, "
         "not judged")


def _judge(rows: dict[str, list[dict]]) -> tuple[str, bool | str]:
  sweep = rows["sweep"]
  ends = {t: (_at(sweep, f"{t}/median", 0.0), _at(sweep, f"{t}/median", 1.0)) for t in TASKS}
  r_star, eta_star, changes = crossing(sweep)
  shape = (ends["code"][1] < ends["code"][0] and ends["prose"][1] > ends["prose"][0]
           and changes == 1 and 0.0 < r_star < 1.0)
  c = prediction_table(rows)
  below = c["below_held"] / c["below"] if c["below"] else float("nan")
  text = (f"λ_c^code←mix: {ends['code'][0]:.3g} (r=0) → {ends['code'][1]:.3g} (r=1); "
          f"λ_c^prose←mix: {ends['prose'][0]:.3g} → {ends['prose'][1]:.3g}; crossing r* = "
          f"{r_star:.2f} ({changes} sign change(s)), largest usable η there 2/λ_c = "
          f"{eta_star:.3g}; grid: η below 2/λ_c and the loss did not rise in "
          f"{c['below_held']}/{c['below']} cases ({below:.0%}); converse, η above and it "
          f"rose, in {c['above_held']}/{c['above']}")
  good = (shape, c["below"] >= 10 and below >= 0.8)
  return text, True if all(good) else ("partly" if any(good) else False)


def _usable_lr(sweep: list[dict], t: str) -> tuple[np.ndarray, np.ndarray]:
  """``(r, 2/λ_c median)`` of task ``t`` where λ_c is finite and positive."""
  r = np.array([row["r"] for row in sweep])
  lam = np.array([row[f"{t}/median"] for row in sweep])
  ok = np.isfinite(lam) & (lam > 0)
  return r[ok], 2.0 / lam[ok]


def _plot_sweep(ax, sweep: list[dict], r_star: float, eta_star: float) -> None:
  r = np.array([row["r"] for row in sweep])
  for t, colour in zip(TASKS, ("C0", "C3")):
    med, lo, hi = (np.array([row[f"{t}/{k}"] for row in sweep]) for k in ("median", "min", "max"))
    top = np.nanmax(np.where(np.isfinite(hi), hi, np.nan)) * 3.0
    ax.fill_between(r, np.where(np.isfinite(lo), lo, top), np.where(np.isfinite(hi), hi, top),
                    color=colour, alpha=0.2, lw=0)
    fin = np.isfinite(med) & (med > 0)
    ax.plot(r[fin], med[fin], "o-", color=colour, ms=4, label=f"{t} loss (median, min–max)")
    if (~fin & np.isinf(med)).any():
      ax.plot(r[np.isinf(med)], np.full(np.isinf(med).sum(), 0.97), "^", color=colour, ms=7,
              transform=ax.get_xaxis_transform(), ls="none",
              label=f"{t}: the update raises it at every η")
  if np.isfinite(r_star):
    ax.axvline(r_star, color="k", ls=":", lw=1)
    ax.set_title(f"r* = {r_star:.2f}, largest usable η = 2/λ_c = {eta_star:.2g}", fontsize=9)
  ax.set_yscale("log")
  ax.set_xlabel("code share r of the fine-tuning mix")
  ax.set_ylabel(r"$\lambda_c^{task \leftarrow mix(r)}$")
  ax.legend(fontsize=7)


def _plot_grid(ax, rows: dict[str, list[dict]], t: str) -> Any:
  grid = rows["grid"]
  rs = np.array(sorted({c["r"] for c in grid}))
  lrs = np.array(sorted({c["lr"] for c in grid}))
  z = np.full((lrs.size, rs.size), np.nan)
  for c in grid:
    z[np.searchsorted(lrs, c["lr"]), np.searchsorted(rs, c["r"])] = c[f"{t}/change"]
  edges = lambda v, log: (np.exp(_edges(np.log(v))) if log else _edges(v))
  lim = np.nanmax(np.abs(z)) or 1.0
  mesh = ax.pcolormesh(edges(rs, False), edges(lrs, True), z, cmap="RdBu_r", vmin=-lim,
                       vmax=lim)
  for i, lr in enumerate(lrs):
    for j, r in enumerate(rs):
      ax.text(r, lr, f"{z[i, j]:+.2f}", ha="center", va="center", fontsize=6)
  r_t, eta_t = _usable_lr(rows["sweep"], t)
  ax.plot(r_t, eta_t, "w--", lw=1.5, label=f"2/λ_c of {t}")
  both = [_usable_lr(rows["sweep"], u) for u in TASKS]
  common = sorted(set(both[0][0]) & set(both[1][0]))
  ax.plot(common, [min(e[list(rr).index(r)] for rr, e in both) for r in common], "k--", lw=1,
          label="min over tasks")
  ax.set_yscale("log")
  ax.set_ylim(edges(lrs, True)[0], edges(lrs, True)[-1])
  ax.set_xlabel("code share r")
  ax.set_ylabel("fine-tuning η")
  ax.set_title(f"change of the held-out {t} loss after {grid[0]['steps']} AdamW steps",
               fontsize=9)
  ax.legend(fontsize=7, loc="lower left")
  return mesh


def _edges(v: np.ndarray) -> np.ndarray:
  mid = 0.5 * (v[1:] + v[:-1])
  return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def _plot(rows: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
  _plot_sweep(axes[0], rows["sweep"], *crossing(rows["sweep"])[:2])
  for ax, t in zip(axes[1:], TASKS):
    fig.colorbar(_plot_grid(ax, rows, t), ax=ax, shrink=0.85)
  fig.suptitle("Kalra et al. 2026 Fig. 5 in miniature: a GPT pre-trained on code, fine-tuning "
               "mixes of code and prose (no parameter update in the left panel)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


REPRODUCTIONS = (
    Reproduction("mixing", "Kalra et al. 2026, Fig. 5", CLAIM, _runs, _judge, _plot,
                 collect=_collect),
)
