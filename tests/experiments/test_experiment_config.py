"""Configs: presets load and validate; bad keys and values fail naming the field."""

import glob
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import config_lib
from experiments import optim

PRESETS = ["configs/edge_of_stability.py", "configs/edge_of_stability.py:adam",
           "configs/edge_of_stability.py:smoke", "configs/edge_of_stability.py:adam,smoke",
           "configs/olmo_style.py:wsd", "configs/olmo_style.py:cosine",
           "configs/olmo_style.py:wsd,smoke", "configs/olmo_style.py:cosine,smoke",
           "configs/data_mixing.py", "configs/data_mixing.py:smoke",
           "configs/distill.py", "configs/distill.py:ce,smoke", "configs/distill.py:fused",
           "configs/two_stage.py", "configs/two_stage.py:smoke"]


def test_every_config_file_is_covered():
  assert {p.split(":")[0] for p in PRESETS} == set(glob.glob("configs/*.py"))


@pytest.mark.parametrize("spec", PRESETS)
def test_presets_validate(spec):
  config = config_lib.load_config(spec)
  assert config.num_steps >= 1


def test_unknown_preset_names_it():
  with pytest.raises(ValueError, match="smok"):
    config_lib.load_config("configs/edge_of_stability.py:smok")


def test_misspelt_override_names_the_key():
  with pytest.raises(ValueError, match=r"optimizer\.nme.*Did you mean 'optimizer\.name'"):
    config_lib.load_config("configs/edge_of_stability.py:smoke", {"optimizer.nme": "adam"})


def test_unknown_field_in_a_config_is_rejected():
  config = config_lib.default_config()
  with config.unlocked():
    config.optimizer.learning_rat = 0.1
  with pytest.raises(ValueError, match=r"optimizer\.learning_rat.*learning_rate"):
    config_lib.validate_config(config)


@pytest.mark.parametrize("key,value,accepted", [
    ("optimizer.name", "adan", "adamw"),
    ("schedule.name", "cosine", "warmup_cosine"),
    ("model.name", "resnet", "gpt"),
    ("data.name", "cifar", "digits"),
])
def test_bad_enum_names_the_field_and_accepted_values(key, value, accepted):
  with pytest.raises(ValueError, match=rf"config\.{key}=.*{value}.*{accepted}"):
    config_lib.load_config("configs/edge_of_stability.py:smoke", {key: value})


def test_out_of_range_and_inconsistent_values():
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    config_lib.load_config("configs/edge_of_stability.py:smoke",
                           {"optimizer.learning_rate": -1.0})
  with pytest.raises(ValueError, match="probe.preconditioned_every.*adam"):
    config_lib.load_config("configs/edge_of_stability.py:smoke",
                           {"probe.preconditioned_every": 5})
  with pytest.raises(ValueError, match="model.name.*gpt"):
    config_lib.load_config("configs/olmo_style.py:smoke", {"model.name": "mlp"})


def test_distill_schema_names_the_library_slices_and_losses():
  import distill  # pylint: disable=g-import-not-at-top
  assert config_lib.FEATURE_SLICES == distill.SLICES
  assert config_lib.FEATURE_LOSSES == distill.LOSS_KINDS
  assert config_lib.parse_feature_slices(" pre_act=mmd, block_out=l1") == {
      "pre_act": "mmd", "block_out": "l1"}


def test_config_lib_imports_no_runner_and_no_jax():
  """The schema sits below the runners: importing it loads neither a runner nor JAX."""
  code = ("import sys; from experiments import config_lib; "
          "print(sorted(m for m in sys.modules if m.startswith('experiments.') or m == 'jax'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__))))).stdout
  assert out.strip() == "['experiments.config_lib']", out


def _parse(argv):
  fv = flags.FlagValues()
  # sys_argv: the override flags are declared from the argv that will be parsed.
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                           sys_argv=["prog"] + argv)
  fv(["prog"] + argv)
  return holder.value


def test_command_line_flags_override_and_reject_typos():
  config = _parse(["--config=configs/edge_of_stability.py:smoke",
                   "--config.optimizer.learning_rate=0.05", "--config.model.widths=(8,8)"])
  resolved = config_lib.validate_config(config)
  assert resolved.optimizer.learning_rate == 0.05 and resolved.model.widths == (8, 8)
  with pytest.raises(KeyError, match="optimzer"):
    _parse(["--config=configs/edge_of_stability.py:smoke", "--config.optimzer.name=adam"])
  with pytest.raises(flags.IllegalFlagValueError, match="num_steps"):
    _parse(["--config=configs/edge_of_stability.py:smoke", "--config.num_steps=abc"])


def _schedule(**kw):
  c = config_lib.default_config()
  with c.unlocked():
    c.num_steps = 100
    c.optimizer.learning_rate = 1.0
    for k, v in kw.items():
      c.schedule[k] = v
  return optim.make_schedule(config_lib.validate_config(c))


def test_warmup_stable_decay_shape():
  s = _schedule(name="warmup_stable_decay", warmup_steps=10, decay_fraction=0.2,
                end_fraction=0.0)
  lr = np.array([float(s(jnp.int32(t))) for t in range(100)])
  np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10, rtol=1e-6)  # warmup from η/W
  np.testing.assert_allclose(lr[10:81], 1.0)  # stable
  assert np.all(np.diff(lr[80:]) < 0) and lr[-1] == pytest.approx(1 / 20)  # linear decay


def test_warmup_cosine_shape():
  s = _schedule(name="warmup_cosine", warmup_steps=10, end_fraction=0.1)
  lr = np.array([float(s(t)) for t in range(100)])
  assert lr[9] == pytest.approx(1.0) and np.all(np.diff(lr[10:]) < 0)
  assert float(s(100)) == pytest.approx(0.1)


def test_stability_thresholds():
  c = config_lib.default_config()
  with c.unlocked():
    c.optimizer.name = "adam"
  assert optim.stability_threshold(c)[1] == pytest.approx(38.0)
  with c.unlocked():
    c.optimizer.name, c.optimizer.momentum = "momentum", 0.9
  assert optim.stability_threshold(c)[1] == pytest.approx(3.8)
