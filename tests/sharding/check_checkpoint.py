"""Sharded checkpoints restored onto other meshes, with the convergence checksums.

Runs in its own process with 8 simulated CPU devices (``test_sharded_process.py``). A
train-like state (parameters sharded FSDP-style, Adam's moments laid out like them, a step
counter, a new-style PRNG key and per-device keys split over the data axis) is saved from a
(2, 4) mesh and restored onto a (2, 2) mesh of ``jax.devices()[:4]``, saved again from there,
and restored onto one device: once with Orbax's ``StandardCheckpointer``, once through
``convergence.TieredCheckpointManager``. Restores are exact (every leaf bit for bit) and take
the target's sharding. The per-leaf SHA-256 fingerprints (``convergence._checksum``) depend on
the global values only, so the manifest written on 8 devices verifies the state restored
on 4 and on 1, and the manifests written from the different layouts are identical. A last
check runs two processes of 4 devices each (``jax.distributed`` over gloo), where no process
can address a whole leaf: each hashes only the blocks it owns (per-block digests, no gather),
both get the same manifest, a flipped bit is caught on every layout, and the checkpoint
manager saves asynchronously while the main thread runs collectives.
"""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

import convergence
from convergence import _checksum


def fsdp_spec(shape, axis: str, size: int) -> P:
  """Shard along the largest dimension divisible by ``size``; replicate when there is none."""
  for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[d] % size == 0:
      return P(*[axis if i == d else None for i in range(len(shape))])
  return P()


def mesh_of(devices, shape):
  return Mesh(np.array(devices[:math.prod(shape)]).reshape(shape), ("data", "fsdp"))


def shardings_for(state, mesh):
  """Target shardings on ``mesh`` (a ``Mesh``) or on one device (a ``jax.Device``)."""
  if not isinstance(mesh, Mesh):
    return jax.tree.map(lambda _: SingleDeviceSharding(mesh), state)
  size = mesh.shape["fsdp"]

  def one(path, x):
    if jax.tree_util.keystr(path).startswith("['keys']"):
      return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, fsdp_spec(np.shape(x), "fsdp", size))

  return jax.tree_util.tree_map_with_path(one, state)


def target(state, mesh):
  """The abstract restore target: shapes, dtypes and the shardings on ``mesh``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      state, shardings_for(state, mesh))


def host(x):
  """A leaf's global value as NumPy (key arrays as their raw key data)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def assert_exact_on(restored, saved, mesh):
  """Bit-for-bit the saved values, each leaf with the target sharding of ``mesh``."""
  want = shardings_for(saved, mesh)
  for (path, got), ref, s in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                 jax.tree.leaves(saved), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    # Compared as bytes: bit for bit, NaN payloads and signed zeros included.
    assert host(got).tobytes() == host(ref).tobytes(), name
    assert got.sharding.is_equivalent_to(s, got.ndim), f"{name}: {got.sharding} is not {s}"


@pytest.fixture(scope="module")
def state8(devices):
  """Parameters and Adam state after one update, sharded on the (2, 4) mesh, and keys."""
  mesh = mesh_of(devices, (2, 4))
  rng = np.random.default_rng(0)
  params = {"hidden": rng.normal(size=(16, 32)).astype(np.float32),
            "head": rng.normal(size=(32, 8)).astype(np.float32),
            "bias": rng.normal(size=(5,)).astype(np.float32)}  # 5: replicated
  grads = jax.tree.map(lambda x: np.float32(0.1) * x + np.float32(0.01), params)
  tx = optax.adam(1e-3)

  def one_step(params, grads):
    updates, opt_state = tx.update(grads, tx.init(params), params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
            "step": jnp.int32(1), "rng": jax.random.key(42),
            "keys": jax.random.split(jax.random.key(7), 8)}

  abstract = jax.eval_shape(one_step, params, grads)
  return jax.jit(one_step, out_shardings=shardings_for(abstract, mesh))(params, grads)


def test_state_is_sharded_as_intended(state8, devices):
  mesh = mesh_of(devices, (2, 4))
  assert_exact_on(state8, state8, mesh)
  w = state8["params"]["hidden"]
  assert w.addressable_shards[0].data.shape == (16, 8)  # 32 columns over fsdp = 4
  assert state8["opt_state"][0].mu["head"].addressable_shards[0].data.shape == (8, 8)


