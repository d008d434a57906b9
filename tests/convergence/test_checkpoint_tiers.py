"""Tests for convergence._checkpoint: tiers, checksums, atomicity, rollback.

References are independent of the code under test: bit-for-bit comparison of leaves and
tree structure, hand-computed retention lists, and the step directories on disk (listed
with os.listdir, not through the manager or Orbax).
"""

import dataclasses
import importlib.util
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convergence._checkpoint import (
    CheckpointSaveError,
    CorruptCheckpointError,
    TierRetention,
    TieredCheckpointManager,
    retained_steps,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
CHILD = pathlib.Path(__file__).with_name('checkpoint_kill_child.py')


# ------------------------------------------------------------------------------ helpers


def disk_steps(directory) -> list[int]:
  """Committed step directories, read from the file system directly."""
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def tmp_dirs(directory) -> list[str]:
  return [n for n in os.listdir(directory) if 'orbax-checkpoint-tmp' in n]


def assert_bitwise_equal(got, want):
  """Same tree structure (node types included) and identical bytes, dtypes and shapes."""
  got_leaves, got_def = jax.tree_util.tree_flatten(got)
  want_leaves, want_def = jax.tree_util.tree_flatten(want)
  assert got_def == want_def, f'{got_def} != {want_def}'
  for g, w in zip(got_leaves, want_leaves):
    if isinstance(w, (bool, int, float)):
      assert type(g) is type(w), (type(g), type(w))
      assert (float.hex(g) == float.hex(w)) if isinstance(w, float) else g == w
      continue
    if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
      assert g.dtype == w.dtype
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert g.tobytes() == w.tobytes()


def realistic_state(seed: int = 0):
  """Params, an adamw state after one update, a PRNG key, array and Python scalars."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      'dense': {'kernel': jax.random.normal(k1, (8, 4)), 'bias': jnp.zeros(4)},
      'embed': jax.random.normal(k2, (5, 3)).astype(jnp.bfloat16),
  }
  tx = optax.adamw(1e-3, weight_decay=1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {
      'params': params,
      'opt_state': opt_state,
      'rng': k3,
      'step': jnp.int32(17),
      'epoch': 3,                     # Python int
      'lr_scale': 0.1,                # Python float (not representable in float32)
      'pair': (jnp.int32(1), jnp.float32(2.5)),
  }


def tiny(step):
  return {'w': jnp.full((4,), float(step), jnp.float32), 'step': step}


def abstract(state):
  return jax.eval_shape(lambda: state)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact_and_keeps_named_tuples(tmp_path):
  state = realistic_state()
  metadata = {
      'config': {'lr': 1e-3, 'layers': [2, 3], 'name': 'tiny-gpt'},
      'data': {'epoch': 1, 'position': 12345},
      'monitor': {'posterior': np.float32(0.75), 'window': np.arange(3)},
  }
  with TieredCheckpointManager(tmp_path) as mgr:
    assert mgr.save(5, state, metadata=metadata, metrics={'loss': jnp.float32(1.25)})
    restored = mgr.restore(5, abstract(state))

  assert_bitwise_equal(restored.state, state)
  opt = restored.state['opt_state']
  assert isinstance(opt, tuple) and isinstance(opt[0], optax.ScaleByAdamState)
  assert isinstance(restored.state['pair'], tuple)
  assert restored.metadata == {
      'config': {'lr': 1e-3, 'layers': [2, 3], 'name': 'tiny-gpt'},
      'data': {'epoch': 1, 'position': 12345},
      'monitor': {'posterior': 0.75, 'window': [0, 1, 2]},
  }
  assert restored.record.metrics == {'loss': 1.25}
  assert type(restored.record.metrics['loss']) is float

  # A fresh manager (new process in real use) verifies the same checkpoint; without a
  # target Orbax returns lists/dicts but every leaf still matches its checksum.
  mgr = TieredCheckpointManager(tmp_path)
  untargeted = mgr.restore(5)
  assert isinstance(untargeted.state['pair'], list)
  np.testing.assert_array_equal(
      untargeted.state['opt_state'][0]['mu']['dense']['kernel'],
      state['opt_state'][0].mu['dense']['kernel'],
  )
  mgr.close()



def test_zero_size_leaves_round_trip(tmp_path):
  # Orbax refuses zero-size arrays (e.g. the rule counts of a controller without rules); the
  # manager carries their shape and dtype in the manifest and refills them on restore.
  state = {'w': jnp.arange(3.0), 'rules_fired': jnp.zeros((0,), jnp.int32),
           'pair': (jnp.zeros((2, 0), jnp.bfloat16), jnp.int32(7))}
  with TieredCheckpointManager(tmp_path) as mgr:
    assert mgr.save(1, state)
    restored = mgr.restore(1, abstract(state)).state
    untargeted = mgr.restore(1).state
  for got in (restored, untargeted):
    assert got['rules_fired'].shape == (0,) and got['rules_fired'].dtype == jnp.int32
    assert got['pair'][0].shape == (2, 0) and got['pair'][0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got['w'], state['w'])
  assert isinstance(restored['pair'], tuple) and int(restored['pair'][1]) == 7

# ------------------------------------------------------------------------------ retention


def test_retained_steps_sanitises_nan_and_breaks_ties_by_recency():
  def rec(tier, loss=None):
    return {'tier': tier, 'pinned': False, 'metrics': {} if loss is None else {'m': loss}}

  records = {1: rec('candidate', 0.2), 2: rec('candidate', math.nan), 3: rec('candidate', 0.9),
             4: rec('candidate'), 5: rec('candidate', 0.5), 6: rec('candidate', 0.2)}
  minimise = TierRetention(candidate=2, candidate_metric='m', candidate_mode='min', keep_newest=False)
  maximise = TierRetention(candidate=2, candidate_metric='m', candidate_mode='max', keep_newest=False)
  assert retained_steps(records, minimise) == {1, 6}          # tie at 0.2 → both, later first
  assert retained_steps(records, dataclasses.replace(minimise, candidate=1)) == {6}
  assert retained_steps(records, maximise) == {3, 5}          # NaN is -inf when maximising
  only_nan = {1: rec('candidate', 0.4), 2: rec('candidate', math.nan)}
  assert retained_steps(only_nan, dataclasses.replace(minimise, candidate=1)) == {1}


def test_tier_retention_sequence_matches_hand_computed_lists(tmp_path):
  retention = TierRetention(preliminary=2, observation=1, candidate=2, candidate_metric='loss')
  mgr = TieredCheckpointManager(tmp_path, retention=retention)

  def on_disk():
    mgr.wait_until_finished()
    return disk_steps(tmp_path)

  for s in (1, 2, 3):
    mgr.save(s, tiny(s))
  assert on_disk() == [2, 3]                              # latest 2 preliminary
  mgr.promote(2, 'observation', reason='structure stable')
  mgr.save(4, tiny(4))
  mgr.save(5, tiny(5), tier='candidate', metrics={'loss': 0.5})
  assert on_disk() == [2, 3, 4, 5]
  mgr.save(6, tiny(6), tier='candidate', metrics={'loss': float('nan')})
  assert on_disk() == [2, 3, 4, 5, 6]                     # k=2 still has room
  mgr.save(7, tiny(7), tier='candidate', metrics={'loss': 0.3})
  assert on_disk() == [2, 3, 4, 5, 7]                     # NaN candidate goes, true best stays
  mgr.promote(3, 'observation')
  assert on_disk() == [3, 4, 5, 7]                        # observation keeps latest 1
  mgr.promote(5, 'release', reason='posterior 0.97')
  assert mgr.emergency_save(8, tiny(8), reason='NaN loss at step 9')
  mgr.save(9, tiny(9))
  assert on_disk() == [3, 4, 5, 7, 8, 9]                  # pinned 8 does not count
  mgr.save(10, tiny(10))
  assert on_disk() == [3, 5, 7, 8, 9, 10]
  mgr.save(11, tiny(11), tier='candidate', metrics={'loss': 0.1})
  mgr.save(12, tiny(12), tier='candidate', metrics={'loss': float('nan')})
  assert on_disk() == [3, 5, 7, 8, 9, 10, 11, 12]         # 12 kept only as the newest
  mgr.save(13, tiny(13))
  assert on_disk() == [3, 5, 7, 8, 10, 11, 13]
  assert mgr.record(8).pinned and mgr.record(8).kind == 'emergency'
  assert mgr.record(8).reason == 'NaN loss at step 9'
  mgr.unpin(8)
  assert on_disk() == [3, 5, 7, 10, 11, 13]
  assert mgr.steps('release') == [5]
  assert mgr.steps('observation') == [3]
  assert mgr.steps('candidate') == [7, 11]
  assert mgr.steps('preliminary') == [10, 13]
  with pytest.raises(ValueError, match=r"rolling back would delete release.*\[5\].*force=True"):
    mgr.rollback(3)
  mgr.close()

  # The ledger survives a restart: tiers and promotion history come back.
  reopened = TieredCheckpointManager(tmp_path, retention=retention)
  assert reopened.steps('release') == [5]
  assert reopened.steps('candidate') == [7, 11]
  assert [h['tier'] for h in reopened.record(5).history] == ['candidate', 'release']
  assert reopened.record(5).reason == 'posterior 0.97'
  # Release survives further pressure on every other tier.
  for s in range(14, 20):
    reopened.save(s, tiny(s), tier='candidate', metrics={'loss': 10.0 + s})
  reopened.wait_until_finished()
  assert 5 in disk_steps(tmp_path)
  reopened.close()


def test_ledger_loss_falls_back_to_checkpoint_metadata(tmp_path):
  with TieredCheckpointManager(tmp_path) as mgr:
    mgr.save(1, tiny(1), tier='candidate', metrics={'loss': 0.25})
    mgr.emergency_save(2, tiny(2), reason='spike')
    # An emergency save of a step that already exists pins it instead of writing.
    mgr.save(3, tiny(3))
    assert mgr.emergency_save(3, tiny(3), reason='loss spike at 4') is False
    assert mgr.record(3).pinned and mgr.record(3).kind == 'regular'
  os.remove(tmp_path / 'tiers.json')
  mgr = TieredCheckpointManager(tmp_path)
  assert mgr.record(1).tier == 'candidate' and mgr.record(1).metrics == {'loss': 0.25}
  assert mgr.record(2).pinned and mgr.record(2).reason == 'spike'
  mgr.close()


def test_forced_saves_bypass_the_interval_and_record_the_reason(tmp_path):
  with TieredCheckpointManager(tmp_path, save_interval_steps=10, async_save=False) as mgr:
    assert mgr.save(5, tiny(5)) is False
    assert disk_steps(tmp_path) == []
    with pytest.raises(ValueError, match='reason'):
      mgr.save(5, tiny(5), force=True)
    assert mgr.save(5, tiny(5), force=True, reason='lr 1e-3 -> 3e-4')
    assert mgr.record(5).kind == 'forced' and mgr.record(5).reason == 'lr 1e-3 -> 3e-4'
    assert mgr.save(10, tiny(10))
    assert not mgr.should_save(15) and mgr.should_save(20)
    assert disk_steps(tmp_path) == [5, 10]


# ------------------------------------------------------------------------- corruption


def test_flipped_bytes_are_refused_with_the_leaf_named_and_fallback_works(tmp_path):
  rng = np.random.default_rng(0)
  good = {'params': {'w': jnp.asarray(rng.standard_normal((64, 64), dtype=np.float32)),
                     'b': jnp.ones(3)}, 'step': 1}
  bad = {'params': {'w': jnp.asarray(rng.standard_normal((64, 64), dtype=np.float32)),
                    'b': jnp.ones(3)}, 'step': 2}
  with TieredCheckpointManager(tmp_path) as mgr:
    mgr.save(1, good)
    mgr.save(2, bad)

  # The 16 KiB array dominates the largest data file of step 2; flip bytes in its middle
  # (Orbax reads such a flip back as silently different values).
  data_files = [p for p in (tmp_path / '2' / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  target_file = max(data_files, key=lambda p: p.stat().st_size)
  raw = bytearray(target_file.read_bytes())
  mid = len(raw) // 2
  for i in range(mid, mid + 4):
    raw[i] ^= 0xA5
  target_file.write_bytes(bytes(raw))

  mgr = TieredCheckpointManager(tmp_path)
  with pytest.raises(CorruptCheckpointError, match=r"step 2 .*'params/w'") as info:
    mgr.restore(2, abstract(bad))
  assert info.value.step == 2 and info.value.leaf == 'params/w'

  restored = mgr.restore_latest_valid(abstract(good))
  assert restored.step == 1
  assert_bitwise_equal(restored.state, good)
  assert [s for s, _ in restored.skipped] == [2]

  # Resuming from the fallback: rollback removes the corrupt step so step 2 can be saved.
  mgr.rollback(1, abstract(good))
  assert disk_steps(tmp_path) == [1]
  assert mgr.save(2, bad)
  assert_bitwise_equal(mgr.restore(2, abstract(bad)).state, bad)
  mgr.close()


def test_tampered_metadata_is_refused(tmp_path):
  with TieredCheckpointManager(tmp_path, async_save=False) as mgr:
    mgr.save(1, tiny(1), metrics={'loss': 0.5})
  meta_file = tmp_path / '1' / 'meta' / 'metadata'
  meta_file.write_text(meta_file.read_text().replace('0.5', '0.4'))
  mgr = TieredCheckpointManager(tmp_path)
  with pytest.raises(CorruptCheckpointError, match="step 1.*'<metadata>'.*digest"):
    mgr.restore(1, abstract(tiny(1)))
  mgr.close()


# ----------------------------------------------------------------------- kill mid-save


def test_sigkill_during_async_save_never_leaves_a_complete_looking_checkpoint(tmp_path):
  ckpt = tmp_path / 'ckpt'
  err_path = tmp_path / 'child.err'
  env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}' + os.environ.get('PYTHONPATH', ''))
  with open(err_path, 'w') as err:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(ckpt), '64'], stdout=subprocess.PIPE,
        stderr=err, text=True, cwd=REPO, env=env,
    )
    seen = []
    for line in proc.stdout:
      seen.append(line.strip())
      if line.startswith('SAVING'):
        os.kill(proc.pid, signal.SIGKILL)
        break
    seen += proc.stdout.read().split()
    proc.wait(timeout=60)
  assert 'SAVING 2' in seen, f'child failed: {seen}\n{err_path.read_text()[-3000:]}'
  assert proc.returncode == -signal.SIGKILL
  # The kill landed while the asynchronous write of ~64 MB was in flight.
  assert not any(s.startswith('DONE') for s in seen), seen

  spec = importlib.util.spec_from_file_location('checkpoint_kill_child', CHILD)
  child = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(child)
  small = {'w': jnp.arange(16, dtype=jnp.float32), 'step': 1}

  mgr = TieredCheckpointManager(ckpt)
  assert tmp_dirs(ckpt) == []                      # interrupted writes cleaned on open
  if 2 in mgr.all_steps():
    # Only possible if the commit (rename) finished just before the kill: then it must
    # be complete and verified.
    _, big = child.states(64)
    assert_bitwise_equal(mgr.restore(2, abstract(big)).state, big)
  else:
    assert disk_steps(ckpt) == [1]
    restored = mgr.restore_latest_valid(abstract(small))
    assert restored.step == 1 and restored.metadata == {'which': 'small'}
    assert_bitwise_equal(restored.state, small)
    assert mgr.save(2, tiny(2))                    # the interrupted step can be saved again
    mgr.wait_until_finished()
    assert disk_steps(ckpt) == [1, 2]
  mgr.close()


# ---------------------------------------------------------------------------- rollback


def test_rollback_deletes_newer_steps_and_later_saves_succeed(tmp_path):
  retention = TierRetention(preliminary=None)
  with TieredCheckpointManager(tmp_path, retention=retention) as mgr:
    for s in (1, 2, 3, 4):
      mgr.save(s, tiny(s))
    restored = mgr.rollback(2, abstract(tiny(2)))
    assert restored.step == 2
    assert_bitwise_equal(restored.state, tiny(2))
    assert disk_steps(tmp_path) == [1, 2] and mgr.latest_step() == 2
    with pytest.raises(ValueError, match=r'step=2 is not after the latest checkpoint \(2\)'):
      mgr.save(2, tiny(2))
    replay = {'w': jnp.full((4,), -3.0), 'step': 3}
    assert mgr.save(3, replay)
    mgr.wait_until_finished()
    assert disk_steps(tmp_path) == [1, 2, 3]
    assert_bitwise_equal(mgr.restore(3, abstract(replay)).state, replay)


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_fail_with_named_arguments(tmp_path):
  mgr = TieredCheckpointManager(tmp_path, async_save=False)
  state = tiny(1)
  with pytest.raises(ValueError, match=r"tier='final' is not a tier; expected one of \('preliminary'"):
    mgr.save(1, state, tier='final')
  mgr.save(1, state, tier='observation')
  with pytest.raises(ValueError, match="tier='gold'"):
    mgr.promote(1, 'gold')
  with pytest.raises(ValueError, match="tier='preliminary': step 1 is already 'observation'"):
    mgr.promote(1, 'preliminary')
  with pytest.raises(ValueError, match=r'step=7 has no checkpoint .*available steps: \[1\]'):
    mgr.restore(7, abstract(state))
  with pytest.raises(ValueError, match='step must be a non-negative int'):
    mgr.save(2.0, state)
  with pytest.raises(ValueError, match=r"target does not match the checkpoint at step 1: leaves saved but not in target: \['w'\]"):
    mgr.restore(1, {'step': 0, 'v': jax.ShapeDtypeStruct((4,), jnp.float32)})
  with pytest.raises(ValueError, match=r"target leaf 'w' is float32\[5\] but the checkpoint at step 1 holds float32\[4\]"):
    mgr.restore(1, {'step': 0, 'w': jax.ShapeDtypeStruct((5,), jnp.float32)})
  with pytest.raises(ValueError, match=r"metadata\['bad'\]: value of type object"):
    mgr.save(2, state, metadata={'bad': object()})
  with pytest.raises(ValueError, match=r"metrics\['loss'\]: expected a scalar"):
    mgr.save(2, state, metrics={'loss': np.ones(3)})
  with pytest.raises(ValueError, match='TierRetention.candidate_mode'):
    TierRetention(candidate_mode='best')
  assert mgr.all_steps() == [1]                 # failed calls wrote nothing
  mgr.close()


def test_async_failure_surfaces_with_the_step_and_the_manager_recovers(tmp_path, monkeypatch):
  mgr = TieredCheckpointManager(tmp_path, retention=TierRetention(preliminary=1))
  mgr.save(1, tiny(1))
  mgr.wait_until_finished()

  # Make the next commit fail inside Orbax's background thread: the handler's write
  # futures get one more future that raises, as a full disk would.
  handler = mgr._mgr._checkpointer._handler
  real_async_save = handler.async_save

  class FailingWrite:
    def result(self, timeout=None):
      raise OSError('disk full (simulated)')

    def cancel(self):
      pass

  async def failing_async_save(*args, **kwargs):
    return list(await real_async_save(*args, **kwargs) or []) + [FailingWrite()]

  monkeypatch.setattr(handler, 'async_save', failing_async_save)
  assert mgr.save(2, tiny(2))                  # returns: the failure is in the background
  with pytest.raises(CheckpointSaveError, match='asynchronous save of step 2 failed.*disk full'):
    mgr.wait_until_finished()
  monkeypatch.undo()
  # Step 1 was not deleted although preliminary=1: retention runs only after a commit.
  assert mgr.all_steps() == [1] and disk_steps(tmp_path) == [1]
  assert mgr.save(2, tiny(2))
  mgr.wait_until_finished()
  assert disk_steps(tmp_path) == [2]
  assert_bitwise_equal(mgr.restore(2, abstract(tiny(2))).state, tiny(2))
  mgr.close()
