"""The command line, run once as a user would."""

import glob
import importlib.util
import json
import logging
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
              # the monitor runs in-process in test_experiment_monitor; here its network's
              # compilation would be most of this child's time
              "--config.monitor.enabled=False", "--config.progress_bar=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
  assert json.load(open(workdir / "config.json"))["num_steps"] == 5
  assert (workdir / "plots" / "sharpness.png").exists()
  assert "compiling…" in proc.stderr  # before the first step (issue 9 §3)
  assert "Unable to initialize backend" not in proc.stderr  # jax's probe for a missing libtpu


def test_cli_bad_key_fails_naming_it(tmp_path):
  proc = _cli("--config=configs/edge_of_stability.py:smoke", f"--workdir={tmp_path}",
              "--config.optimizer.nme=adam")
  assert proc.returncode != 0
  assert "nme" in proc.stderr and "Traceback" not in proc.stderr


# ---- The CLI explains itself: one- or two-line errors, --help, --dry_run (no training below).

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _config_module(path):
  spec = importlib.util.spec_from_file_location("_test_cli_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _one_error(proc, *needles):
  """Exit 1, at most two lines on stderr, no traceback, every needle named."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert 1 <= len(lines) <= 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "\\n" not in proc.stderr, proc.stderr
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr)
  return lines


def test_cli_missing_config_file_is_one_line(tmp_path):
  _one_error(_cli("--config=configs/nope.py", f"--workdir={tmp_path}"), "configs/nope.py",
             "does not exist", "configs/edge_of_stability.py")
  _one_error(_cli("--config=configs/nope.py:smoke", "--config.num_steps=3",
                  f"--workdir={tmp_path}"), "configs/nope.py")
  _one_error(_cli("--config=configs", f"--workdir={tmp_path}"), "'configs' is a directory")


def test_cli_workdir_that_is_a_file_is_one_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a run directory")
  for workdir in (afile, afile / "sub"):
    _one_error(_cli("--config=configs/edge_of_stability.py:smoke", f"--workdir={workdir}"),
               f"--workdir={workdir}", f"{str(afile)!r} is a file")


def test_cli_unknown_key_names_the_dotted_flag(tmp_path):
  lines = _one_error(_cli("--config=configs/edge_of_stability.py:smoke", f"--workdir={tmp_path}",
                          "--config.optimizer.learning_rat=0.1"),
                     "--config.optimizer.learning_rat ",
                     "did you mean --config.optimizer.learning_rate?")
  assert len(lines) == 1
  _one_error(_cli("--config", "configs/distill.py:smoke", "--dry_run",
                  "--config.distill.gate.hiden=3"), "--config.distill.gate.hiden",
             "--config.distill.gate.hidden")
  _one_error(_cli("--config=configs/edge_of_stability.py:smok", "--dry_run"),
             "unknown preset(s) ['smok']", "'gd', 'adam', 'smoke'")
  _one_error(_cli("--config=configs/edge_of_stability.py", "--dry_run",
                  "--config.num_steps=abc"), "--config.num_steps=abc")
  _one_error(_cli("--config=configs/edge_of_stability.py", "--dry_run",
                  "--config.optimizer.name=adm"), "config.optimizer.name='adm'", "'adam'")
  _one_error(_cli("--config=configs/edge_of_stability.py"), "--workdir=DIR is required")


def test_cli_help_lists_every_config_with_its_presets():
  assert len(CONFIGS) >= 4
  proc = _cli("--help")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for path in CONFIGS:
    module = _config_module(path)
    assert f"configs/{os.path.basename(path)}" in proc.stdout
    assert module.__doc__.strip().splitlines()[0] in proc.stdout
    assert module.PRESETS, path  # every config declares its presets ...
    assert f"presets: {', '.join(module.PRESETS)}" in proc.stdout
    for preset in module.PRESETS:  # ... and get_config accepts each of them
      module.get_config(preset)
  assert "--dry_run" in proc.stdout and "--config.<field>=<value>" in proc.stdout
  assert _cli("--helpfull").returncode == 0


def test_cli_help_picks_up_a_new_config_file(tmp_path, monkeypatch):
  from experiments import run  # pylint: disable=g-import-not-at-top
  (tmp_path / "new_study.py").write_text(
      '"""A new study: one line for the listing.\n\nMore text.\n"""\n\nPRESETS = ("a", "b")\n\n\n'
      'def get_config(arg=""):\n  raise NotImplementedError\n')
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  monkeypatch.setattr(run, "CONFIG_DIR", str(tmp_path))
  listing = run.config_listing()
  assert "A new study: one line for the listing." in listing and "presets: a, b" in listing
  assert "More text" not in listing and "cannot be loaded: SyntaxError" in listing


def _run_without_jax(argv: list[str]) -> subprocess.CompletedProcess:
  """Runs ``experiments.run`` with ``argv`` in a child process; its stderr ends with whether
  JAX was imported and the exit status."""
  code = ("import runpy, sys\n"
          f"sys.argv = ['run'] + {argv!r}\n"
          "try:\n  runpy.run_module('experiments.run', run_name='__main__')\n"
          "except SystemExit as e:\n  status = e.code or 0\n"
          "print('jax imported:', 'jax' in sys.modules, 'status:', status, file=sys.stderr)\n")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def test_cli_dry_run_prints_the_config_without_jax(tmp_path):
  workdir = tmp_path / "not_created"
  proc = _run_without_jax(["--config=configs/olmo_style.py:cosine,smoke",
                           "--config.num_steps=7", f"--workdir={workdir}", "--dry_run"])
  assert "jax imported: False status: 0" in proc.stderr, proc.stderr[-3000:]
  printed = json.loads(proc.stdout)
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  expected = config_lib.load_config("configs/olmo_style.py:cosine,smoke", {"num_steps": 7})
  assert printed == json.loads(json.dumps(expected.to_dict()))
  assert printed["num_steps"] == 7 and printed["schedule"]["name"] == "warmup_cosine"
  assert not workdir.exists()


def test_cli_compare_dry_run_prints_every_preset_without_jax():
  proc = _run_without_jax(["--config=configs/distill.py:smoke", "--compare=ce,temporal+adaptive",
                           "--config.num_steps=7", "--dry_run"])
  assert "jax imported: False status: 0" in proc.stderr, proc.stderr[-3000:]
  printed = json.loads(proc.stdout)
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  for name, presets in (("ce", "ce,smoke"), ("temporal+adaptive", "temporal,adaptive,smoke")):
    expected = config_lib.load_config(f"configs/distill.py:{presets}", {"num_steps": 7})
    assert printed[name] == json.loads(json.dumps(expected.to_dict())), name
  assert set(printed) == {"ce", "temporal+adaptive"}
  _one_error(_cli("--config=configs/olmo_style.py:smoke", "--compare=all", "--dry_run"),
             "--compare runs distillation presets")
  _one_error(_cli("--config=configs/distill.py", "--compare=hintn", "--dry_run"),
             "unknown preset(s) ['hintn']")


def test_cli_jax_backend_probe_filter():
  from experiments import run  # pylint: disable=g-import-not-at-top

  def shown(level, msg):
    record = logging.LogRecord("jax._src.xla_bridge", level, "xla_bridge.py", 849, msg, (), None)
    return run._QuietPluginProbe().filter(record)  # pylint: disable=protected-access

  assert not shown(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to open "
                   "libtpu.so: libtpu.so: cannot open shared object file: No such file or "
                   "directory")
  # A plugin that is there but fails, and JAX's warnings, still show.
  assert shown(logging.INFO, "Unable to initialize backend 'tpu': ABORTED: The TPU is already "
               "in use by process with pid 1234.")
  assert shown(logging.WARNING, "A Google TPU may be present on this machine, but either a "
               "TPU-enabled jaxlib or libtpu is not installed. Falling back to cpu.")


def _plots(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "experiments.plots", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_plots_cli_help_and_errors(tmp_path):
  proc = _plots("--help")
  assert proc.returncode == 0 and "python -m experiments.plots --workdir=RUN_DIR" in proc.stdout
  assert "--workdir" in proc.stdout and proc.stderr == ""
  _one_error(_plots(), "usage: python -m experiments.plots --workdir=RUN_DIR")
  _one_error(_plots("--workdir", str(tmp_path / "nope")), "does not exist")
  _one_error(_plots(str(tmp_path / "nope")), "does not exist")
  _one_error(_plots(str(tmp_path)), "no metrics.jsonl")
