"""The command line, run once as a user would."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_runs_a_smoke_preset(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli("--config=configs/edge_of_stability.py:smoke", f"--workdir={workdir}",
              "--config.num_steps=5", "--config.probe.lanczos_every=0",
              "--config.progress_bar=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
  assert json.load(open(workdir / "config.json"))["num_steps"] == 5
  assert (workdir / "plots" / "sharpness.png").exists()


def test_cli_bad_key_fails_naming_it(tmp_path):
  proc = _cli("--config=configs/edge_of_stability.py:smoke", f"--workdir={tmp_path}",
              "--config.optimizer.nme=adam")
  assert proc.returncode != 0
  assert "nme" in proc.stderr and "Traceback" not in proc.stderr
