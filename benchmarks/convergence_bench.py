"""Per-step cost of the convergence monitor (anomaly detector + network posterior), jitted, CPU.

    python benchmarks/convergence_bench.py            # 500 timed calls per row
    python benchmarks/convergence_bench.py --quick    # 100 timed calls per row

Rows, all measured in this run: the baseline (a jitted plain ``optax.adam`` update plus
``apply_updates`` on a 64-128-10 MLP, ~9.6k parameters, gradients precomputed); the anomaly
detector update; the network update (evidence decay, exact posterior by enumeration, conflict
rules, decision) for 6 metrics; both in one jitted monitor step; and ``anomaly_guard(adam)``
against the plain Adam baseline. Target: monitor step < 5 ms.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convergence import _anomaly as anomaly
from convergence import _network as network
from _timing import median_time  # benchmarks/_timing.py


def _time(fn, *args, repeats: int) -> float:
  return median_time(fn, *args, repeats=repeats, warmup=2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  repeats = 100 if args.quick else 500

  rng = np.random.default_rng(0)
  shapes = {"w1": (64, 128), "b1": (128,), "w2": (128, 10), "b2": (10,)}
  params = {k: jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for k, s in shapes.items()}
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  n_params = sum(p.size for p in jax.tree.leaves(params))

  adam = optax.adam(1e-3)

  @jax.jit
  def adam_step(params, state, grads):
    u, state = adam.update(grads, state, params)
    return optax.apply_updates(params, u), state

  guarded = anomaly.anomaly_guard(optax.adam(1e-3))

  @jax.jit
  def guarded_step(params, state, grads, loss):
    u, state = guarded.update(grads, state, params, value=loss)
    return optax.apply_updates(params, u), state

  det = anomaly.anomaly_detector()
  net = network.convergence_network(
      ["structural", "structural", "functional", "functional", "generalisation",
       "generalisation"], [20.0, 20.0, 200.0, 200.0, 1000.0, 1000.0])

  @jax.jit
  def detector_step(s, loss, g, u, r):
    return det.update(s, loss=loss, grad_norm=g, update_norm=u, lr_sharpness=r)

  @jax.jit
  def network_step(s, strength, direction, ctx):
    return net.update(s, network.soft_likelihood(strength, direction), ctx)

  @jax.jit
  def monitor_step(ds, ns, loss, g, u, r, strength, direction, ctx):
    ds = det.update(ds, loss=loss, grad_norm=g, update_norm=u, lr_sharpness=r)
    ns = net.update(ns, network.soft_likelihood(strength, direction), ctx)
    return ds, ns

  # Warm states: the detector's window full, the network with accumulated evidence.
  ds, ns = det.init(), net.init()
  strength = jnp.full((6,), 0.7)
  direction = jnp.ones((6,))
  ctx = network.unknown_context()._replace(lr_sharpness=jnp.float32(1.5))
  for k in range(80):
    ds, ns = monitor_step(ds, ns, jnp.float32(1.0 / (k + 1)), jnp.float32(1.0),
                          jnp.float32(0.01), jnp.float32(1.5), strength, direction, ctx)
  scalars = (jnp.float32(0.3), jnp.float32(1.0), jnp.float32(0.01), jnp.float32(1.5))

  base = _time(adam_step, params, adam.init(params), grads, repeats=repeats)
  rows = [
      ("baseline: optax.adam update + apply", base),
      ("anomaly detector update", _time(detector_step, ds, *scalars, repeats=repeats)),
      ("network update (posterior, conflict, decision)",
       _time(network_step, ns, strength, direction, ctx, repeats=repeats)),
      ("monitor step = detector + network (one jit)",
       _time(monitor_step, ds, ns, *scalars, strength, direction, ctx, repeats=repeats)),
      ("anomaly_guard(adam) update + apply",
       _time(guarded_step, params, guarded.init(params), grads, jnp.float32(0.3),
             repeats=repeats)),
  ]
  print(f"device: {jax.devices()[0].device_kind}; model: MLP 64-128-10 ({n_params} params); "
        f"{repeats} timed calls per row, median")
  print(f"{'component':<50} {'ms / step':>10} {'x baseline':>11}")
  for name, t in rows:
    print(f"{name:<50} {t * 1e3:>10.4f} {t / base:>11.2f}")
  monitor = rows[3][1]
  print(f"monitor step {monitor * 1e3:.3f} ms: target < 5 ms "
        f"{'met' if monitor < 5e-3 else 'NOT met'}")


if __name__ == "__main__":
  main()
