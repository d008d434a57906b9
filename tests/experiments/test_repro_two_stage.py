"""Two-stage training (Kalra et al. 2026, Fig. 4 in miniature): the data switch, the schedule's
boundary, an exact resume on either side of it, and the judge on curves of known shape."""

import json
import os

import numpy as np
import pytest

from experiments import config_lib
from experiments import data as data_lib
from experiments import monitoring
from experiments import optim
from experiments import repro_two_stage
from experiments import trainer

CONFIG = "configs/two_stage.py"


# ---------------------------------------------------------------------------------------------
# The data switch
# ---------------------------------------------------------------------------------------------


def _task(name, n, offset):
  """A fake corpus: example i is a row of the value offset + i (which example is visible)."""
  rows = (offset + np.arange(n))[:, None] * np.ones((1, 5), np.int64)
  return data_lib.Dataset(name, {"tokens": rows}, {"tokens": rows[:4]}, "language_model")


def _switching(seed=3, switch=7, batch=4, frac=0.75):
  code, prose = _task("code", 10, 0), _task("prose", 9, 1000)
  stage2 = data_lib.Stage2(switch, frac, {"code": code, "prose": prose})
  return data_lib.Dataset("code", code.train, code.eval, "language_model",
                          stage2=stage2).iterator(batch, seed), code, prose


