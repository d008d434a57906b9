r"""Command line: ``python -m experiments.run --config=configs/NAME.py[:PRESETS] --workdir=DIR``.

Any config field can be overridden with ``--config.<field>=<value>``, e.g.
``--config.optimizer.learning_rate=0.05 --config.num_steps=200``. To see every field and its
resolved value without running anything (no data loaded, no device touched), add ``--dry_run``:
it prints the validated config as JSON (what the run saves in ``DIR/config.json``) and exits 0;
``--workdir`` is then optional. What each field means: the comments of
``experiments.config_lib.default_config``.

  python -m experiments.run --config=configs/olmo_style.py:cosine,smoke --dry_run

A misspelt field, a value of the wrong type or an unknown preset is rejected while the flags
are parsed; a name outside an enumeration (optimizer, schedule, model, dataset, ...) or a value
out of range is rejected by ``experiments.config_lib.validate_config`` with the field and the
accepted values. Both happen before any data is loaded or anything is compiled.

A config with a ``distill`` block (``configs/distill.py``) runs
``experiments.distillation.distill_and_evaluate`` (teacher, then student) instead of the trainer.
``--compare=a,b+c`` runs several presets of a distillation config one after another into
``DIR/<preset>`` (``b+c``: presets b and c together; ``all``: the config's ``COMPARE`` list),
each joined with the presets of ``--config`` and given the same ``--config.<field>``
overrides; the teacher is trained once and shared. It prints a table of student eval loss,
perplexity and accuracy and writes ``DIR/comparison.json`` and ``DIR/comparison.png``;
re-running it resumes every run. With ``--dry_run`` it prints every preset's config.

  python -m experiments.run --config=configs/distill.py:smoke --compare=ce,hinton --dry_run

Exit status: 0 on success; 1 with a one- or two-line message and no traceback on a bad command
line (a missing config file, an unknown key named as its flag, e.g.
``--config.optimizer.learning_rat``, a bad value or preset, a workdir that is a file) or a
diverged run (the run directory then holds every metric up to the non-finite step, and the
plots).
"""

from __future__ import annotations

import difflib
import glob
import json
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from experiments import config_lib

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (config, metrics, checkpoints, plots).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with presets: file.py:preset[,preset].",
    lock_config=True)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the resolved, validated config as JSON and exit (no data loaded, no "
    "device touched; --workdir optional).")
_COMPARE = flags.DEFINE_string(
    "compare", None, "Distillation configs: run these presets (comma list; a+b = presets a and "
    "b together; 'all' = the config's COMPARE) into WORKDIR/<preset> with one teacher, and "
    "tabulate them.")
flags.mark_flags_as_required(["config"])

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_HELP_FLAGS = ("help", "helpshort", "helpfull", "?", "h")
_SEE_HELP = "python -m experiments.run --help lists the configs, their presets and the flags."


