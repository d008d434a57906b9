"""Exact resume of the runner (issue 3 §6–7): interrupted + resumed runs write the same bytes.

Each test runs a smoke config straight through, then again in another workdir interrupted at
step k (an exception raised while row k is written, or a SIGKILL of ``python -m experiments.run``),
resumes it, and compares ``metrics.jsonl`` line by line as strings.

Compilation dominates these runs (~10–30 s per config on the shared CPU, < 1 s of steps), so
the module turns on JAX's persistent compilation cache in a temporary folder: the interrupted
and resumed runs (and the subprocesses) load the executables the straight run compiled. The
cache stores XLA's output for the same HLO, so the numbers are those of a fresh compile.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import checkpointing
from experiments import config_lib
from experiments import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("compile_cache")


def _config(spec, **overrides):
  return config_lib.load_config(spec, {"progress_bar": False, "plots": False, **overrides})


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return f.read().splitlines()


def _audit_lines(workdir):
  with open(os.path.join(workdir, "audit.jsonl"), encoding="utf-8") as f:
    return f.read().splitlines()


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _flip_bytes(workdir, step):
  """Corrupts the largest array file of checkpoint ``step`` (4 bytes in its middle)."""
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
           if os.path.basename(d) == "d"]
  path = max(files, key=os.path.getsize)
  raw = bytearray(open(path, "rb").read())
  for i in range(len(raw) // 2, len(raw) // 2 + 4):
    raw[i] ^= 0xA5
  with open(path, "wb") as f:
    f.write(bytes(raw))


def test_full_batch_resume_after_crash_and_corrupt_checkpoint_is_bit_exact(tmp_path,
                                                                           interrupt_at_row):
  config = _config("configs/edge_of_stability.py:smoke", num_steps=12,
                   **{"probe.lanczos_every": 5, "probe.lanczos_iters": 6, "eval_every": 4,
                      "checkpoint.every": 4})
  straight = str(tmp_path / "straight")
  trainer.train_and_evaluate(config, straight)

  resumed = str(tmp_path / "resumed")
  interrupt_at_row(lambda: trainer.train_and_evaluate(config, resumed), 10)
  assert _steps(resumed) == [4, 8]
  assert len(_lines(resumed)) == 10  # rows 0..9 written before the crash
  # The newest checkpoint is damaged: the resume must refuse it, fall back to step 4, delete
  # step 8 (rollback) and rewrite rows 4.. identically.
  _flip_bytes(resumed, 8)
  summary = trainer.train_and_evaluate(config, resumed)
  assert summary["resumed_from_step"] == 4 and summary["steps"] == 12
  assert summary["jit_compilations"] == 1
  want = _lines(straight)
  assert _lines(resumed) == want
  assert "curv/lambda_max" in want[5] and "curv/directional_sharpness" in want[5]
  assert "eval/loss" in want[8]
  # The monitor's rows (posterior, evidence, anomaly flags) and its audit log resume exactly:
  # its detector, windows and network state travel in the checkpoint.
  assert '"monitor/p_converged"' in want[5] and '"monitor/anomaly": 0' in want[5]
  assert _audit_lines(resumed) == _audit_lines(straight)
  assert _steps(resumed) == [4, 8, 12] == _steps(straight)
  log = [json.loads(line) for line in open(os.path.join(resumed, "resume_log.jsonl"))]
  assert [(e["restored_step"], e["skipped_corrupt"], e["kept_metric_rows"]) for e in log] == [
      (4, [8], 4)]

  # A finished run resumes at its end: nothing is trained, the final row is rewritten.
  summary = trainer.train_and_evaluate(config, resumed)
  assert summary["resumed_from_step"] == 12
  assert _lines(resumed) == want

  # A field that changes the maths is refused, naming it, before anything runs.
  changed = _config("configs/edge_of_stability.py:smoke", num_steps=12,
                    **{"probe.lanczos_every": 5, "probe.lanczos_iters": 6, "eval_every": 4,
                       "checkpoint.every": 4, "optimizer.learning_rate": 0.05})
  with pytest.raises(checkpointing.ResumeRefused,
                     match=r"(?s)optimizer\.learning_rate: 0\.1 → 0\.05.*resume=False"):
    trainer.train_and_evaluate(changed, resumed)
  assert _lines(resumed) == want


def test_minibatch_gpt_resume_restores_the_data_position(tmp_path, interrupt_at_row):
  config = _config("configs/olmo_style.py:wsd,smoke", num_steps=10,
                   **{"probe.preconditioned_every": 0, "eval_every": 5,
                      "schedule.warmup_steps": 3, "checkpoint.every": 3,
                      # What this test is about is the data position; the monitor's and the
                      # probes' states are resumed in the full-batch test above.
                      "probe.lanczos_every": 0, "monitor.enabled": False,
                      "checkpoint.save_initial": True})
  straight = str(tmp_path / "straight")
  trainer.train_and_evaluate(config, straight)

  resumed = str(tmp_path / "resumed")
  # Stopped exactly at a checkpoint step: row 6 is the first row the resumed run writes.
  interrupt_at_row(lambda: trainer.train_and_evaluate(config, resumed), 6)
  assert _steps(resumed) == [0, 3, 6]
  summary = trainer.train_and_evaluate(config, resumed)
  assert summary["resumed_from_step"] == 6 and summary["jit_compilations"] == 1
  assert _lines(resumed) == _lines(straight)

  # Stopped before the first regular save: the initial checkpoint (no batch drawn yet) is a
  # fresh start.
  early = str(tmp_path / "early")
  interrupt_at_row(lambda: trainer.train_and_evaluate(config, early), 2)
  assert _steps(early) == [0]
  mgr = checkpointing.make_manager(config, early)
  assert mgr.restore(0).metadata["data_position"] == {"epoch": 0, "index": 0, "seed": 0}
  mgr.close()
  summary = trainer.train_and_evaluate(config, early)
  assert summary["resumed_from_step"] == 0
  assert _lines(early) == _lines(straight)

  # The checkpoint holds the iterator position (9 batches of 8 drawn) and the config.
  mgr = checkpointing.make_manager(config, resumed)
  meta = mgr.restore(9).metadata
  mgr.close()
  assert meta["data_position"] == {"epoch": 0, "index": 9 * 8, "seed": 0}
  assert meta["config"] == checkpointing.config_json(config)


def test_resume_false_moves_the_old_run_aside_and_overrides(tmp_path):
  # Resume bookkeeping only: the monitor (resumed in the full-batch test) stays off.
  config = _config("configs/edge_of_stability.py:smoke", num_steps=2,
                   **{"probe.lanczos_every": 0, "eval_every": 0, "monitor.enabled": False})
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  first = _lines(workdir)
  fresh = _config("configs/edge_of_stability.py:smoke", num_steps=2,
                  **{"probe.lanczos_every": 0, "eval_every": 0, "monitor.enabled": False, "checkpoint.resume": False,
                     "optimizer.learning_rate": 0.05})
  summary = trainer.train_and_evaluate(fresh, workdir)
  assert summary["resumed_from_step"] is None
  assert _lines(str(tmp_path / "run.prev-1")) == first
  assert _lines(workdir) != first and _steps(workdir) == [2]

  # allow_config_change continues the saved state under the new config (here: longer).
  longer = _config("configs/edge_of_stability.py:smoke", num_steps=3,
                   **{"probe.lanczos_every": 0, "eval_every": 0, "monitor.enabled": False,
                      "optimizer.learning_rate": 0.05, "checkpoint.allow_config_change": True})
  summary = trainer.train_and_evaluate(longer, workdir)
  assert summary["resumed_from_step"] == 2
  assert [json.loads(line)["step"] for line in _lines(workdir)] == [0, 1, 2, 3]
  log = [json.loads(line) for line in open(os.path.join(workdir, "resume_log.jsonl"))]
  assert "num_steps: 2 → 3" in log[-1]["config_changes"]
  # The first state under the new hyper-parameters is a forced save that says why.
  ledger = json.load(open(os.path.join(workdir, "checkpoints", "tiers.json")))["records"]
  assert ledger["3"]["kind"] == "forced"
  assert "hyper-parameter change on resume: num_steps: 2 → 3" in ledger["3"]["reason"]


def test_checkpoint_config_is_validated():
  for key, value, match in [("checkpoint.every", 0, "checkpoint.every=0: must be >= 1"),
                            ("checkpoint.keep_candidate", -2, "keep all"),
                            ("checkpoint.candidate_mode", "best", "'min', 'max'")]:
    with pytest.raises(ValueError, match=match):
      _config("configs/edge_of_stability.py:smoke", **{key: value})


def test_config_differences_separate_safe_fields():
  saved = {"plots": True, "optimizer": {"learning_rate": 0.1}, "checkpoint": {"every": 5},
           "probe": {"lanczos_every": 10, "relative_every": 2}}
  current = {"plots": False, "optimizer": {"learning_rate": 0.1}, "checkpoint": {"every": 7},
             "probe": {"lanczos_every": 0, "relative_every": 3}}
  blocking, safe = checkpointing.config_differences(saved, current)
  assert blocking == ["probe.relative_every: 2 → 3"]
  assert len(safe) == 3


# --------------------------------------------------------------------------- SIGKILL


def test_sigkilled_cli_data_mixing_run_resumes_to_identical_metrics(tmp_path, compile_cache):
  """``python -m experiments.run`` SIGKILLed at a seeded random step, rerun → same metrics.jsonl.

  data_mixing: two data iterators, and the relative-sharpness searches warm-start from the
  previous measurement (host-side state that the checkpoint must carry). The straight run is
  also the data_mixing smoke test: the relative matrix every 3 steps, both evaluation losses,
  its plots, and one compilation of the step.
  """
  # The monitor's state in a checkpoint is resumed in the full-batch test; off here, its
  # compilation would be most of this test's time.
  # Two held-out batches per task are enough to carry the warm start through a resume.
  flags = {"num_steps": 20, "probe.relative_every": 3, "probe.relative_batches": 2,
           "eval_every": 10,
           "checkpoint.every": 4, "progress_bar": False, "plots": False,
           "monitor.enabled": False}
  rng = np.random.default_rng(2024)
  kill_after_rows = int(rng.integers(6, 14))  # after ≥ 1 checkpoint committed
  straight = str(tmp_path / "straight")
  summary = trainer.train_and_evaluate(
      _config("configs/data_mixing.py:smoke", **{**flags, "plots": True}), straight)
  want = _lines(straight)
  rows = [json.loads(line) for line in want]
  keys = [f"curv/relative/{a}_along_{b}" for a in ("code", "prose") for b in ("code", "prose")]
  measured = [r for r in rows if keys[0] in r]
  assert [r["step"] for r in measured] == [0, 3, 6, 9, 12, 15, 18, 19]  # and the last step
  for r in measured:
    for k in keys:
      assert math.isfinite(r[k]) and r[k] >= 0, (k, r[k])
  assert {"eval/code_loss", "eval/prose_loss"} <= set(rows[-1])
  for plot in ("sharpness.png", "relative_sharpness.png"):
    assert os.path.getsize(os.path.join(straight, "plots", plot)) > 10_000
  assert summary["jit_compilations"] == 1

  workdir = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  argv = [sys.executable, "-m", "experiments.run", "--config=configs/data_mixing.py:smoke",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]
  metrics = workdir / "metrics.jsonl"
  with open(tmp_path / "killed.err", "w") as err:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    rows = 0
    while proc.poll() is None and time.monotonic() < deadline:
      if metrics.exists():
        rows = metrics.read_bytes().count(b"\n")
        if rows >= kill_after_rows and _steps(str(workdir)):
          break
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, (
      f"the run ended before the kill (rc {proc.returncode}, {rows} rows):\n"
      + (tmp_path / "killed.err").read_text()[-3000:])
  assert len(_lines(str(workdir))) < len(want)

  proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _lines(str(workdir)) == want
  log = [json.loads(line) for line in open(workdir / "resume_log.jsonl")]
  assert len(log) == 1 and log[0]["restored_step"] % 4 == 0 and log[0]["restored_step"] >= 4
