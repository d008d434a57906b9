"""The runner's loop overhead: steps/s of ``train_and_evaluate`` against a bare jitted loop.

Usage::

  python benchmarks/loop_bench.py [--steps 300] [--config configs/olmo_style.py:smoke]

Every variant trains the same config (``olmo_style.py:smoke``: 1-block GPT, batch 8 × 32,
AdamW with the critical-sharpness probe inside the optax chain) for ``--steps`` steps in this
process, and is timed after its first step (which compiles):

* ``bare``: ``state, metrics = train_step(state, next(iterator))`` in a Python loop, the
  runner's own jitted step (``experiments.trainer._jitted``) on the runner's own batches,
  blocked on at the end — the floor;
* ``bare+get``: the same, reading each step's metrics to the host (``jax.device_get``), as a
  loop that logs its loss does;
* ``runner``: ``train_and_evaluate`` with the probes outside the chain off (λ_max, λ^PH,
  relative), the monitor, checkpoints, evaluation, plots and progress bar off, a metrics row
  (JSON + TensorBoard) every step: the loop's own cost;
* ``+monitor``: the same with ``convergence.Monitor`` on (the config's default);
* ``+probes``: the config's probe schedule (λ^PH every 10 steps) and evaluation on too.

Ratios are against ``bare`` of the same run (target for ``runner``: ≤ 5 % overhead). The
variants are measured ``--repeats`` times, interleaved, and the best rate of each is compared
(on a shared machine the least disturbed run is the closest to the cost). The probes' share is
the ``+probes`` time per step minus ``+monitor``'s, over ``+probes``'.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

OFF = {"probe.lanczos_every": 0, "probe.preconditioned_every": 0, "probe.relative_every": 0,
       "monitor.enabled": False, "checkpoint.enabled": False, "eval_every": 0, "plots": False,
       "progress_bar": False, "log_every": 1}


class Timing(NamedTuple):
  """Per step, after the first (which compiles): wall seconds, and CPU seconds of this
  process (all its threads; less sensitive to other jobs on a shared machine)."""
  wall: float
  cpu: float


class _Clock(loop.Clock):
  """The runner's clock, also reading the process CPU time; keeps its last instance."""
  last_made = None

  def __init__(self):
    super().__init__()
    self.cpu_first = self.cpu_last = 0.0
    _Clock.last_made = self

  def end(self, step, state, row):
    super().end(step, state, row)
    if self.steps == 0:
      self.cpu_first = time.process_time()
    else:
      self.cpu_last = time.process_time()


def bare_timing(config, fetch: bool = False) -> Timing:
  """The runner's jitted step and batches in a bare loop, timed after the first step;
  ``fetch``: it also reads every step's metrics to the host (a loop that logs its loss)."""
  config = config_lib.validate_config(config)
  model = trainer._build_model(config)  # pylint: disable=protected-access
  schedule = optim.make_schedule(config)
  optimizer = optim.make_optimizer(config, schedule)
  state = loop.canonical(trainer.TrainState(jnp.int32(0), model.params,
                                            optimizer.tx.init(model.params)))
  _, iterator, _ = trainer._batches(config, model.dataset)  # pylint: disable=protected-access
  pl = trainer._placement(config, None, state)  # pylint: disable=protected-access
  step = trainer._jitted(config, model, optimizer, schedule, pl).train_step  # pylint: disable=protected-access
  state, metrics = step(state, next(iterator))
  jax.block_until_ready((state, metrics))
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(config.num_steps - 1):
    state, metrics = step(state, next(iterator))
    if fetch:
      jax.device_get(metrics)
  jax.block_until_ready((state, metrics))
  n = config.num_steps - 1
  return Timing((time.perf_counter() - start) / n, (time.process_time() - cpu) / n)


def runner_timing(config) -> Timing:
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir)
  c = _Clock.last_made
  return Timing((c.last - c.first) / c.steps, (c.cpu_last - c.cpu_first) / c.steps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/olmo_style.py:smoke")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  # Each runner call builds its jitted functions anew: the persistent cache loads them.
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="loop-bench-"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  spec = os.path.join(REPO, args.config) if not os.path.isabs(args.config) else args.config
  base = {**OFF, "num_steps": args.steps}
  variants = {
      "bare": None,
      "bare+get": None,
      "runner": base,
      "+monitor": {**base, "monitor.enabled": True},
      "+probes": {**base, "monitor.enabled": True, "probe.preconditioned_every": 10,
                  "eval_every": 10},
  }
  loop.Clock = _Clock  # the trainer builds its clock from experiments.loop at run time
  times: dict[str, list[Timing]] = {k: [] for k in variants}
  for _ in range(args.repeats):  # interleaved, so a burst of load hits every variant alike
    for name, overrides in variants.items():
      if overrides is None:
        times[name].append(bare_timing(config_lib.load_config(spec, base),
                                       fetch=name == "bare+get"))
      else:
        times[name].append(runner_timing(config_lib.load_config(spec, overrides)))
  print(f"{args.config}, {args.steps} steps x {args.repeats} repeats, "
        f"{jax.devices()[0].platform}, load average {os.getloadavg()[0]:.1f}")
  print(f"{'variant':<10} {'wall ms/step':>13} {'vs bare':>8} {'CPU ms/step':>12} {'vs bare':>8}"
        "   wall ms of each repeat")
  # The least disturbed repeat of each (on a shared machine the closest to the cost).
  wall = {k: min(t.wall for t in v) for k, v in times.items()}
  cpu = {k: min(t.cpu for t in v) for k, v in times.items()}
  for name in variants:
    print(f"{name:<10} {1e3 * wall[name]:>13.2f} {wall[name] / wall['bare']:>7.3f}x "
          f"{1e3 * cpu[name]:>12.2f} {cpu[name] / cpu['bare']:>7.3f}x   "
          + " ".join(f"{1e3 * t.wall:.2f}" for t in times[name]))
  for what, d in (("wall", wall), ("CPU", cpu)):
    print(f"{what}: loop overhead (runner vs bare) {100 * (d['runner'] / d['bare'] - 1):+.1f} %; "
          f"monitor share of a +monitor step "
          f"{100 * (d['+monitor'] - d['runner']) / d['+monitor']:.1f} %; probes + eval share "
          f"of a +probes step {100 * (d['+probes'] - d['+monitor']) / d['+probes']:.1f} %")


if __name__ == "__main__":
  main()
