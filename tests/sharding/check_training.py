"""The trainer on a device mesh (8 simulated devices; run by test_sharded_process.py).

References: the same config trained on one device (``mesh.shape=()``). The sharded runs
(data parallel over 8 devices, fully sharded on a 2×4 mesh) must give the same metrics up to
float32 reduction order: XLA sums the batch and the parameter contractions in per-shard partial
sums then all-reduces, so every value differs from the one-device run by a few ulps per step,
compounded over the steps. A 1e-5 relative tolerance is ~80 float32 ulps; the observed
differences after 8 steps are ≤ 1e-6 on losses. λ_c is compared to the search's own
resolution (``SEARCH_RTOL``); observed 1.3e-5 at XLA optimisation level 0.
"""

import json
import os

import jax
import numpy as np
import pytest

from experiments import config_lib
from experiments import sharding as sharding_lib
from experiments import trainer

STEPS = 8
# λ_c is the midpoint of a bracket placed from loss *differences* L(θ − ηΔθ) − L0, which
# cancel most digits of L: a few ulps of reduction order in L move the trial steps, so two
# correct programs agree on λ_c only to the search's guarantee. Both brackets hold η_c with
# 1 − lower/upper ≤ 2^−k, so their midpoints differ by at most 2^−k / (1 − 2^−k) relative.
TOL_POWER = 4
SEARCH_RTOL = 2.0 ** -TOL_POWER / (1 - 2.0 ** -TOL_POWER)


def _config(**overrides):
  base = {"num_steps": STEPS, "progress_bar": False, "plots": False, "log_every": 1,
          "eval_every": 4, "eval_examples": 32, "batch_size": 8, "model.depth": 1,
          "model.width": 32, "model.num_heads": 2, "data.context_length": 32,
          "data.max_chars": 50_000, "probe.lanczos_every": 0,
          "probe.preconditioned_every": 0, "probe.tol_power": TOL_POWER, "monitor.enabled": False,
          "checkpoint.every": 4, "checkpoint.async_save": False}
  base.update(overrides)
  return config_lib.load_config("configs/olmo_style.py:wsd,smoke", base)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("single"))
  trainer.train_and_evaluate(_config(), workdir)
  return _rows(workdir)


def _assert_same(rows, reference, rtol):
  assert [r["step"] for r in rows] == [r["step"] for r in reference]
  compared = 0
  for r, ref in zip(rows, reference):
    assert set(r) == set(ref), (r["step"], set(r) ^ set(ref))
    for key, want in ref.items():
      if key.startswith(("train/", "eval/", "curv/lambda")):
        np.testing.assert_allclose(r[key], want, rtol=rtol, err_msg=f"{key} at {r['step']}")
        compared += 1
      elif key.startswith(("curv/critical", "curv/step")):
        np.testing.assert_allclose(r[key], want, rtol=SEARCH_RTOL, err_msg=f"{key} at {r['step']}")
        compared += 1
      elif key.startswith("curv/status"):
        assert r[key] == want, (key, r["step"])
  assert compared > 5 * STEPS


def test_data_parallel_run_matches_one_device(devices, single, tmp_path):
  workdir = str(tmp_path / "dp")
  summary = trainer.train_and_evaluate(
      _config(**{"mesh.shape": (8,), "mesh.axis_names": ("data",)}), workdir)
  assert summary["jit_compilations"] == 1  # the state keeps its layout from step to step
  _assert_same(_rows(workdir), single, rtol=1e-5)


def test_fsdp_shards_parameters_and_optimizer_state(devices):
  config = _config(**{"mesh.shape": (2, 4), "mesh.axis_names": ("data", "fsdp"),
                      "mesh.layout": "fsdp"})
  mesh = sharding_lib.make_mesh(config.mesh)
  tree = {"w": np.zeros((32, 96), np.float32), "b": np.zeros((3,), np.float32),
          "s": np.zeros((), np.int32)}
  placed = sharding_lib.place(tree, sharding_lib.state_shardings(tree, mesh, "fsdp"))
  assert placed["w"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert placed["w"].addressable_shards[0].data.shape == (32, 24)  # 96 / 4 columns
  assert placed["b"].sharding.is_fully_replicated  # 3 is not divisible by 4
  info = sharding_lib.describe(placed)
  assert info["max_device_bytes"] == 32 * 24 * 4 + 3 * 4 + 4


def test_fsdp_run_resumed_on_another_mesh_matches_one_device(devices, single, tmp_path,
                                                            interrupt_at_row):
  """An 8-device FSDP run (2×4 mesh) crashes after a checkpoint; the same command resumes it on a
  4-device mesh: Orbax re-shards the restored state onto the new mesh (its checksums verified)
  and every row, before and after the crash, matches the one-device reference."""
  workdir = str(tmp_path / "moved")
  fsdp = {"mesh.shape": (2, 4), "mesh.axis_names": ("data", "fsdp"), "mesh.layout": "fsdp"}
  interrupt_at_row(lambda: trainer.train_and_evaluate(_config(**fsdp), workdir), 6)
  summary = trainer.train_and_evaluate(
      _config(**{"mesh.shape": (4,), "mesh.axis_names": ("data",), "mesh.layout": "fsdp"}),
      workdir)
  assert 0 < summary["resumed_from_step"] <= 6
  _assert_same(_rows(workdir), single, rtol=1e-5)


def test_batch_not_divisible_by_the_mesh_is_refused(devices, tmp_path):
  with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
    trainer.train_and_evaluate(_config(**{"mesh.shape": (8,), "batch_size": 12}),
                               str(tmp_path / "bad"))


def test_mesh_larger_than_the_machine_is_refused(devices, tmp_path):
  with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
    trainer.train_and_evaluate(_config(**{"mesh.shape": (16,)}), str(tmp_path / "big"))