def test_fingerprints_depend_on_the_global_values_only(state8, devices):
  """Same digests for the state on 8 devices, on 4, on 1 and as NumPy; a one-ulp change in
  one shard of one leaf is caught and named."""
  manifest = _checksum.state_fingerprints(state8)
  layouts = {
      "4 devices": jax.device_put(state8, shardings_for(state8, mesh_of(devices, (2, 2)))),
      "1 device": jax.device_put(state8, devices[0]),
      "replicated": jax.device_put(state8, NamedSharding(mesh_of(devices, (2, 4)), P())),
  }
  for name, state in layouts.items():
    assert _checksum.state_fingerprints(state) == manifest, name
    assert _checksum.first_mismatch(state, manifest) is None, name
  numpy_state = jax.tree.map(host, state8)
  fp = _checksum.state_fingerprints(numpy_state)
  for name, entry in fp.items():
    if manifest[name]["kind"] == "array":
      assert entry == manifest[name], name

  w = np.array(state8["params"]["head"])
  w[31, 7] = np.nextafter(w[31, 7], np.inf)  # the last device's shard
  bad = dict(state8, params=dict(state8["params"], head=jax.device_put(
      w, state8["params"]["head"].sharding)))
  assert _checksum.first_mismatch(bad, manifest)[0] == "params/head"


def test_orbax_restores_onto_other_meshes(state8, devices, tmp_path):
  """8 -> 4 -> 1 devices with Orbax alone: exact values, target shardings, same digests."""
  mesh4 = mesh_of(devices, (2, 2))
  manifest = _checksum.state_fingerprints(state8)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "on8", state8)
  ckpt.wait_until_finished()

  state4 = ckpt.restore(tmp_path / "on8", target(state8, mesh4))
  assert_exact_on(state4, state8, mesh4)
  assert _checksum.first_mismatch(state4, manifest) is None
  assert state4["params"]["hidden"].addressable_shards[0].data.shape == (16, 16)

  ckpt.save(tmp_path / "on4", state4)
  ckpt.wait_until_finished()
  state1 = ckpt.restore(tmp_path / "on4", target(state8, devices[0]))
  assert_exact_on(state1, state8, devices[0])
  assert _checksum.first_mismatch(state1, manifest) is None
  # And the 8-device checkpoint straight onto one device.
  direct = ckpt.restore(tmp_path / "on8", target(state8, devices[0]))
  assert_exact_on(direct, state8, devices[0])
  ckpt.close()


def test_tiered_manager_restores_onto_other_meshes(state8, devices, tmp_path):
  """The same through ``TieredCheckpointManager``, whose restore re-computes every leaf's
  digest against the manifest saved on 8 devices (and raises on a mismatch)."""
  mesh4 = mesh_of(devices, (2, 2))
  state = dict(state8, epoch=3)  # a Python scalar leaf too
  mgr = convergence.TieredCheckpointManager(tmp_path / "ckpt", async_save=False)
  try:
    assert mgr.save(1, state, metrics={"loss": 1.0})
    restored4 = mgr.restore(1, target(state8, mesh4) | {"epoch": 0}).state
    assert restored4.pop("epoch") == 3
    assert_exact_on(restored4, state8, mesh4)

    assert mgr.save(2, dict(restored4, epoch=3))  # written from the 4-device layout
    restored1 = mgr.restore(2, target(state8, devices[0]) | {"epoch": 0}).state
    restored1.pop("epoch")
    assert_exact_on(restored1, state8, devices[0])
  finally:
    mgr.close()
  leaves = []
  for step in (1, 2):
    with open(tmp_path / "ckpt" / str(step) / "meta" / "metadata") as f:
      leaves.append(json.load(f)["leaves"])
  assert leaves[0] == leaves[1]  # the manifest written on 4 devices equals the one on 8


def test_trajectory_monitor_state_is_sharded_like_the_parameters(state8, devices):
  """convergence.trajectory_monitor keeps its K lagged updates laid out like the parameters
  (no ravel of the model into one vector): after init from the sharded parameters and after
  a jitted update, every lagged leaf has its parameter's shape and sharding."""
  params = state8["params"]
  tx = convergence.trajectory_monitor(half_width=3, max_lag=2, window=4)
  state = tx.init(params)
  step = jax.jit(lambda u, s: tx.update(u, s, None, value=1.0)[1])
  grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
  for _ in range(3):
    state = step(grads, state)
  assert float(state.info.cos[0]) == pytest.approx(1.0, abs=1e-6)   # the same update twice
  for lagged in state.tracker.directions:
    for got, want in zip(jax.tree.leaves(lagged), jax.tree.leaves(params)):
      assert got.shape == want.shape
      assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)


# --------------------------------------------------------------------------- multi-host

GLOBAL = np.arange(8 * 12, dtype=np.float32).reshape(8, 12) / 7
SAVED = P("data", "fsdp")   # (4, 3) blocks; process 0 holds the rows 0:4, process 1 the rows 4:8
LAYOUTS = {"same": SAVED, "rows": P("data", None), "columns": P(None, "fsdp"), "replicated": P(),
           "finer": P(("data", "fsdp"), None)}   # finer: every saved block spans 4 shards


def _global_array(mesh, spec, value=GLOBAL):
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda i: value[i])


