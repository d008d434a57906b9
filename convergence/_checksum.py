"""Per-leaf fingerprints of a state pytree, and JSON sanitising for checkpoint metadata.

Orbax writes no data checksums: a flipped byte inside a saved array restores as a silently
wrong value (reproduced on orbax-checkpoint 0.12.8). The checkpoint manager therefore
records, at save time, a SHA-256 digest of every leaf of the state (over the leaf's kind,
dtype, shape and raw bytes, computed on host) and recomputes it on the restored leaf.

One process: one digest per leaf over its global value, so a state saved from one mesh
verifies when restored onto another. Several processes (multi-host): a leaf that no process
addresses whole is never gathered; it gets one digest per block of its sharding, each hashed
by the process that owns the block from its own shard (:func:`local_fingerprints`, no
collective, safe on any thread), and the digests are then exchanged once on the main thread
(:func:`state_fingerprints`). A restore checks each saved block on a process that holds it
inside one shard, whatever the new mesh; only a block split over several shards is gathered.

Leaves are named by a path string that survives restores without a target (where Orbax
turns tuples into lists and NamedTuples into dicts): dict keys, NamedTuple field names and
sequence indices all become plain path components, e.g. ``opt_state/0/mu/dense/kernel``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

# Python scalars are restored by Orbax as Python scalars (exactly, float64 included) when
# the restore target holds a Python scalar of the same type, so they are fingerprinted by
# value rather than by array bytes.
_PY_SCALARS = (bool, int, float)


def leaf_path(path) -> str:
  """Returns the structure-independent name of a leaf from its jax key path."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:  # custom key types: their str() is stable for one pytree class
      parts.append(str(k))
  return '/'.join(parts) or '<root>'


