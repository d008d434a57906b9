"""Chunked vs naive token distillation loss + gradient: peak memory and wall time on this CPU.

    python benchmarks/distill_bench.py            # full (~4 min on 2 cores)
    python benchmarks/distill_bench.py --quick    # smaller smoke version (~30 s)

One step = value and gradient of the loss w.r.t. the student's hidden states and output
kernel (the teacher is frozen), from final hidden states ``[T, H]`` of both models and
``[H, V]`` projections, float32. *naive* builds the full ``[T, V]`` logits of both models
(``chunk_size=None``); *fused* and *remat* are :func:`distill.chunked_token_loss` with
``grad_mode="fused"`` / ``"remat"``. Peak memory is XLA's compiled memory analysis
(arguments + outputs + temporaries − aliased, i.e. everything the executable holds at once;
compile only, so it is also reported where running would not fit). Time is the median of a
few runs after a warm-up. Targets: ≥ 80 % less peak memory than naive at
T × V = 8,192 × 32k, memory flat as T grows, time ≤ 1.3× naive.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill._chunked import chunked_token_loss
from distill._divergences import TOKEN_LOSSES

GiB = 2.0 ** 30


def make_step(mode: str, loss: str, chunk: int):
  chunk_size = None if mode == "naive" else chunk
  grad_mode = "fused" if mode == "naive" else mode

  def step(hs, ks, ht, kt):
    def f(hs, ks):
      return chunked_token_loss(hs, ks, ht, kt, loss=loss, temperature=2.0,
                                        chunk_size=chunk_size, grad_mode=grad_mode)
    return jax.value_and_grad(f, argnums=(0, 1))(hs, ks)
  return jax.jit(step)


def shapes(t: int, h: int, v: int):
  f32 = jnp.float32
  return (jax.ShapeDtypeStruct((t, h), f32), jax.ShapeDtypeStruct((h, v), f32),
          jax.ShapeDtypeStruct((t, h), f32), jax.ShapeDtypeStruct((h, v), f32))


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def timed(compiled: dict, args, repeats: int) -> dict:
  """Median wall time per mode; rounds interleave the modes so that background load on a
  shared machine hits each of them alike. One warm-up round first."""
  times = {mode: [] for mode in compiled}
  for r in range(repeats + 1):
    for mode, fn in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      if r:
        times[mode].append(time.perf_counter() - t0)
  return {mode: float(np.median(ts)) for mode, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--loss", default="forward_kl", choices=TOKEN_LOSSES[:-1])
  args = parser.parse_args()

  if args.quick:
    mem_grid = [(t, 8192) for t in (1024, 2048, 4096)]
    time_grid = [(2048, 8192)]
  else:
    mem_grid = [(t, v) for v in (32768, 131072) for t in (2048, 4096, 8192, 16384)]
    time_grid = [(8192, 32768)]
  modes = ("naive", "fused", "remat")
  h, chunk = args.hidden, args.chunk
  print(f"# {args.loss}, batch 1, float32, H_s = H_t = {h}, chunk {chunk}, "
        f"{jax.devices()[0].device_kind} ({jax.local_device_count()} device, "
        f"{__import__('os').cpu_count()} cores), jax {jax.__version__}")

  rng = np.random.default_rng(0)
  print("\n| T | V | mode | peak memory (GiB) | vs naive | time (s) | vs naive |")
  print("|---:|---:|---|---:|---:|---:|---:|")
  for t, v in mem_grid:
    compiled = {m: make_step(m, args.loss, chunk).lower(*shapes(t, h, v)).compile()
                for m in modes}
    mem = {m: peak_bytes(c) for m, c in compiled.items()}
    secs = {}
    if (t, v) in time_grid:
      arrays = tuple(jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0] if i % 2 else 1),
                                 jnp.float32)
                     for i, s in enumerate(shapes(t, h, v)))
      secs = timed(compiled, arrays, args.repeats)
      del arrays
    for m in modes:
      time_s = f"{secs[m]:.2f}" if secs else "—"
      time_ratio = f"{secs[m] / secs['naive']:.2f}" if secs else "—"
      print(f"| {t} | {v} | {m} | {mem[m] / GiB:.3f} | {mem[m] / mem['naive']:.3f} | "
            f"{time_s} | {time_ratio} |", flush=True)
    del compiled


if __name__ == "__main__":
  main()
