"""Runs the ``tests/sharding/check_*.py`` modules in one child process with 8 simulated devices.

JAX fixes the number of CPU devices when its backend starts, and the rest of the suite has
started it with one device by the time this module runs; so the check modules run together in
a fresh ``python -m pytest`` child with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(``python -m pytest tests/sharding/check_probes.py`` with that variable set runs one by hand).
One child for all of them: its start-up (imports, the 8-device backend) is paid once. The
child's output, which names every failing check, is shown when it fails.
"""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHECKS = sorted(p.name for p in HERE.glob("check_*.py"))
NUM_DEVICES = 8


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTEST_XDIST_WORKER", None)
  return env


def test_sharded_modules():
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       *[str(HERE / module) for module in CHECKS]],
      cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
  if proc.returncode != 0:
    pytest.fail(f"a check failed in the 8-device process (rc={proc.returncode}):\n"
                f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}", pytrace=False)
  assert "passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout


def test_check_modules_exist():
  assert CHECKS, "no tests/sharding/check_*.py modules found"
