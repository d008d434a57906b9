"""Two processes joined by ``jax.distributed`` (2 simulated CPU devices each, Gloo collectives)
train one run on a 4-device mesh, as on two hosts; the reference is one process with 4 devices.

Each process runs the CLI (``python -m experiments.run ... --config.distributed.*``) on the same
workdir: both take part in the Orbax saves, asynchronous (Orbax writes on its own thread while
training continues; the manager's collectives stay on the main thread); process 0 alone writes
the metrics. The global
batch is assembled from each process's rows (``jax.make_array_from_process_local_data``), so
the metrics must equal the one-process run's up to the order of the cross-process reductions
(float32; 1e-5 relative, ~80 ulps; observed ≤ 1e-6).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
TOL_POWER = 4
SEARCH_RTOL = 2.0 ** -TOL_POWER / (1 - 2.0 ** -TOL_POWER)  # two midpoints of brackets holding η_c
FLAGS = ["--config=configs/olmo_style.py:wsd,smoke", "--config.num_steps=6",
         "--config.progress_bar=False", "--config.plots=False", "--config.batch_size=8",
         "--config.eval_examples=16", "--config.eval_every=3", "--config.model.depth=1",
         "--config.model.width=32", "--config.model.num_heads=2",
         "--config.data.context_length=32", "--config.data.max_chars=50000",
         "--config.probe.lanczos_every=0",
         "--config.probe.preconditioned_every=0", "--config.monitor.enabled=False",
         "--config.checkpoint.every=2", "--config.checkpoint.async_save=True",
         "--config.mesh.shape=(4,)", f"--config.probe.tol_power={TOL_POWER}"]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  kept = [f for f in env.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  run = tmp_path / "two_hosts"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.run", *FLAGS, f"--workdir={run}",
       "--config.distributed.initialize=True",
       f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  ref = tmp_path / "one_host"
  single = subprocess.run([sys.executable, "-m", "experiments.run", *FLAGS, f"--workdir={ref}"],
                          cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=900)
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-6000:]}"
  assert single.returncode == 0, single.stderr[-6000:]

  rows, want = _rows(run), _rows(ref)
  assert [r["step"] for r in rows] == [r["step"] for r in want] == list(range(7))
  compared = 0
  for r, w in zip(rows, want):
    assert set(r) == set(w)
    for key in w:
      # Float32 reduction order differs between the programs (1e-5 ≈ 80 ulps); λ_c and its
      # step agree to the search's own resolution (see check_training.SEARCH_RTOL).
      if key.startswith(("train/", "eval/", "curv/lambda")):
        np.testing.assert_allclose(r[key], w[key], rtol=1e-5, err_msg=f"{key} at {r['step']}")
        compared += 1
      elif key.startswith(("curv/critical", "curv/step")):
        np.testing.assert_allclose(r[key], w[key], rtol=SEARCH_RTOL,
                                   err_msg=f"{key} at {r['step']}")
        compared += 1
  assert compared > 25
  # Both processes saved together: the same committed steps as the one-process run.
  steps = lambda d: sorted(n for n in os.listdir(d / "checkpoints") if n.isdigit())
  assert steps(run) == steps(ref) and steps(run)