def flatten_with_names(tree) -> list[tuple[str, Any]]:
  """Flattens `tree` into ``(leaf_path, leaf)`` pairs; raises on duplicate names."""
  pairs = [(leaf_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  seen = set()
  for name, _ in pairs:
    if name in seen:
      raise ValueError(
          f'state: two leaves share the path name {name!r} (e.g. a dict key that looks '
          'like a sequence index); rename one so each leaf has a unique checksum entry.'
      )
    seen.add(name)
  return pairs


def _is_key_array(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def leaf_kind(x) -> str:
  """``'python'`` (bool/int/float), ``'key'`` (new-style PRNG key array) or ``'array'``."""
  if isinstance(x, _PY_SCALARS) and not isinstance(x, np.generic):
    return 'python'
  if _is_key_array(x):
    return 'key'
  return 'array'


def _gathered_value(x) -> np.ndarray:
  """The leaf's global value on host, whatever its sharding.

  ``device_get`` assembles any array this process can address in full (one process, any
  mesh), so the bytes, hence the digest, do not depend on the sharding. An array spread over
  several processes is all-gathered with ``process_allgather``: a collective, used only by
  :func:`first_mismatch` for a whole-leaf digest (a checkpoint saved from one process,
  restored onto several) or a block no process holds in one piece; call it from the thread
  that runs the training collectives, as every process calls restore together.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _digest(kind: str, dtype: str, shape, data: np.ndarray, block: str | None = None) -> str:
  """SHA-256 over a header (kind, dtype, global shape and, for a block, its index) and the
  raw bytes of ``data`` in C order. hashlib releases the GIL for large buffers."""
  h = hashlib.sha256()
  head = f'{kind}|{dtype}|{list(shape)}|'
  h.update((head if block is None else f'{head}{block}|').encode())
  # reshape(-1) first: a 0-d array cannot be viewed as a different itemsize.
  h.update(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
  return h.hexdigest()


def _array_data(x):
  """(kind, the array whose bytes are hashed): a key array is hashed through its key data."""
  kind = leaf_kind(x)
  return kind, (jax.random.key_data(x) if kind == 'key' else x)


def _is_spread(x) -> bool:
  """Whether no process can address the whole leaf (it is sharded over several processes)."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def _block_key(index, shape) -> str:
  """``'0:4,3:6'``: the global block a shard covers, one ``start:stop`` per dimension."""
  return ','.join('%d:%d' % s.indices(n)[:2] for s, n in zip(index, shape))


def _blocks(data) -> dict[str, Any]:
  """{block key: its owner device} over the whole (global) sharding of ``data``.

  A block held by several devices (replication) is owned by the one with the smallest id, a
  rule every process evaluates alike from the sharding, with no communication.
  """
  owners: dict[str, Any] = {}
  for dev, index in data.sharding.devices_indices_map(data.shape).items():
    key = _block_key(index, data.shape)
    if key not in owners or dev.id < owners[key].id:
      owners[key] = dev
  return dict(sorted(owners.items()))


def _local_block_digests(x) -> dict[str, str]:
  """{block key: digest} of the blocks of a spread leaf whose owner device is on this process.

  Reads only this process's shards (no gather, no collective): safe on any thread.
  """
  kind, data = _array_data(x)
  me = jax.process_index()
  shard_of = {s.device: s for s in data.addressable_shards}
  out = {}
  for key, dev in _blocks(data).items():
    if dev.process_index == me:
      out[key] = _digest(kind, str(x.dtype), np.shape(x), np.asarray(shard_of[dev].data), key)
  return out


def leaf_fingerprint(x) -> dict[str, Any]:
  """The manifest entry of one leaf this process addresses whole: kind, dtype, shape, digest.

  The digest covers a header with kind, dtype and shape, so a restore that yields the same
  bytes under another dtype or shape does not verify. (A leaf spread over several processes
  gets per-block digests instead: :func:`local_fingerprints`.)
  """
  kind = leaf_kind(x)
  if kind == 'python':
    # float.hex is exact (every bit of the float64).
    py_type = type(x).__name__
    text = float.hex(x) if isinstance(x, float) else str(int(x))
    h = hashlib.sha256(f'python|{py_type}|{text}'.encode())
    return {'kind': kind, 'dtype': py_type, 'shape': [], 'sha256': h.hexdigest()}
  kind, data = _array_data(x)
  dtype, shape = str(x.dtype), list(np.shape(x))
  return {'kind': kind, 'dtype': dtype, 'shape': shape,
          'sha256': _digest(kind, dtype, shape, _gathered_value(data))}


def local_fingerprints(state) -> dict[str, dict[str, Any]]:
  """This process's part of the manifest, computed from its own shards alone.

  A leaf this process addresses whole (every leaf of a one-process run) gets
  :func:`leaf_fingerprint`; a leaf sharded over several processes gets ``'shards'``: the
  digests of the blocks of its sharding whose owner device is local (:func:`_blocks`), each
  over a header naming the block and the block's bytes. Runs no collective, so it may run on
  any thread while the training collectives run on the main one.
  """
  out = {}
  for name, x in flatten_with_names(state):
    if _is_spread(x):
      kind, _ = _array_data(x)
      out[name] = {'kind': kind, 'dtype': str(x.dtype), 'shape': list(np.shape(x)),
                   'shards': _local_block_digests(x)}
    else:
      out[name] = leaf_fingerprint(x)
  return out


def _exchange(local: Mapping[str, Any], spread: Sequence[tuple[str, Any]]) -> dict[str, dict]:
  """Completes the ``'shards'`` of the spread leaves with every process's blocks: one
  ``process_allgather`` of a fixed-size table (32 digest bytes and an owner flag per block,
  the blocks known to every process from the shardings). A collective: main thread only."""
  keys = [(name, key) for name, x in spread for key in _blocks(_array_data(x)[1])]
  table = np.zeros((len(keys), 33), np.uint8)
  for i, (name, key) in enumerate(keys):
    digest = local[name]['shards'].get(key)
    if digest is not None:
      table[i, 0] = 1
      table[i, 1:] = np.frombuffer(bytes.fromhex(digest), np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(table))       # (processes, R, 33)
  owners = everyone[:, :, 0].sum(0)
  if np.any(owners != 1):
    raise RuntimeError(f'checksum blocks with {sorted(set(owners.tolist()))} owners; every '
                       'block must have exactly one (do all processes save the same state?)')
  full = np.einsum('pr,prb->rb', everyone[:, :, 0].astype(np.int64), everyone[:, :, 1:])
  out: dict[str, dict] = {name: {} for name, _ in spread}
  for (name, key), row in zip(keys, full.astype(np.uint8)):
    out[name][key] = row.tobytes().hex()
  return out


def state_fingerprints(state) -> dict[str, dict[str, Any]]:
  """The manifest of `state`: ``{leaf_path: entry}``, identical on every process.

  One process (whatever its mesh): one SHA-256 per leaf over its global value, so the same
  state on any mesh, on one device or as NumPy has the same fingerprints. Several processes:
  a leaf no process addresses whole gets one SHA-256 per block of its sharding, hashed by the
  process owning the block (:func:`local_fingerprints`, no leaf is gathered), and the
  digests are then exchanged by one small ``process_allgather`` — a collective, so call it
  from the thread that runs the training collectives, on every process in the same order.

  Costs one pass over the bytes this process owns (SHA-256 runs at ~1.5 GB/s on this CPU,
  so ~10 ms for a 16 MB state).
  """
  local = local_fingerprints(state)
  spread = [(name, x) for name, x in flatten_with_names(state) if _is_spread(x)]
  if spread:
    for name, shards in _exchange(local, spread).items():
      local[name] = dict(local[name], shards=shards)
  return local


def _parse_block(key: str) -> tuple[tuple[int, int], ...]:
  return tuple(tuple(int(v) for v in part.split(':')) for part in key.split(',')) if key else ()


def _local_block(data, block, cache):
  """The block's values from one addressable shard that contains it, or None. ``cache`` keeps
  the shards already copied to host (several saved blocks may lie in one shard)."""
  for shard in data.addressable_shards:
    have = [s.indices(n)[:2] for s, n in zip(shard.index, data.shape)]
    if all(a <= lo and hi <= b for (a, b), (lo, hi) in zip(have, block)):
      sub = tuple(slice(lo - a, hi - a) for (a, _), (lo, hi) in zip(have, block))
      if shard.device not in cache:
        cache[shard.device] = np.asarray(shard.data)
      return cache[shard.device][sub]
  return None


def _block_status(x, want, key, value=None, cache=None) -> tuple[int, str | None]:
  """(1 ok | 2 changed | 0 not checkable here, message) of the saved block ``key`` of leaf x:
  read from ``value`` (the leaf's whole hashed data) when given, else from a local shard."""
  kind, data = _array_data(x)
  block = _parse_block(key)
  if value is None:
    vals = _local_block(data, block, {} if cache is None else cache)
    if vals is None:
      return 0, None
  else:
    vals = value[tuple(slice(lo, hi) for lo, hi in block)]
  if _digest(kind, str(x.dtype), np.shape(x), vals, key) == want['shards'][key]:
    return 1, None
  return 2, _block_changed(want, key)


def _block_changed(want, key) -> str:
  return (f'block [{key}] has changed: its checksum differs from the saved '
          f'{want["shards"][key][:16]}… ({want["dtype"]}{want["shape"]})')


def _leaf_status(x, want, value=None) -> str | None:
  """None if leaf ``x`` matches its manifest entry, else what differs.

  ``value``: the global value of the leaf's hashed data if already at hand (gathered); else it
  is read from ``x``, which this process must address whole.
  """
  kind = leaf_kind(x)
  if kind == 'python':
    fp = leaf_fingerprint(x)
  else:
    kind, data = _array_data(x)
    dtype, shape = str(x.dtype), list(np.shape(x))
    if value is None:
      value = _gathered_value(data)
    if 'shards' in want:
      if (kind, dtype, shape) != (want['kind'], want['dtype'], want['shape']):
        return (f'is {kind} {dtype}{shape} but was saved as {want["kind"]} '
                f'{want["dtype"]}{want["shape"]}')
      return next((m for key in want['shards']
                   for status, m in [_block_status(x, want, key, value)] if status != 1), None)
    fp = {'kind': kind, 'dtype': dtype, 'shape': shape,
          'sha256': _digest(kind, dtype, shape, value)}
  saved = want.get('sha256', 'per-block digests')
  if fp['sha256'] == saved:
    return None
  return (f'has checksum {fp["sha256"][:16]}… ({fp["dtype"]}{fp["shape"]}) but was saved '
          f'with {saved[:16]}… ({want["dtype"]}{want["shape"]})')


def _spread_verdicts(got, manifest, names) -> dict[str, str | None]:
  """:func:`_leaf_status` of the leaves spread over processes, identical on every process.

  Each process checks the saved blocks it holds inside one of its shards; one
  ``process_allgather`` of the per-block results combines them (a collective: main thread).
  A leaf saved with a whole-leaf digest (from one process), or with a block no process holds
  inside one shard (restored onto a finer mesh), is gathered and checked whole.
  """
  blocks, local = [], []
  for name in names:
    x, want = got[name], manifest[name]
    if 'shards' in want and (want['kind'], want['dtype'], want['shape']) == (
        _array_data(x)[0], str(x.dtype), list(np.shape(x))):
      cache = {}
      for key in want['shards']:
        blocks.append((name, key))
        local.append(_block_status(x, want, key, cache=cache)[0])
  if blocks:
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(local, np.int32)))
    everyone = everyone.reshape(-1, len(blocks))
  else:
    everyone = np.zeros((1, 0), np.int32)
  changed, checked = np.any(everyone == 2, axis=0), np.any(everyone >= 1, axis=0)
  out = {}
  for name in names:
    mine = [i for i, (n, _) in enumerate(blocks) if n == name]
    first = next((i for i in mine if changed[i]), None)
    if first is not None:
      out[name] = _block_changed(manifest[name], blocks[first][1])
    elif mine and bool(np.all(checked[mine])):
      out[name] = None
    else:
      x = got[name]
      out[name] = _leaf_status(x, manifest[name], _gathered_value(_array_data(x)[1]))
  return out


def first_mismatch(
    state, manifest: Mapping[str, Mapping[str, Any]]
) -> tuple[str, str] | None:
  """Compares a restored `state` with the saved manifest.

  A leaf saved whole is checked against its SHA-256 on any mesh; a leaf saved per block is
  checked block by block, each process on the blocks it holds (see
  :func:`_spread_verdicts`: with several processes this is a collective, call it from the
  main thread on every process together, as restore is).

  Returns:
    None when every leaf matches, else ``(leaf_path, what)`` for the first bad leaf in
    sorted path order, `what` saying whether it is missing, unexpected or changed.
  """
  got = dict(flatten_with_names(state))
  names = sorted(set(manifest) | set(got))
  spread = [n for n in names if n in got and n in manifest and _is_spread(got[n])]
  verdicts = _spread_verdicts(got, manifest, spread) if spread else {}
  for name in names:
    if name not in got:
      return name, 'is missing from the restored state'
    if name not in manifest:
      return name, 'is in the restored state but not in the saved manifest'
    what = verdicts[name] if name in verdicts else _leaf_status(got[name], manifest[name])
    if what is not None:
      return name, what
  return None


def to_json(value, *, name: str):
  """Converts `value` to plain JSON types (dict/list/str/bool/int/float/None).

  numpy and jax scalars become Python scalars and arrays become nested lists, so nothing
  non-serialisable reaches Orbax's asynchronous commit (where a failure would lose the
  checkpoint and surface only later). Raises ``ValueError`` naming the offending entry.
  """

  def conv(v, where):
    if v is None or isinstance(v, (str, bool)):
      return v
    if isinstance(v, (int, float)) and not isinstance(v, np.generic):
      return v
    if isinstance(v, np.generic):
      return v.item()
    if isinstance(v, (np.ndarray, jax.Array)):
      if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
        raise ValueError(f'{where}: PRNG keys belong in the state pytree, not in metadata')
      return np.asarray(jax.device_get(v)).tolist()
    if isinstance(v, Mapping):
      out = {}
      for k, x in v.items():
        if not isinstance(k, str):
          raise ValueError(f'{where}: JSON keys must be str, got {k!r} ({type(k).__name__})')
        out[k] = conv(x, f'{where}[{k!r}]')
      return out
    if isinstance(v, (list, tuple)):
      return [conv(x, f'{where}[{i}]') for i, x in enumerate(v)]
    raise ValueError(
        f'{where}: value of type {type(v).__name__} is not JSON-serialisable; '
        'use dict/list/str/bool/int/float/None or numpy/jax scalars and arrays'
    )

  out = conv(value, name)
  json.dumps(out)  # belt and braces: fail here, synchronously, never in the commit thread
  return out


def metrics_to_floats(metrics, *, name: str = 'metrics') -> dict[str, float]:
  """A flat ``{str: Python float}`` copy of `metrics` (NaN and ±inf kept as floats)."""
  if metrics is None:
    return {}
  if not isinstance(metrics, Mapping):
    raise ValueError(f'{name}: expected a mapping of metric name to scalar, got {type(metrics).__name__}')
  out = {}
  for k, v in metrics.items():
    if not isinstance(k, str):
      raise ValueError(f'{name}: metric names must be str, got {k!r}')
    try:
      arr = np.asarray(jax.device_get(v))
      if arr.size != 1:
        raise TypeError
      out[k] = float(arr.reshape(()))
    except (TypeError, ValueError):
      raise ValueError(f'{name}[{k!r}]: expected a scalar, got {v!r}') from None
  return out


def sanitised_rank_value(value: float | None, mode: str) -> float:
  """The value used to rank a checkpoint: NaN or missing becomes the worst possible.

  Orbax's ``BestN`` ranks NaN as best (orbax-checkpoint 0.12); here NaN maps to ``+inf`` when
  minimising and ``-inf`` when maximising, so it can never displace a finite metric.
  """
  worst = math.inf if mode == 'min' else -math.inf
  if value is None or math.isnan(value):
    return worst
  return value


def canonical_digest(doc: Mapping[str, Any]) -> str:
  """SHA-256 of the canonical JSON form of `doc` (sorted keys, no whitespace)."""
  text = json.dumps(doc, sort_keys=True, separators=(',', ':'), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()