def _shown(path: str) -> str:
  """``path`` relative to the working directory when it lies below it."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def config_listing() -> str:
  """Every ``configs/*.py``: its docstring's first line and its ``PRESETS``."""
  lines = ["configs (--config=FILE or FILE:PRESET; several presets joined by commas):"]
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py"))):
    if os.path.basename(path).startswith("_"):
      continue
    try:
      module = config_lib.config_module(path)
      about = (module.__doc__ or "").strip().splitlines()
      about = about[0] if about else "(no docstring)"
      presets = ", ".join(getattr(module, "PRESETS", ())) or "none"
    except Exception as e:  # pylint: disable=broad-except  # one broken file: say so, list the rest
      about, presets = f"(cannot be loaded: {type(e).__name__}: {e})", "?"
    lines += [f"  {_shown(path)}", f"      {about}", f"      presets: {presets}"]
  return "\n".join(lines)


def _print_help(full: bool) -> None:
  flag_help = FLAGS.get_help() if full else FLAGS.main_module_help()
  text = f"{__doc__}\n{config_listing()}\n\nflags:\n{flag_help}\n"
  if not full:
    text += "\nTry --helpfull to get a list of all flags.\n"
  try:
    sys.stdout.write(text)
    sys.stdout.flush()
  except BrokenPipeError:  # python -m experiments.run --help | head
    pass


def _config_spec(argv: list[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (``--config=X`` or ``--config X``), or None."""
  for i, arg in enumerate(argv):
    m = re.match(r"^--?config(?:=(.*))?$", arg)
    if m:
      return m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _config_file_error(spec: str) -> str | None:
  """A one-line message if the file of ``spec`` (``path[:presets]``) cannot be a config."""
  path = spec.split(":", 1)[0]
  if os.path.isfile(path):
    return None
  available = ", ".join(_shown(p) for p in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py"))))
  what = "is a directory, not a config file" if os.path.isdir(path) else "does not exist"
  return f"config error: --config={spec}: {path!r} {what}; the configs are {available}."


def _unknown_override(argv: list[str]) -> str | None:
  """The first ``--config.a.b`` of ``argv`` that names no field, as a message with a suggestion."""
  spec = _config_spec(argv)
  path, _, arg = (spec or "").partition(":")
  try:
    module = config_lib.config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  # the caller falls back to ml_collections' text
    return None
  for token in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", token)
    if not m:
      continue
    dotted = m.group(1)
    node, known = config, []
    for part in dotted.split("."):
      if hasattr(node, "keys") and part in node:
        node, known = node[part], known + [part]
        continue
      where = ".".join(["config", *known])
      if not hasattr(node, "keys"):
        return f"config error: unknown key --config.{dotted}: {where} is a value, not a group."
      close = difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.6)
      hint = f"; did you mean --{'.'.join([where, close[0]])}?" if close else (
          f"; {where} has {sorted(node.keys())}.")
      return f"config error: unknown key --config.{dotted} (no field {part!r} in {where}){hint}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; --help lists the configs; a bad command line exits with one line."""
  names = {re.sub(r"^--?", "", a.split("=", 1)[0]) for a in argv[1:] if a.startswith("-")}
  if names & set(_HELP_FLAGS):
    _print_help(full="helpfull" in names)
    sys.exit(0)
  spec = _config_spec(argv[1:])
  if spec is not None and (message := _config_file_error(spec)):
    sys.exit(message)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:  # an exception inside get_config (e.g. an unknown preset)
      last = [ln for ln in message.splitlines() if ln.strip()][-1].strip()
      sys.exit(f"config error: --config={spec}: {re.sub(r'^ValueError: ', '', last)}")
    sys.exit(f"flag error: {message}\n{_SEE_HELP}")
  except (KeyError, AttributeError) as e:  # ml_collections: an override that names no field
    message = _unknown_override(argv[1:])
    if message is None:
      text = str(e.args[0] if e.args else e).replace("\n", " ")
      message = f"config error: unknown key: {text}"
    sys.exit(message)
  except (TypeError, ValueError, OSError) as e:
    sys.exit(f"config error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _workdir_error(workdir: str) -> str | None:
  """A one-line message if a run directory cannot be created or written at ``workdir``."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    inside = "" if path == os.path.abspath(workdir) else f" (inside {path!r})"
    return f"workdir error: --workdir={workdir}: {path!r} is a file, not a directory{inside}."
  if not os.access(path, os.W_OK | os.X_OK):
    return f"workdir error: --workdir={workdir}: {path!r} is not writable."
  return None


class _QuietPluginProbe(std_logging.Filter):
  """Drops jax's INFO line about an optional accelerator plugin whose library is absent
  (``Unable to initialize backend 'tpu': ... libtpu.so: cannot open shared object file``).

  JAX logs it at INFO whenever it probes for a TPU on a machine without libtpu; the CLI shows
  INFO, so every CPU run started with it. Any other backend failure (a plugin that is installed
  but fails, a platform requested with JAX_PLATFORMS) and JAX's own warnings about accelerators
  it sees but cannot use still get through.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    msg = record.getMessage()
    return not (msg.startswith("Unable to initialize backend")
                and ("cannot open shared object file" in msg or "No such file" in msg))


def quiet_plugin_probe() -> None:
  std_logging.getLogger("jax._src.xla_bridge").addFilter(_QuietPluginProbe())


def compare_configs(spec: str, names: str,
                    overrides: dict | None = None) -> dict[str, ml_collections.ConfigDict]:
  """``--compare``'s validated configs, preset name → config: ``spec`` = ``path[:presets]``
  (the presets every run shares), ``names`` = the comma list (``a+b`` joins presets; ``all``:
  the config file's ``COMPARE``), ``overrides`` = dotted key → value. Raises ``ValueError``."""
  path, _, shared = spec.partition(":")
  module = config_lib.config_module(path)
  if "distill" not in (module.get_config(shared) if shared else module.get_config()):
    raise ValueError(f"--compare runs distillation presets; {path} has no distill block.")
  chosen = [n for n in names.split(",") if n]
  if chosen == ["all"]:
    chosen = list(getattr(module, "COMPARE", ()))
  if not chosen:
    raise ValueError(f"--compare={names!r} names no preset.")
  out = {}
  for name in chosen:
    presets = ",".join(p for p in name.split("+") + shared.split(",") if p)
    out[name] = config_lib.load_config(f"{path}:{presets}", overrides)
  return out


def _resolve(raw) -> ml_collections.ConfigDict | dict[str, ml_collections.ConfigDict]:
  """The validated config, or ``--compare``'s configs; a bad one exits with one line."""
  try:
    if _COMPARE.value:
      return compare_configs(config_flags.get_config_filename(FLAGS["config"]), _COMPARE.value,
                             dict(config_flags.get_override_values(FLAGS["config"])))
    return config_lib.validate_config(raw)
  except ValueError as e:
    sys.exit(f"config error: {e}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"usage error: unexpected positional arguments {argv[1:]} (flags take the form "
             f"--name=value).\n{_SEE_HELP}")
  try:
    raw = _CONFIG.value
  except OSError as e:  # the config file could not be loaded (see _config_file_error)
    sys.exit(f"config error: {str(e).splitlines()[0]}")
  config = _resolve(raw)
  workdir = _WORKDIR.value
  if workdir and (message := _workdir_error(workdir)):
    sys.exit(message)
  if _DRY_RUN.value:
    shown = ({k: c.to_dict() for k, c in config.items()} if _COMPARE.value
             else config.to_dict())
    print(json.dumps(shown, indent=2, sort_keys=True))
    return 0
  if not workdir:
    sys.exit(f"usage error: --workdir=DIR is required (or --dry_run to print the config).\n"
             f"{_SEE_HELP}")
  quiet_plugin_probe()
  first = next(iter(config.values())) if _COMPARE.value else config
  from experiments import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(first.distributed)  # before anything touches a device
  logging.set_verbosity(logging.INFO)
  _train(config, workdir)


def _train(config, workdir: str) -> None:
  """Runs the trainer, the distillation runner or a comparison; one line on a known failure."""
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  try:
    if _COMPARE.value:
      from experiments import distillation  # pylint: disable=g-import-not-at-top
      print(distillation.format_table(distillation.compare(config, workdir)))
      return
    if "distill" in config:
      from experiments import distillation  # pylint: disable=g-import-not-at-top
      summary = distillation.distill_and_evaluate(config, workdir)
    else:
      summary = trainer.train_and_evaluate(config, workdir)
  except (trainer.TrainingDiverged, FloatingPointError) as e:
    sys.exit(f"diverged: {e}")
  except checkpointing.ResumeRefused as e:
    sys.exit(f"resume refused: {e}")
  logging.info("summary: %s", summary)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
