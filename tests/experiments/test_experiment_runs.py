"""End-to-end runs of every config's smoke preset, shrunk further, through train_and_evaluate."""

import json
import math
import os

import pytest

import curvature
from experiments import config_lib
from experiments import trainer


def _run(tmp_path, spec, name, monitor=False, **overrides):
  # The convergence monitor is tested on its own (test_experiment_monitor.py, with this file's
  # edge-of-stability smoke run); off elsewhere, its network's compilation is not repeated.
  config = config_lib.load_config(
      spec, {"progress_bar": False, "monitor.enabled": monitor, **overrides})
  workdir = str(tmp_path / name)
  return workdir, trainer.train_and_evaluate(config, workdir)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _check_run_dir(workdir, num_steps, plots=("sharpness.png",)):
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["num_steps"] == num_steps
  rows = _rows(workdir)
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == list(range(num_steps))
  for r in train:
    assert math.isfinite(r["train/loss"]), r
    assert math.isfinite(r["curv/critical_sharpness"]) and r["curv/critical_sharpness"] > 0, r
    assert r["curv/status"] == curvature.STATUS_OK, r
    assert math.isclose(r["curv/lr_sharpness"], r["train/lr"] * r["curv/critical_sharpness"],
                        rel_tol=1e-5)
  assert rows[-1]["step"] == num_steps and math.isfinite(rows[-1]["eval/loss"])
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  for p in plots:
    assert os.path.getsize(os.path.join(workdir, "plots", p)) > 10_000
  return rows


def test_edge_of_stability_smoke(tmp_path):
  workdir, summary = _run(tmp_path, "configs/edge_of_stability.py:smoke", "eos", monitor=True,
                          num_steps=12, **{"probe.lanczos_every": 6, "probe.lanczos_iters": 8,
                                           "eval_every": 6})
  rows = _check_run_dir(workdir, 12)
  lam = {r["step"]: r["curv/lambda_max"] for r in rows if "curv/lambda_max" in r}
  assert sorted(lam) == [0, 6, 11]  # every 6 steps and the last step
  assert all(v > 0 and math.isfinite(v) for v in lam.values())
  # The Lanczos result's own convergence flag travels with each value (issue 10 §4.8).
  conv = {r["step"]: r["curv/lambda_max_converged"] for r in rows
          if "curv/lambda_max_converged" in r}
  assert sorted(conv) == sorted(lam) and set(conv.values()) <= {0, 1}
  # GD: λ_c along the gradient is a weighted mean of the Hessian's eigenvalues, ≤ λ_max.
  for step, v in lam.items():
    assert rows[step]["curv/critical_sharpness"] <= 1.05 * v
  assert all(math.isfinite(r["curv/directional_sharpness"]) for r in rows if "train/loss" in r)
  assert summary["jit_compilations"] == 1  # nothing recompiled after the first step
  assert 0 <= summary["eval/accuracy"] <= 1


@pytest.mark.skipif(not hasattr(curvature, "preconditioned_sharpness"),
                    reason="curvature.preconditioned_sharpness is not exported yet")
def test_edge_of_stability_adam_smoke(tmp_path):
  workdir, summary = _run(tmp_path, "configs/edge_of_stability.py:adam,smoke", "eos_adam",
                          num_steps=6, **{"probe.preconditioned_every": 5,
                                          "probe.lanczos_iters": 8, "eval_every": 0})
  rows = _check_run_dir(workdir, 6)
  ph = [r["curv/preconditioned_sharpness"] for r in rows if "curv/preconditioned_sharpness" in r]
  assert len(ph) == 2 and all(v > 0 and math.isfinite(v) for v in ph)
  conv = [r["curv/preconditioned_converged"] for r in rows
          if "curv/preconditioned_sharpness" in r]
  assert len(conv) == 2 and set(conv) <= {0, 1}
  assert summary["jit_compilations"] == 1


def test_olmo_style_smoke(tmp_path):
  # λ^PH is exercised by the Adam test above on the MLP; compiling GPT Lanczos costs ~15 s.
  workdir, summary = _run(tmp_path, "configs/olmo_style.py:wsd,smoke", "olmo", num_steps=10,
                          **{"probe.preconditioned_every": 0, "eval_every": 5,
                             "schedule.warmup_steps": 3})
  rows = _check_run_dir(workdir, 10)
  lrs = [r["train/lr"] for r in rows if "train/lr" in r]
  assert lrs[0] < lrs[2] == pytest.approx(3e-3)  # warmup, then the stable phase
  assert lrs[-1] < lrs[2]  # WSD decays over the last quarter
  assert summary["jit_compilations"] == 1


def test_same_seed_gives_identical_metrics(tmp_path, compile_cache):  # pylint: disable=unused-argument
  # compile_cache: run b executes run a's compiled programs (execution must be deterministic).
  overrides = {"num_steps": 8, "probe.lanczos_every": 4, "probe.lanczos_iters": 6,
               "eval_every": 4, "plots": False}
  a, _ = _run(tmp_path, "configs/edge_of_stability.py:smoke", "a", **overrides)
  b, _ = _run(tmp_path, "configs/edge_of_stability.py:smoke", "b", **overrides)
  read = lambda d: open(os.path.join(d, "metrics.jsonl"), "rb").read()
  assert read(a) == read(b)
  # ... and the seed matters (a cheaper run: no Lanczos to compile).
  overrides.update({"num_steps": 2, "probe.lanczos_every": 0})
  c, _ = _run(tmp_path, "configs/edge_of_stability.py:smoke", "c", seed=1, **overrides)
  assert _rows(a)[0]["train/loss"] != _rows(c)[0]["train/loss"]


def test_divergence_stops_with_message_and_keeps_metrics(tmp_path):
  config = config_lib.load_config(
      "configs/edge_of_stability.py:smoke",
      {"progress_bar": False, "num_steps": 50, "optimizer.learning_rate": 50.0,
       "probe.lanczos_every": 0, "eval_every": 0})
  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.TrainingDiverged, match="non-finite.*at step"):
    trainer.train_and_evaluate(config, workdir)
  rows = _rows(workdir)
  assert not math.isfinite(rows[-1]["train/loss"])
  assert [r["step"] for r in rows] == list(range(len(rows)))  # every step up to the NaN
  assert os.path.exists(os.path.join(workdir, "plots", "sharpness.png"))
