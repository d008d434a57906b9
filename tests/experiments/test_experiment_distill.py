"""End-to-end smoke tests of the distillation experiment (configs/distill.py), shrunk further.

One teacher is trained (through the runner's trainer) per module and reused by the other runs
via ``distill.teacher_dir`` (its checkpoint is loaded). The gated + adaptive run is done once
straight through (``adaptive_run``) and once interrupted and resumed; the persistent
compilation cache (``compile_cache``) lets the repeats load the straight run's executables.
"""

import importlib.util
import json
import math
import os

import ml_collections
import numpy as np
import pytest
from flax import nnx

import distill
from experiments import config_lib
from experiments import data as data_lib
from experiments import distill_objective
from experiments import distillation

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("compile_cache")


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


def _adaptive(teacher_dir):
  """Gated fusion + controller, 6 steps, checkpoints at 2, 4, 6; the controller evaluates
  every step with thresholds that make each rule fire on schedule (see the tests)."""
  c = _tiny("fused,adaptive,smoke", teacher_dir)
  c.num_steps = 6
  c.checkpoint.every = 2
  c.plots = False
  k = c.distill.controller
  k.every = 1
  k.window = 2  # a transition every 2 evaluations ...
  k.rtol = 1e9  # ... since every metric counts as stable
  k.num_stages = 3  # stages 0, 1, 2
  k.gap_threshold = -1e9  # the generalization-gap rule fires at every evaluation
  k.clip_spread = 1.0  # spread >= 1 always: per-layer clipping from the first evaluation
  return c


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


@pytest.fixture(scope="module")
def hinton_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("distill") / "hinton")
  return workdir, distillation.distill_and_evaluate(_tiny("hinton,smoke"), workdir)


@pytest.fixture(scope="module")
def adaptive_run(hinton_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("distill") / "adaptive")
  config = _adaptive(hinton_run[1]["teacher_dir"])
  return workdir, distillation.distill_and_evaluate(config, workdir)


