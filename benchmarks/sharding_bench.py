"""Per-device memory of the fully-sharded layout at 1, 2, 4 and 8 devices.

    python benchmarks/sharding_bench.py            # GPT 6 × 512 (≈ 19 M parameters)
    python benchmarks/sharding_bench.py --quick    # GPT 2 × 128

Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself when the variable does not
already ask for devices (it must be set before JAX starts), so it runs on a laptop CPU; on a
machine with ≥ 8 accelerators it measures those instead.

For each device count n ∈ {1, 2, 4, 8} and each layout of ``experiments.sharding``
(``data_parallel``: state replicated; ``fsdp``: every parameter / optimizer-state leaf split
along its largest dimension divisible by n), the runner's own train step
(``experiments.trainer.make_train_step``: AdamW with the λ_c probe in the optax chain, as
``configs/olmo_style.py:wsd`` builds it, global batch 32 × 128 characters split over the n
devices) is lowered against abstract inputs carrying those shardings and compiled; nothing is
allocated. Figures per device, from XLA's compiled memory analysis of the SPMD program
(``compiled.memory_analysis()``: one device's module):

* ``state/dev``: parameters + optimizer state held by one device (from the shardings);
* ``args/dev``: XLA's argument bytes (state + batch shard);
* ``temp/dev``: XLA's temporaries (activations, gradients, all-gathered weights under FSDP);
* ``peak/dev``: arguments + outputs + temporaries − aliased bytes;
* ``state ratio``: fsdp ``state/dev`` ÷ data-parallel ``state/dev`` at the same n (target
  ≈ 1/n; leaves with no dimension divisible by n stay replicated, so slightly above).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2.0 ** 20


def _state_bytes_per_device(tree, shardings) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def setup(depth: int, width: int, batch: int, seq: int):
  config = config_lib.load_config(os.path.join(REPO, "configs/olmo_style.py") + ":wsd", {
      "model.depth": depth, "model.width": width, "model.num_heads": 4, "batch_size": batch,
      "data.context_length": seq, "data.max_chars": 200_000, "monitor.enabled": False})
  dataset = data_lib.load_dataset(config.data, config.seed)
  model = models.build_model(config.model, dataset, config.seed)
  graphdef, params = models.split_params(model)
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule).tx
  base_loss = trainer.make_loss_fn(config, graphdef)

  def make_step(mesh, layout):
    # As the trainer builds it (experiments.trainer.train_and_evaluate).
    loss = sharding.gather_params(base_loss, mesh) if layout == "fsdp" else base_loss
    return trainer.make_train_step(*trainer.accumulate(loss, 1), tx, schedule)
  state = jax.eval_shape(lambda p: trainer.TrainState(np.int32(0), p, tx.init(p)), params)
  _, iterator, _ = trainer._batches(config, dataset)  # pylint: disable=protected-access
  batch = jax.eval_shape(lambda: next(iterator))
  return config, make_step, state, batch, models.count_params(params)


def measure(make_step, state, batch, n: int, layout: str) -> dict[str, float]:
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  step = make_step(mesh, layout)
  state_sh = sharding.state_shardings(state, mesh, layout)
  small = sharding.replicated(mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
      batch)
  t0 = time.perf_counter()
  compiled = jax.jit(step, out_shardings=(state_sh, small)).lower(
      abstract_state, abstract_batch).compile()
  seconds = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
          - ma.alias_size_in_bytes)
  return {"state": _state_bytes_per_device(state, state_sh), "args": ma.argument_size_in_bytes,
          "temp": ma.temp_size_in_bytes, "peak": peak, "compile_s": seconds}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small GPT (2 × 128)")
  args = parser.parse_args(argv)
  depth, width = (2, 128) if args.quick else (6, 512)
  counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
  if counts != [1, 2, 4, 8]:
    print(f"warning: only {jax.device_count()} devices; measuring n = {counts}")
  _, step, state, batch, num_params = setup(depth, width, batch=32, seq=128)
  print(f"{jax.devices()[0].platform} × {jax.device_count()}, jax {jax.__version__}; GPT "
        f"{depth} × {width}: {num_params:,} parameters; AdamW + λ_c probe; global batch 32 × 128")
  header = (f"{'n':>2} {'layout':<14} {'state/dev':>10} {'args/dev':>10} {'temp/dev':>10} "
            f"{'peak/dev':>10} {'state ratio':>12} {'1/n':>6} {'peak ratio':>11}")
  print(header)
  print("-" * len(header))
  for n in counts:
    rows = {layout: measure(step, state, batch, n, layout) for layout in sharding.LAYOUTS}
    base = rows["data_parallel"]
    for layout, r in rows.items():
      ratio = r["state"] / base["state"]
      print(f"{n:>2} {layout:<14} {r['state'] / MiB:>8.2f}Mi {r['args'] / MiB:>8.2f}Mi "
            f"{r['temp'] / MiB:>8.2f}Mi {r['peak'] / MiB:>8.2f}Mi {ratio:>12.3f} "
            f"{1 / n:>6.3f} {r['peak'] / base['peak']:>11.3f}")
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
