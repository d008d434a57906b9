"""Train-loop stall caused by a checkpoint save, tiny GPT of configs/olmo_style.py, this CPU.

    python benchmarks/checkpoint_bench.py            # 10 saves per mode
    python benchmarks/checkpoint_bench.py --quick    # 4 saves per mode

Builds the runner's state exactly as ``experiments.trainer`` does for ``olmo_style.py:wsd``
(2 blocks, width 64, batch 32 × 64 characters, AdamW with the λ_c probe in the chain; the
convergence monitor's state included in the payload) and measures, all in this run:

* ``train step``: median wall time of one jitted train step (block_until_ready);
* ``runner save() (stall)``: what the runner's training loop waits for with
  ``checkpoint.async_save=True``: ``experiments.checkpointing.BackgroundManager.save``, which
  queues the call for its worker thread (checksums, device→host copy and Orbax's synchronous
  set-up run there; Orbax's own thread writes the files);
* ``manager async save()``: the blocking part of ``TieredCheckpointManager.save`` called
  directly with ``async_save=True`` (what the loop would wait for without the worker);
* ``step during the save / write``: the train step that runs right after the save call,
  sharing the CPU with the background work;
* ``manager sync save()``: the whole save with ``async_save=False``, for comparison.

Each save starts after the previous one committed (``steps_between`` train steps in between,
then ``wait_until_finished``, not timed), as with the runner's ``checkpoint.every`` = 100.
The monitor state is saved packed (``convergence.Monitor.pack``), as the runner does.

Ratios are against the train step of the same run. Target: stall < 10 % of a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import convergence  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import monitoring  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--steps_between", type=int, default=20)
  args = parser.parse_args()
  saves = 4 if args.quick else 10

  config = config_lib.load_config(os.path.join(REPO, "configs/olmo_style.py:wsd"),
                                  {"progress_bar": False})
  dataset = data_lib.load_dataset(config.data, config.seed)
  graphdef, params = models.split_params(models.build_model(config.model, dataset, config.seed))
  schedule = optim.make_schedule(config)
  optimizer = optim.make_optimizer(config, schedule)
  loss_fn, value_and_grad = trainer.accumulate(trainer.make_loss_fn(config, graphdef), 1)
  state = trainer._canonical(trainer.TrainState(jnp.int32(0), params,  # pylint: disable=protected-access
                                                optimizer.tx.init(params)))
  _, iterator, _ = trainer._batches(config, dataset)  # pylint: disable=protected-access
  train_step = jax.jit(trainer.make_train_step(loss_fn, value_and_grad, optimizer.tx, schedule))
  monitor = monitoring.from_config(config)
  mstate = monitor.init()
  probe_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  rel_guess = jnp.ones((2, 2), jnp.float32)
  meta = {"config": checkpointing.config_json(config), "data": dataset.info}

  def step():
    nonlocal state
    t0 = time.perf_counter()
    state, metrics = train_step(state, next(iterator))
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0

  for _ in range(3):  # compile and warm up
    step()
  step_times = [step() for _ in range(30 if args.quick else 60)]
  n_params = models.count_params(state.params)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer._payload(  # pylint: disable=protected-access
      state, probe_key, rel_guess, mstate)) if hasattr(x, "nbytes"))

  def payload():
    return trainer._payload(state, probe_key, rel_guess, monitor.pack(mstate))  # pylint: disable=protected-access

  results = {}
  for mode in ("runner", "async", "sync"):
    stalls, during, waits = [], [], []
    with tempfile.TemporaryDirectory() as d:
      mgr = convergence.TieredCheckpointManager(d, async_save=(mode != "sync"))
      if mode == "runner":
        mgr = checkpointing.BackgroundManager(mgr)
      for i in range(saves + 1):
        for _ in range(args.steps_between):
          step()
        t0 = time.perf_counter()
        mgr.wait_until_finished()  # not timed: the previous save had steps_between steps
        waits.append(time.perf_counter() - t0)
        s = int(state.step)
        meta_s = {**meta, "data_position": trainer._iterator_position(iterator)}  # pylint: disable=protected-access
        t0 = time.perf_counter()
        mgr.save(s, payload(), metadata=meta_s, metrics={"train/loss": 1.0})
        stall = time.perf_counter() - t0
        if mode != "sync":
          during.append(step())  # the save is in flight now
        if i:  # the first save creates directories and warms Orbax up
          stalls.append(stall)
      mgr.close()
    results[mode] = (float(np.median(stalls)), float(np.median(during)) if during else None,
                     float(np.median(waits[1:])))

  t_step = float(np.median(step_times))
  rows = [("train step", t_step),
          ("runner save() (stall)", results["runner"][0]),
          ("  step during the save", results["runner"][1]),
          ("manager async save()", results["async"][0]),
          ("  step during the write", results["async"][1]),
          ("manager sync save()", results["sync"][0])]
  print(f"tiny GPT (olmo_style.py:wsd): {n_params:,} parameters, checkpoint payload "
        f"{n_bytes / 1e6:.2f} MB, {saves} timed saves per mode, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}")
  print(f"{'':<24}{'median ms':>11}{'× step':>9}")
  for name, t in rows:
    print(f"{name:<24}{t * 1e3:>11.2f}{t / t_step:>9.3f}")
  stall = results["runner"][0] / t_step
  print(f"stall / step = {stall:.1%} (target < 10%): {'PASS' if stall < 0.1 else 'FAIL'}; "
        f"extra time of the step that overlaps the save: "
        f"{(results['runner'][1] - t_step) / t_step:+.0%}; wait for the previous save after "
        f"{args.steps_between} steps: {results['runner'][2] * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
