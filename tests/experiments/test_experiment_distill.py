"""End-to-end smoke tests of the distillation experiment (configs/distill.py), shrunk further.

One teacher is trained (through the runner's trainer) per module and reused by the other runs
via ``distill.teacher_dir`` (its checkpoint is loaded), so the whole file stays well under 60 s.
"""

import importlib.util
import json
import math
import os

import pytest

from experiments import distillation

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _get_config(arg):
  spec = importlib.util.spec_from_file_location(
      "distill_config", os.path.join(_ROOT, "configs", "distill.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _tiny(arg, teacher_dir=""):
  c = _get_config(arg)
  c.num_steps = 4
  c.eval_every = 2
  c.log_every = 1
  c.batch_size = 4
  c.eval_examples = 8
  c.data.max_chars = 50_000
  c.data.context_length = 16
  c.schedule.warmup_steps = 2
  c.distill.teacher.num_steps = 3
  c.distill.teacher.depth = 2
  c.distill.teacher.width = 32
  c.distill.teacher_dir = teacher_dir
  return c


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hinton_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("distill") / "hinton")
  return workdir, distillation.distill_and_evaluate(_tiny("hinton,smoke"), workdir)


def test_hinton_smoke_trains_teacher_and_writes_run(hinton_run):
  workdir, summary = hinton_run
  assert summary["trained_here"] and summary["jit_compilations"] == 1
  assert os.path.exists(os.path.join(workdir, "teacher", "metrics.jsonl"))
  rows = _rows(workdir)
  assert {"distill/ce", "distill/kd", "train/loss"} <= set(rows[0])
  final = rows[-1]
  assert final["step"] == 4
  assert math.isclose(final["eval/perplexity"], math.exp(final["eval/loss"]), rel_tol=1e-5)
  assert final["eval/loss"] == pytest.approx(summary["eval/loss"])
  assert os.path.getsize(os.path.join(workdir, "plots", "distill.png")) > 1000


@pytest.mark.parametrize("method", ["fused"])  # all five terms; ce is the subset
def test_methods_with_loaded_teacher(hinton_run, tmp_path, method):
  teacher_dir = hinton_run[1]["teacher_dir"]
  summary = distillation.distill_and_evaluate(_tiny(f"{method},smoke", teacher_dir),
                                              str(tmp_path))
  assert not summary["trained_here"]
  # The loaded teacher is the trained one: same eval loss as in the first run.
  assert summary["teacher/eval_loss"] == pytest.approx(hinton_run[1]["teacher/eval_loss"],
                                                      rel=1e-5)
  rows = _rows(str(tmp_path))
  terms = {"ce"} if method == "ce" else set(distillation.TERMS)
  assert {f"distill/{t}" for t in terms} <= set(rows[0])
  assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  assert os.path.exists(os.path.join(str(tmp_path), "plots", "distill.png"))


def test_bad_distill_block_rejected():
  c = _tiny("hinton,smoke")
  c.distill.method = "hintn"
  with pytest.raises(ValueError, match="distill.method"):
    distillation.validate(c)
  with pytest.raises(ValueError, match="unknown preset"):
    _get_config("nope")