def _worker(process_id: int, port: int, workdir: str) -> None:
  """One of two processes with 4 CPU devices each, on a global (8, 12) array sharded over all 8
  devices, of which this process addresses half. Prints what the parent checks."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  mesh = mesh_of(jax.devices(), (2, 4))
  state = {"x": _global_array(mesh, SAVED), "step": 3}
  out = {"addressable": state["x"].is_fully_addressable}
  # Hashing reads this process's shards only: process 0 hashes while process 1 runs nothing
  # (a collective inside would wait for process 1 forever), then tells it through a file.
  flag = os.path.join(workdir, "hashed")
  if process_id == 0:
    out["local"] = _checksum.local_fingerprints(state)
    with open(flag + ".tmp", "w") as f:
      f.write("done")
    os.replace(flag + ".tmp", flag)
  else:
    for _ in range(1200):
      if os.path.exists(flag):
        break
      time.sleep(0.1)
  manifest = _checksum.state_fingerprints(state)   # the one exchange, on the main thread
  out["fp"] = manifest
  bad = GLOBAL.copy()
  bad.view(np.uint32)[7, 11] ^= 1                  # the last bit of one element of process 1
  out["verdicts"] = {name: _checksum.first_mismatch({"x": _global_array(mesh, spec), "step": 3},
                                                    manifest) for name, spec in LAYOUTS.items()}
  out["bad"] = {name: _checksum.first_mismatch({"x": _global_array(mesh, spec, bad), "step": 3},
                                               manifest) for name, spec in LAYOUTS.items()}
  # The manager with asynchronous saves while the main thread keeps running collectives.
  total = jax.jit(lambda a: jnp.sum(a * a), out_shardings=NamedSharding(mesh, P()))
  mgr = convergence.TieredCheckpointManager(os.path.join(workdir, "ckpt"), async_save=True)
  sums = []
  for step in (1, 2):
    assert mgr.save(step, state, metrics={"loss": 1.0})
    sums += [float(total(state["x"])) for _ in range(20)]   # collectives while Orbax writes
  target = {"x": jax.ShapeDtypeStruct(GLOBAL.shape, GLOBAL.dtype,
                                      sharding=NamedSharding(mesh, LAYOUTS["finer"])), "step": 0}
  restored = mgr.restore(2, target).state
  mgr.close()
  out["restored"] = np.asarray(multihost_utils.process_allgather(restored["x"], tiled=True)
                               ).tobytes() == GLOBAL.tobytes()
  out["sums"] = sorted(set(sums))
  print("RESULT " + json.dumps(out), flush=True)
  jax.distributed.shutdown()


def _block_digest(key: str, value=GLOBAL) -> str:
  """SHA-256 of one block as the manifest defines it, computed here from the global array."""
  (r0, r1), (c0, c1) = [map(int, part.split(":")) for part in key.split(",")]
  head = f"array|float32|[8, 12]|{key}|".encode()
  return hashlib.sha256(head + np.ascontiguousarray(value[r0:r1, c0:c1]).tobytes()).hexdigest()


def test_fingerprints_of_arrays_spread_over_two_processes(tmp_path):
  """No leaf is gathered: each process hashes the blocks it owns, without the other process
  taking part; one exchange gives both the same manifest; every layout verifies; a flipped bit
  in one process's block is caught by both, on every layout; and the checkpoint manager saves
  asynchronously while the main thread runs collectives, then restores onto a finer mesh."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      # stderr apart: Gloo's C++ logging writes there unbuffered and, merged with stdout,
      # could land inside the RESULT line.
      out, err = p.communicate(timeout=240)
    finally:
      p.kill()
    assert p.returncode == 0, (out[-3000:], err[-3000:])
    outs.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
  blocks = [f"{r}:{r + 4},{c}:{c + 3}" for r in (0, 4) for c in (0, 3, 6, 9)]
  want_x = {"kind": "array", "dtype": "float32", "shape": [8, 12],
            "shards": {k: _block_digest(k) for k in blocks}}
  assert outs[0]["local"]["x"]["shards"] == {k: want_x["shards"][k] for k in blocks[:4]}
  flipped = GLOBAL.copy()
  flipped.view(np.uint32)[7, 11] ^= 1
  assert _block_digest("4:8,9:12", flipped) != want_x["shards"]["4:8,9:12"]
  for out in outs:
    assert out["addressable"] is False  # each process holds 4 of the 8 shards
    assert out["fp"] == {"x": want_x,
                         "step": _checksum.state_fingerprints({"step": 3})["step"]}
    assert out["verdicts"] == {name: None for name in LAYOUTS}
    for name in LAYOUTS:
      leaf, what = out["bad"][name]
      assert leaf == "x" and "block [4:8,9:12]" in what, (name, what)
    assert out["restored"] is True
    # The 40 all-reduces run beside the asynchronous saves all agree; float32 over 96 terms is
    # within 96·2⁻²⁴ ≈ 6e-6 relative of the float64 sum.
    assert len(out["sums"]) == 1
    assert out["sums"][0] == pytest.approx(float(np.sum(GLOBAL.astype(np.float64) ** 2)), rel=1e-5)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