def test_hinton_smoke_trains_teacher_and_writes_run(hinton_run):
  workdir, summary = hinton_run
  assert summary["trained_here"] and summary["jit_compilations"] == 1
  assert os.path.exists(os.path.join(workdir, "teacher", "metrics.jsonl"))
  rows = _rows(workdir)
  assert {"distill/ce", "distill/kd", "train/loss"} <= set(rows[0])
  # Fixed fusion = Hinton's mix alpha·ce + (1 − alpha)·kd (alpha = 0.5).
  r = rows[0]
  assert r["train/loss"] == pytest.approx(0.5 * r["distill/ce"] + 0.5 * r["distill/kd"],
                                          rel=1e-6)
  final = rows[-1]
  assert final["step"] == 4
  assert math.isclose(final["eval/perplexity"], math.exp(final["eval/loss"]), rel_tol=1e-5)
  assert final["eval/loss"] == pytest.approx(summary["eval/loss"])
  assert os.path.getsize(os.path.join(workdir, "plots", "distill.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-2] == "4"  # end of run


def test_gated_fusion_weights_are_logged_and_trained(adaptive_run, hinton_run):
  workdir, summary = adaptive_run
  assert summary["fusion"] == "gated" and not summary["trained_here"]
  assert summary["jit_compilations"] == 1  # controller decisions are traced: no recompiles
  # The loaded teacher is the trained one: same eval loss as in the first run.
  assert summary["teacher/eval_loss"] == pytest.approx(hinton_run[1]["teacher/eval_loss"],
                                                      rel=1e-5)
  rows = [r for r in _rows(workdir) if "train/loss" in r]
  terms = config_lib.DISTILL_TERMS
  for r in rows:
    assert all(math.isfinite(r[f"distill/{t}"]) for t in terms)
    assert sum(r[f"distill/weight/{t}"] for t in terms) == pytest.approx(1.0, abs=1e-6)
  # The gate's output layer starts at zero: uniform weights, and the fused total is the mean
  # of the (controller-scaled) terms, recomputed here from the logged terms.
  first = rows[0]
  assert [first[f"distill/weight/{t}"] for t in terms] == pytest.approx([0.2] * 5, abs=1e-7)
  expected = sum(0.2 * first[f"distill/scale/{t}"] * first[f"distill/{t}"] for t in terms)
  assert first["train/loss"] == pytest.approx(expected, rel=1e-6)
  # Trained jointly: its parameters moved, so the weights left 1/K (>= the floor 0.05).
  last = rows[-1]
  assert max(abs(last[f"distill/weight/{t}"] - 0.2) for t in terms) > 1e-3
  assert min(last[f"distill/weight/{t}"] for t in terms) >= 0.05 - 1e-7


def test_controller_decisions_follow_its_rules(adaptive_run):
  workdir, summary = adaptive_run
  rows = {r["step"]: r for r in _rows(workdir) if "train/loss" in r}
  # Evaluations at steps 1..5; the gap rule multiplies c_kd by 1.25 each time (bound 4), a
  # transition every 2 evaluations up to stage 2, each stage halving the non-CE terms.
  for t in range(6):
    stage = min(t // 2, 2)
    c_kd = min(1.25 ** t, 4.0)
    assert rows[t]["distill/scale/kd"] == pytest.approx(c_kd * 0.5 ** stage, rel=1e-6)
    assert rows[t]["distill/scale/features"] == pytest.approx(0.5 ** stage, rel=1e-6)
    assert rows[t]["distill/scale/ce"] == 1.0
    assert rows[t]["clip/mode"] == (0 if t == 0 else 1)  # global, then per layer
    if t:
      assert rows[t]["controller/stage"] == stage
  audit = [json.loads(line) for line in _lines(os.path.join(workdir, "controller_audit.jsonl"))]
  events = [(a["step"], a["event"]) for a in audit]
  assert events == [(1, "reweight"), (1, "clip_mode"), (2, "reweight"),
                    (2, "stage_transition"), (3, "reweight"), (4, "reweight"),
                    (4, "stage_transition"), (5, "reweight")]
  assert audit[-1]["after"]["kd"] == pytest.approx(1.25 ** 5, rel=1e-6)
  assert summary["controller/stage"] == 2 and summary["controller/audit_records"] == 8


def test_interrupted_and_resumed_run_equals_straight_run(adaptive_run, tmp_path,
                                                         interrupt_at_row):
  straight_dir, straight = adaptive_run
  workdir = str(tmp_path / "resumed")
  config = _adaptive(straight["teacher_dir"])
  # Row 5: after checkpoint 4 and the controller's audit record of step 5.
  interrupt_at_row(lambda: distillation.distill_and_evaluate(config, workdir), 5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["2", "4"]
  assert any('"step": 5' in line for line in
             _lines(os.path.join(workdir, "controller_audit.jsonl")))
  resumed = distillation.distill_and_evaluate(config, workdir)
  assert resumed["resumed_from_step"] == 4 and resumed["jit_compilations"] == 1
  assert resumed["eval/loss"] == straight["eval/loss"]  # exact
  for name in ("metrics.jsonl", "controller_audit.jsonl"):
    assert _lines(os.path.join(workdir, name)) == _lines(os.path.join(straight_dir, name))
  log = [json.loads(line) for line in _lines(os.path.join(workdir, "resume_log.jsonl"))]
  assert [e["restored_step"] for e in log] == [4]


def test_uncertainty_fusion_stays_selectable():
  """fusion='uncertainty' builds Kendall weighting whose log-variances are objective params
  (so they sit in the optimizer state beside the student's); 'fused' defaults to the gate."""
  c = config_lib.validate_config(_tiny("fused,smoke"))
  assert c.distill.fusion == "gated"
  c = _tiny("fused,smoke")
  c.distill.fusion = "uncertainty"
  c = config_lib.validate_config(c)
  obj = distill_objective.Objective(c, c.model, c.distill.teacher, nnx.Rngs(params=0))
  assert isinstance(obj.fusion, distill.UncertaintyFusion)
  params = nnx.to_pure_dict(nnx.state(obj, nnx.Param))
  np.testing.assert_array_equal(params["fusion"]["log_vars"], np.zeros(5, np.float32))


def test_optimizer_does_not_train_the_mmd_bandwidths():
  """Regression: the MMD kernel's log-bandwidths were an ``nnx.Param`` of the objective, so
  the student's optimizer minimised MMD over the kernel and collapsed it. The objective's
  parameters (what the optimizer trains) are now the width projections and the fusion only."""
  c = config_lib.validate_config(_tiny("features,smoke"))
  assert config_lib.parse_feature_slices(c.distill.feature_slices)["pre_act"] == "mmd"
  obj = distill_objective.Objective(c, c.model, c.distill.teacher, nnx.Rngs(params=0))
  assert "pre_act" in obj.distiller.kernels
  params = nnx.to_pure_dict(nnx.state(obj, nnx.Param))
  assert set(params["distiller"]) == {"projections"}, params["distiller"].keys()


def test_every_term_is_in_the_schema():
  assert tuple(distill_objective.TERMS) == config_lib.DISTILL_TERMS
  assert set(config_lib.METHOD_TERMS) == set(config_lib.DISTILL_METHODS)


def test_token_types_of_characters():
  table = distill_objective.token_type_table(data_lib.CharVocab.ascii().chars)
  vocab = data_lib.CharVocab.ascii()
  got = [int(table[i]) for i in vocab.encode("a_Z9 \n\t(=\ufffd")]
  assert got == [0, 0, 0, 1, 2, 2, 2, 3, 3, 3]
  assert distill_objective.gate_feature_names(("ce", "kd"))[-4:] == tuple(
      f"token_type_{t}" for t in distill_objective.TOKEN_TYPES)


def test_bad_distill_block_rejected():
  c = _tiny("hinton,smoke")
  c.distill.method = "hintn"
  with pytest.raises(ValueError, match="distill.method"):
    config_lib.validate_config(c)
  c = _tiny("fused,smoke")
  c.distill.fusion = "fixed"
  with pytest.raises(ValueError, match="needs a learned fusion"):
    config_lib.validate_config(c)
  c = _tiny("fused,smoke")
  c.distill.gate.min_weight = 0.2
  with pytest.raises(ValueError, match="gate.min_weight"):
    config_lib.validate_config(c)
  raw = _tiny("hinton,smoke").to_dict()
  raw["distill"]["adaptive"] = 1
  with pytest.raises(ValueError, match="distill.adaptive must be a bool"):
    config_lib.validate_config(ml_collections.ConfigDict(raw))
  raw["distill"]["adaptive"] = False
  raw["distill"]["temperatur"] = 2.0
  with pytest.raises(ValueError, match="distill.temperatur.*distill.temperature"):
    config_lib.validate_config(ml_collections.ConfigDict(raw))
  c = _tiny("hinton,adaptive,smoke")
  c.probe.critical = True
  with pytest.raises(ValueError, match="probe.critical"):
    config_lib.validate_config(c)
  c = _tiny("hinton,smoke")
  c.distill.teacher.num_steps = 2  # warmup_steps = 2
  with pytest.raises(ValueError, match="distill.teacher.num_steps=2: must exceed"):
    config_lib.validate_config(c)
  c = _tiny("hinton,smoke")
  c.distill.feature_slices = "pre_act=l2"
  with pytest.raises(ValueError, match="feature_slices entry 'pre_act=l2'"):
    config_lib.validate_config(c)
  with pytest.raises(ValueError, match="unknown preset"):
    _get_config("nope")
