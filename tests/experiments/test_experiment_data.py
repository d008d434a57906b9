"""Data: seeded splits, a shared character vocabulary, and iterator save/restore."""

import numpy as np
import pytest

from experiments import config_lib
from experiments import data as data_lib


def _data_config(**kw):
  c = config_lib.default_config().data
  with c.unlocked():
    c.update(kw)
  return c


def _equal(a, b):
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
  return np.array_equal(a, b)


def test_digits_split_targets_and_subset():
  ds = data_lib.load_dataset(_data_config(name="digits", subset_size=500), seed=3)
  assert ds.train["x"].shape == (500, 64) and ds.eval["x"].shape == (297, 64)
  assert ds.train["y"].shape == (500, 10)
  np.testing.assert_array_equal(ds.train["y"].argmax(1), ds.train["label"])
  np.testing.assert_allclose(ds.train["y"].sum(1), 1.0)
  assert ds.train["x"].dtype == np.float32
  again = data_lib.load_dataset(_data_config(name="digits", subset_size=500), seed=3)
  np.testing.assert_array_equal(ds.train["x"], again.train["x"])
  other = data_lib.load_dataset(_data_config(name="digits", subset_size=500), seed=4)
  assert not np.array_equal(ds.train["label"], other.train["label"])
  full = data_lib.load_dataset(_data_config(name="digits"), seed=3)
  assert full.num_train == 1797 - 297
  # Standardised with training statistics: zero mean on the (full) training split.
  np.testing.assert_allclose(full.train["x"].mean(0), 0.0, atol=1e-5)


@pytest.mark.parametrize("name", ["digits", "code"])
def test_iterator_state_restores_the_same_batches(name):
  ds = data_lib.load_dataset(_data_config(name=name, max_chars=1_800, context_length=16,
                                          subset_size=100), seed=0)
  it = ds.iterator(32, seed=7)
  for _ in range(5):  # cross an epoch boundary (about 100 examples: 3 batches per epoch)
    next(it)
  state = it.get_state()
  assert isinstance(state.epoch, int) and state.epoch == 1
  expected = [next(it) for _ in range(6)]
  fresh = ds.iterator(32, seed=7)
  fresh.set_state(state._asdict())  # the JSON-friendly form works too
  got = [next(fresh) for _ in range(6)]
  assert all(_equal(a, b) for a, b in zip(expected, got))
  # A different seed gives a different order.
  assert not _equal(next(ds.iterator(32, seed=8)), next(ds.iterator(32, seed=7)))


def test_iterator_rejects_bad_state_and_sizes():
  it = data_lib.BatchIterator(10, 4, lambda idx: {"i": idx})
  with pytest.raises(ValueError, match="missing"):
    it.set_state({"epoch": 0})
  with pytest.raises(ValueError, match="batch_size"):
    data_lib.BatchIterator(10, 11, lambda idx: idx)


def test_epoch_visits_every_example_once():
  it = data_lib.BatchIterator(12, 4, lambda idx: idx, seed=1)
  seen = np.concatenate([next(it) for _ in range(3)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(12))


def test_mix_shares_one_vocabulary_and_restores_state():
  cfg = _data_config(name="mix", max_chars=30_000, context_length=16)
  mix = data_lib.load_dataset(cfg, seed=0)
  assert set(mix) == {"code", "prose"}
  assert mix["code"].num_classes == mix["prose"].num_classes == 98
  assert mix["code"].info["sha256"] != mix["prose"].info["sha256"]
  it = data_lib.MixedIterator({t: d.iterator(4, seed=i) for i, (t, d) in enumerate(mix.items())})
  next(it)
  state = it.get_state()
  expected = next(it)
  it2 = data_lib.MixedIterator({t: d.iterator(4, seed=i)
                                for i, (t, d) in enumerate(mix.items())})
  it2.set_state(state)
  assert _equal(next(it2), expected)


def test_corpus_vocab_is_union_of_both_corpora():
  cfg = _data_config(name="mix", max_chars=20_000, context_length=16, vocab="corpus")
  mix = data_lib.load_dataset(cfg, seed=0)
  code = data_lib.corpus_text("code", cfg)
  prose = data_lib.corpus_text("prose", cfg)
  assert mix["code"].num_classes == len(set(code) | set(prose)) + 1  # + unknown
  assert mix["code"].info["unknown_fraction"] == 0.0


def test_text_windows_and_vocab_roundtrip():
  vocab = data_lib.CharVocab.ascii()
  text = "def f(x):\n\treturn x + 1  # é\n"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text.replace("é", vocab.UNK)
  ds = data_lib.text_dataset("t", text * 50, vocab, _data_config(context_length=8,
                                                                 eval_fraction=0.2))
  tokens = ds.train["tokens"]
  assert tokens.shape[1] == 9
  np.testing.assert_array_equal(tokens[0, 8], tokens[1, 0])  # stride T, windows of T + 1


def test_user_text_folder(tmp_path):
  (tmp_path / "b.txt").write_text("bbbb " * 200)
  (tmp_path / "a.txt").write_text("aaaa " * 200)
  cfg = _data_config(name="text", path=str(tmp_path), context_length=8, max_chars=1500)
  text = data_lib.corpus_text("text", cfg)
  assert text.startswith("aaaa") and len(text) == 1500  # sorted order, capped
  ds = data_lib.load_dataset(cfg, seed=0)
  assert ds.kind == "language_model"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data_lib.load_dataset(_data_config(name="text", path=str(tmp_path / "nope")), seed=0)


def test_full_batch_rounds_to_accumulation_chunks():
  ds = data_lib.load_dataset(_data_config(name="digits", subset_size=100), seed=0)
  assert ds.full_batch(multiple_of=3)["x"].shape[0] == 99
  assert ds.full_batch(max_examples=40)["x"].shape[0] == 40
