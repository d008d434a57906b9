"""Settings for the whole test suite, applied before anything imports JAX.

Most of the suite's time is XLA compiling small programs, many of them several times: the
same smoke config's train step in several test modules, in both xdist workers, and again in the
child processes (the CLI runs, the SIGKILL resumes, the 8-device checks). Two settings cut it:

* One persistent compilation cache for the whole ``pytest`` invocation, shared by the xdist
  workers and every child process (they inherit ``JAX_COMPILATION_CACHE_DIR``): a program is
  compiled once and loaded everywhere else. The directory is created by the first process
  (the xdist controller, or a plain ``pytest``) and removed when it exits. Loading an
  executable instead of compiling the same program again changes no result.
* XLA's CPU backend at optimisation level 0 (``--xla_backend_optimization_level=0``): LLVM
  compiles about 3x faster; the programs run somewhat slower, which these small tests do not
  feel. It can move last bits against a default-level build, so the suite compares bit for bit
  only programs compiled alike; everything else uses tolerances derived from the dtype.

``LOSSLAB_TEST_XLA_DEFAULTS=1`` runs the suite at XLA's default optimisation level instead
(what a user's run compiles with). Flags the caller already set in ``XLA_FLAGS`` are kept.
"""

import os
import shutil
import tempfile

_OWNER = "LOSSLAB_TEST_JAX_CACHE" not in os.environ
if _OWNER:
  os.environ["LOSSLAB_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="losslab-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["LOSSLAB_TEST_JAX_CACHE"])
# Cache what takes a noticeable time to compile; tiny programs are cheaper to rebuild than to
# hash, write and read.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

if os.environ.get("LOSSLAB_TEST_XLA_DEFAULTS", "") in ("", "0"):
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWNER:
    shutil.rmtree(os.environ["LOSSLAB_TEST_JAX_CACHE"], ignore_errors=True)