def test_switching_iterator_is_stage1_then_the_mix_and_resumes_anywhere():
  it, code, prose = _switching()
  got = [next(it)["tokens"][:, 0] for _ in range(15)]
  # The reference: the plain iterators the switch is made of, drawn by hand.
  plain = data_lib.BatchIterator(10, 4, lambda i: code.train["tokens"][i], seed=3)
  mix_code = data_lib.BatchIterator(10, 3, lambda i: code.train["tokens"][i], seed=4)
  mix_prose = data_lib.BatchIterator(9, 1, lambda i: prose.train["tokens"][i], seed=5)
  want = [next(plain)[:, 0] for _ in range(7)]
  want += [np.concatenate([next(mix_code), next(mix_prose)])[:, 0] for _ in range(8)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  assert all(np.all(g < 1000) for g in got[:7]) and all(np.sum(g >= 1000) == 1 for g in got[7:])

  for stop in (5, 7, 11):  # before, at and after the switch
    first, _, _ = _switching()
    for _ in range(stop):
      next(first)
    # The position as the trainer checkpoints it: JSON of plain dicts.
    pos = json.loads(json.dumps({k: v._asdict() for k, v in first.get_state().items()}))
    second, _, _ = _switching()
    second.set_state(pos)
    assert second.drawn == stop
    for t in range(stop, 15):
      np.testing.assert_array_equal(next(second)["tokens"][:, 0], got[t])


def test_two_stage_dataset_fingerprints_the_switch_and_keeps_code_held_out():
  c = config_lib.load_config(f"{CONFIG}:smoke")
  ds = data_lib.load_dataset(c.data, c.seed)
  plain = data_lib.load_dataset(config_lib.load_config(
      "configs/olmo_style.py:smoke", {"data.max_chars": c.data.max_chars}).data, c.seed)
  assert ds.info["stage2"]["switch_step"] == c.data.switch_step == 18
  assert ds.info["stage2"]["code_fraction"] == 0.5
  np.testing.assert_array_equal(ds.eval["tokens"], plain.eval["tokens"])
  it = ds.iterator(8, 0)
  batches = [next(it)["tokens"] for _ in range(20)]
  reference = plain.iterator(8, 0)
  for b in batches[:18]:  # stage 1: the batches of a run without a switch
    np.testing.assert_array_equal(b, next(reference)["tokens"])
  assert batches[18].shape == batches[0].shape == (8, c.data.context_length + 1)


def test_switch_step_is_validated():
  with pytest.raises(ValueError, match=r"data\.switch_step=17: must equal .* step 18"):
    config_lib.load_config(f"{CONFIG}:smoke", {"data.switch_step": 17})
  with pytest.raises(ValueError, match=r"data\.switch_step=.*mini-batches"):
    config_lib.load_config(f"{CONFIG}:smoke", {"batch_size": 0})
  with pytest.raises(ValueError, match=r"data\.switch_step=.*'code' or 'prose'"):
    config_lib.load_config(f"{CONFIG}:smoke", {"data.name": "mix"})
  with pytest.raises(ValueError, match=r"data\.switch_step=.*must be < num_steps"):
    config_lib.load_config("configs/olmo_style.py:smoke", {"data.switch_step": 30})


def test_stage_boundary_is_where_the_data_switches():
  c = config_lib.load_config(CONFIG)
  start = c.data.switch_step
  assert start == config_lib.decay_start(c) == 450
  eta = optim.make_schedule(c)
  peak = c.optimizer.learning_rate
  # Stage 1's cosine ends at exactly 0.1 × the peak at the switch (float32 rounding: 1 ulp).
  assert float(eta(start)) == pytest.approx(0.1 * peak, rel=2 * float(np.finfo(np.float32).eps))
  assert float(eta(start - 1)) > float(eta(start)) > float(eta(start + 1)) > 0.0
  assert float(eta(c.num_steps)) == 0.0
  assert "start of stage 2" in monitoring.stage_boundaries(c)[start]


# ---------------------------------------------------------------------------------------------
# Resume across the switch
# ---------------------------------------------------------------------------------------------


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return f.read().splitlines()


@pytest.mark.usefixtures("compile_cache")
def test_resume_across_the_switch_is_exact(tmp_path, interrupt_at_row):
  config = config_lib.load_config(f"{CONFIG}:smoke", {"progress_bar": False})
  assert config.data.switch_step == 18
  straight = str(tmp_path / "straight")
  trainer.train_and_evaluate(config, straight)
  # Crash before row 17: the newest checkpoint is 16, so the resumed run restores stage 1's
  # data position, draws its last two batches, switches to the mix at 18 and carries on. (A
  # position inside stage 2 is restored in the iterator test above, through the same JSON.)
  workdir = str(tmp_path / "resumed")
  interrupt_at_row(lambda: trainer.train_and_evaluate(config, workdir), 17)
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary["resumed_from_step"] == 16 and summary["jit_compilations"] == 1
  assert _lines(workdir) == _lines(straight)


# ---------------------------------------------------------------------------------------------
# The judge, on curves whose shape is known by construction
# ---------------------------------------------------------------------------------------------

STEPS = np.arange(10, 610, 10)


def _rows(values):
  return [{"step": int(s), "curv/critical_sharpness": float(v), "train/lr": 1e-3,
           "stage": 2 if s >= 450 else 1} for s, v in zip(STEPS, values)]


def _all(values):
  return {f"seed{s}": _rows(values) for s in repro_two_stage.SEEDS}


def test_judge_accepts_the_published_shape_and_rejects_others():
  judge = repro_two_stage.REPRODUCTIONS[0].judge
  # Fall from 400 to 100 by step 60, then a linear rise to 500: the paper's picture.
  published = np.where(STEPS <= 60, 400.0 - 6.0 * (STEPS - 10),
                       100.0 + (STEPS - 60) * 400 / 540)
  text, ok = judge(_all(published))
  assert ok is True, text
  s = repro_two_stage.shape(_rows(published))
  # Window 0 holds steps 10, 20, 30 (λ_c 400, 340, 280): its median, and the early maximum.
  assert s.first == s.peak == 340.0 and s.fall == s.peak_fall
  assert s.fall <= 0.35 and s.rise >= 4.0 and s.rank == pytest.approx(1.0)
  # A rise from the start, no early fall: the rise holds, the fall does not.
  rising = 100.0 + STEPS * 400 / 600
  assert judge(_all(rising))[1] == "partly"
  # The fall, then flat with noise: no steady rise.
  noise = np.random.default_rng(0).uniform(0.9, 1.1, STEPS.size)
  flat = np.where(STEPS <= 60, 400.0, 100.0) * noise
  assert judge(_all(flat))[1] is False
  # One seed without the fall: not every seed meets the criterion.
  rows = _all(published)
  rows["seed2"] = _rows(rising)
  assert judge(rows)[1] == "partly"


@pytest.mark.usefixtures("compile_cache")
def test_smoke_reproduction_end_to_end(tmp_path):
  from experiments import reproduce  # pylint: disable=g-import-not-at-top
  report = reproduce.reproduce("two_stage", str(tmp_path), smoke=True)
  assert report["matches"] is None and os.path.getsize(report["image"]) > 10_000
  rows = [json.loads(line) for line in open(tmp_path / "seed0" / "offline" /
                                            "offline_metrics.jsonl", encoding="utf-8")]
  # Every checkpoint of the run measured (the regular saves every 4 steps, the end of warmup
  # at 3, the start of stage 2 at 18), on the same four held-out batches.
  assert [r["step"] for r in rows] == [3, 4, 8, 12, 16, 18, 20, 24]
  assert all(len(r["curv/critical_sharpness/batches"]) == 4 for r in rows)
  assert "seed 0: early min/first window" in report["measured"]
