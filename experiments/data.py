"""Deterministic, seeded data for the experiments: digits images and character corpora.

Every dataset here is built from files every machine already has (nothing is downloaded):

* ``digits`` — scikit-learn's ``load_digits`` (1,797 8×8 images, 10 classes); features
  standardised with train-split statistics; one-hot targets (for MSE) and integer labels.
* ``code`` — the Python standard library's ``.py`` sources (``sysconfig.get_paths()['stdlib']``),
  read in sorted path order, capped at ``max_chars`` characters.
* ``prose`` — ``pydoc_data.topics.topics`` (the Python reference manual), topics in sorted order.
* ``text`` — any user text file, or every file under a folder (sorted, recursively).
* ``mix`` — a code batch and a prose batch side by side, for data-mixing experiments.
* ``code`` or ``prose`` with ``switch_step`` > 0 — two-stage training (pre-training, then a
  mid-training mix, as OLMo-2: Walsh et al. 2025, arXiv 2501.00656): batches of the one corpus
  until that step, then batches of the code/prose mix (:class:`SwitchingIterator`).

All character corpora share one vocabulary (:class:`CharVocab`), so a model trained on one can
be evaluated on the other and relative sharpness between them is meaningful.

Batches come from a :class:`BatchIterator` whose position is a :class:`IteratorState`
``(epoch, index, seed)`` of plain ints: ``get_state()`` / ``set_state()`` restore the exact
batch sequence (checkpoint it beside the model). ``full_batch()`` returns the whole training
set (or a fixed subset of it) as one batch, for full-batch gradient descent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

DATASETS = ("digits", "code", "prose", "text", "mix")
VOCABS = ("ascii", "corpus")

Batch = Any  # a dict of numpy arrays (or a dict of such dicts for ``mix``)


# --------------------------------------------------------------------------------------------
# Iterator with a saveable position
# --------------------------------------------------------------------------------------------


class IteratorState(NamedTuple):
  """Position of a :class:`BatchIterator`: plain ints, JSON- and checkpoint-friendly."""
  epoch: int  # how many full passes over the examples have been started
  index: int  # position inside the current epoch's permutation
  seed: int  # seed of the per-epoch shuffles


class BatchIterator:
  """Seeded mini-batches over ``num_examples`` examples, epoch by epoch, without replacement.

  Epoch ``e`` visits the examples in the order ``permutation(seed, e)``; a final partial batch
  is dropped so every batch has the same shape (no recompilation). The whole position is an
  :class:`IteratorState`; ``set_state(get_state())`` resumes the identical sequence.

  Args:
    num_examples: how many examples the dataset holds.
    batch_size: examples per batch (``1 <= batch_size <= num_examples``).
    fetch: maps an int array of example indices to a batch (a dict of numpy arrays).
    seed: shuffle seed.
    shuffle: if False, epochs visit the examples in order.
  """

  def __init__(self, num_examples: int, batch_size: int, fetch: Callable[[np.ndarray], Batch],
               *, seed: int = 0, shuffle: bool = True):
    if not 1 <= batch_size <= num_examples:
      raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of training "
                       f"examples), got {batch_size}.")
    self.num_examples = int(num_examples)
    self.batch_size = int(batch_size)
    self.shuffle = shuffle
    self._fetch = fetch
    self._state = IteratorState(0, 0, int(seed))
    self._perm_epoch = None
    self._perm = None

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      if self.shuffle:
        rng = np.random.default_rng([self._state.seed, epoch])
        self._perm = rng.permutation(self.num_examples)
      else:
        self._perm = np.arange(self.num_examples)
      self._perm_epoch = epoch
    return self._perm

  def get_state(self) -> IteratorState:
    """The current position; pass it to :meth:`set_state` to resume from here."""
    return self._state

  def set_state(self, state: IteratorState | Mapping[str, int]) -> None:
    """Resume from a position returned by :meth:`get_state` (or its ``_asdict()``)."""
    if isinstance(state, Mapping):
      missing = set(IteratorState._fields) - set(state)
      if missing:
        raise ValueError(f"iterator state is missing {sorted(missing)}; expected the keys "
                         f"{list(IteratorState._fields)}, got {sorted(state)}.")
      state = IteratorState(**{k: int(state[k]) for k in IteratorState._fields})
    epoch, index, seed = (int(x) for x in state)
    if epoch < 0 or not 0 <= index <= self.num_examples:
      raise ValueError(f"invalid iterator state {state}: need epoch >= 0 and "
                       f"0 <= index <= {self.num_examples}.")
    if seed != self._state.seed:
      self._perm_epoch = None
    self._state = IteratorState(epoch, index, seed)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    epoch, index, seed = self._state
    if index + self.batch_size > self.num_examples:
      epoch, index = epoch + 1, 0
    idx = self._permutation(epoch)[index:index + self.batch_size]
    self._state = IteratorState(epoch, index + self.batch_size, seed)
    return self._fetch(idx)


class MixedIterator:
  """Several :class:`BatchIterator` s advanced together; a batch is a dict of their batches."""

  def __init__(self, iterators: Mapping[str, BatchIterator]):
    self.iterators = dict(iterators)

  def get_state(self) -> dict[str, IteratorState]:
    """Positions of every member, by name."""
    return {name: it.get_state() for name, it in self.iterators.items()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restore every member from :meth:`get_state` output."""
    if set(state) != set(self.iterators):
      raise ValueError(f"mixed iterator state must have the keys {sorted(self.iterators)}, "
                       f"got {sorted(state)}.")
    for name, it in self.iterators.items():
      it.set_state(state[name])

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return {name: next(it) for name, it in self.iterators.items()}


def _batches_drawn(it: BatchIterator) -> int:
  """How many batches ``it`` has returned: ``⌊N/B⌋`` per finished epoch plus ``index/B``."""
  epoch, index, _ = it.get_state()
  return epoch * (it.num_examples // it.batch_size) + index // it.batch_size


class SwitchingIterator:
  """Batches of one corpus for the first ``switch_step`` batches, then of a two-corpus mix.

  Stage 1 draws ``{"tokens": [B, T+1]}`` from ``stage1``; from batch ``switch_step`` on every
  batch is the rows of ``mix["code"]`` followed by those of ``mix["prose"]`` (``round(B·f)``
  and ``B − round(B·f)`` rows): one token array of the same shape, so the mean next-token loss
  over its rows is ``f·L_code + (1 − f)·L_prose`` and a jitted step does not recompile at the
  switch. Stage 1 is the batch sequence of ``stage1`` alone (that of a run without a switch).

  The position is the members' :class:`IteratorState` s; how many batches were drawn so far is
  ``stage1``'s position (``epoch·⌊N/B⌋ + index/B``: every epoch draws ``⌊N/B⌋`` batches and
  stage 1's iterator stops at the switch), so ``set_state(get_state())`` resumes on either side
  of the switch.
  """

  def __init__(self, stage1: BatchIterator, mix: Mapping[str, BatchIterator], switch_step: int):
    if switch_step < 1:
      raise ValueError(f"switch_step must be >= 1, got {switch_step}.")
    self.stage1, self.mix, self.switch_step = stage1, dict(mix), int(switch_step)
    rows = sum(it.batch_size for it in self.mix.values())
    if rows != stage1.batch_size:
      raise ValueError(f"the mix's batches hold {rows} rows, stage 1's {stage1.batch_size}; "
                       "they must be equal (one step shape).")

  @property
  def drawn(self) -> int:
    """Batches drawn so far: stage 1's (it stops at the switch), then the mix's."""
    return _batches_drawn(self.stage1) + _batches_drawn(next(iter(self.mix.values())))

  def get_state(self) -> dict[str, IteratorState]:
    """Positions of stage 1 (key ``stage1``) and of every member of the mix, by name."""
    return {"stage1": self.stage1.get_state(),
            **{name: it.get_state() for name, it in self.mix.items()}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restore every member from :meth:`get_state` output."""
    want = {"stage1", *self.mix}
    if set(state) != want:
      raise ValueError(f"switching iterator state must have the keys {sorted(want)}, got "
                       f"{sorted(state)}.")
    self.stage1.set_state(state["stage1"])
    for name, it in self.mix.items():
      it.set_state(state[name])

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if _batches_drawn(self.stage1) < self.switch_step:
      return next(self.stage1)
    parts = [next(it) for it in self.mix.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --------------------------------------------------------------------------------------------
# Character vocabulary and corpora
# --------------------------------------------------------------------------------------------


class CharVocab:
  """A character vocabulary; id 0 is the unknown character.

  ``CharVocab.ascii()`` is fixed (tab, newline and printable ASCII): the same ids on every
  corpus and machine. ``CharVocab.from_texts`` takes the sorted union of the characters of
  several texts, so code and prose still share one vocabulary.
  """

  UNK = "\ufffd"

  def __init__(self, chars: Sequence[str]):
    chars = [c for c in chars if c != self.UNK]
    if len(set(chars)) != len(chars):
      raise ValueError("vocabulary characters must be unique.")
    self.chars = [self.UNK] + list(chars)
    self._table = np.zeros(0x110000 if max(map(ord, self.chars)) > 0xFFFF else 0x10000,
                           dtype=np.int32)
    for i, c in enumerate(self.chars):
      self._table[ord(c)] = i

  @classmethod
  def ascii(cls) -> "CharVocab":
    """Tab, newline and the 95 printable ASCII characters (98 ids with unknown)."""
    return cls(["\t", "\n"] + [chr(i) for i in range(32, 127)])

  @classmethod
  def from_texts(cls, texts: Sequence[str]) -> "CharVocab":
    """Sorted union of the characters of ``texts``."""
    chars = set()
    for t in texts:
      chars.update(t)
    return cls(sorted(chars))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Characters to int32 ids; characters outside the vocabulary map to 0 (unknown)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = np.zeros(codes.shape, np.int32)
    inside = codes < len(self._table)
    out[inside] = self._table[codes[inside]]
    return out

  def decode(self, ids) -> str:
    """Int ids back to a string."""
    return "".join(self.chars[int(i)] for i in np.asarray(ids).ravel())


def _skip_stdlib_dir(name: str) -> bool:
  return name in ("site-packages", "dist-packages", "__pycache__") or name.startswith(".")


@functools.lru_cache(maxsize=8)
def stdlib_code_text(max_chars: int) -> str:
  """The standard library's ``.py`` sources in sorted path order, capped at ``max_chars``.

  Installed packages (``site-packages``) and the machine-specific ``_sysconfigdata*`` module are
  skipped. Files are joined with a newline; the last one is truncated at the cap.
  """
  root = sysconfig.get_paths()["stdlib"]
  parts, total = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not _skip_stdlib_dir(d))
    for name in sorted(filenames):
      if not name.endswith(".py") or name.startswith("_sysconfigdata"):
        continue
      with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
        text = f.read() + "\n"
      parts.append(text[:max_chars - total])
      total += len(parts[-1])
      if total >= max_chars:
        return "".join(parts)
  return "".join(parts)


@functools.lru_cache(maxsize=8)
def pydoc_prose_text(max_chars: int) -> str:
  """The Python reference manual's topics (``pydoc_data.topics``), sorted by topic name."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return "\n".join(topics[k] for k in sorted(topics))[:max_chars]


def user_text(path: str, max_chars: int) -> str:
  """A text file, or every regular file under a folder in sorted path order, capped."""
  if not path:
    raise ValueError("data.name='text' needs data.path (a text file or a folder); it is empty.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist.")
  if os.path.isfile(path):
    files = [path]
  else:
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      files.extend(os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith("."))
    if not files:
      raise ValueError(f"data.path={path!r} is a folder with no files in it.")
  parts, total = [], 0
  for fname in files:
    with open(fname, encoding="utf-8", errors="replace") as f:
      parts.append(f.read(max_chars - total))
    total += len(parts[-1])
    if total >= max_chars:
      break
  return "\n".join(parts)[:max_chars]


def corpus_text(name: str, data_config) -> str:
  """The raw text of corpus ``name`` ('code', 'prose' or 'text') under ``data_config``'s cap."""
  cap = int(data_config.max_chars)
  if cap <= 0:
    raise ValueError(f"data.max_chars must be positive, got {cap}.")
  if name == "code":
    return stdlib_code_text(cap)
  if name == "prose":
    return pydoc_prose_text(cap)
  if name == "text":
    return user_text(data_config.path, cap)
  raise ValueError(f"unknown corpus {name!r}; accepted: 'code', 'prose', 'text'.")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage2:
  """The training data from batch ``switch_step`` on: the code/prose mix (``tasks``), each
  batch ``code_fraction`` code (see :class:`SwitchingIterator`)."""
  switch_step: int
  code_fraction: float
  tasks: dict[str, "Dataset"]  # {"code": ..., "prose": ...}, one shared vocabulary

  def iterator(self, stage1: BatchIterator, seed: int) -> SwitchingIterator:
    """``stage1``'s batches, then mixed batches of as many rows (the mix's shuffles are
    seeded ``seed + 1`` (code) and ``seed + 2`` (prose))."""
    rows = stage1.batch_size
    code = int(round(rows * self.code_fraction))
    sizes = {"code": code, "prose": rows - code}
    if min(sizes.values()) < 1:
      raise ValueError(f"data.code_fraction={self.code_fraction} leaves {sizes} rows of a "
                       f"batch of {rows} after the switch; each task needs at least one. "
                       "Change batch_size or data.code_fraction.")
    mix = {t: d.iterator(sizes[t], seed + 1 + i) for i, (t, d) in enumerate(self.tasks.items())}
    return SwitchingIterator(stage1, mix, self.switch_step)


@dataclasses.dataclass
class Dataset:
  """Train / eval arrays of one task plus how to cut them into batches.

  ``train`` and ``eval`` are dicts of numpy arrays with a shared leading example axis:
  digits: ``{"x": [N, 64] float32, "y": [N, 10] float32 one-hot, "label": [N] int32}``;
  text: ``{"tokens": [N, T + 1] int32}`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).
  With ``stage2`` (``data.switch_step``) the training batches switch to its mix at that step;
  ``eval`` stays this task's held-out split.
  """
  name: str
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  kind: str  # "classification" or "language_model"
  input_dim: int = 0  # classification: feature dimension
  num_classes: int = 0  # classification: classes; language model: vocabulary size
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  stage2: Stage2 | None = None

  @property
  def num_train(self) -> int:
    return len(next(iter(self.train.values())))

  @property
  def num_eval(self) -> int:
    return len(next(iter(self.eval.values())))

  def iterator(self, batch_size: int, seed: int, *,
               multiple_of: int = 1) -> BatchIterator | SwitchingIterator:
    """Shuffled training batches of ``batch_size`` examples (``batch_size % multiple_of == 0``);
    with ``stage2``, a :class:`SwitchingIterator` (the same batches until the switch)."""
    if batch_size % multiple_of:
      raise ValueError(f"batch_size={batch_size} must be a multiple of "
                       f"grad_accum_steps={multiple_of}.")
    it = BatchIterator(self.num_train, batch_size, self._take_train, seed=seed)
    return it if self.stage2 is None else self.stage2.iterator(it, seed)

  def full_batch(self, *, multiple_of: int = 1, max_examples: int = 0) -> dict[str, np.ndarray]:
    """The training set as one batch: the first ``max_examples`` (0: all) examples, rounded
    down to a multiple of ``multiple_of`` so it splits into equal accumulation chunks."""
    n = self.num_train if max_examples <= 0 else min(max_examples, self.num_train)
    n -= n % multiple_of
    if n <= 0:
      raise ValueError(f"full batch is empty: {self.num_train} training examples, "
                       f"grad_accum_steps={multiple_of}.")
    return {k: v[:n] for k, v in self.train.items()}

  def eval_batch(self, max_examples: int = 0) -> dict[str, np.ndarray]:
    """A fixed evaluation batch: the first ``max_examples`` eval examples (0: all)."""
    n = self.num_eval if max_examples <= 0 else min(max_examples, self.num_eval)
    return {k: v[:n] for k, v in self.eval.items()}

  def _take_train(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in self.train.items()}


def load_digits_dataset(data_config, seed: int) -> Dataset:
  """scikit-learn's digits: seeded train/eval split, standardised features, one-hot targets.

  Config fields used: ``eval_size`` (held-out images), ``subset_size`` (0: all remaining images
  for training), ``standardize`` (zero-mean, unit-variance features from train statistics;
  otherwise pixels / 16).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, labels = load_digits(return_X_y=True)
  x = x.astype(np.float32) / 16.0
  labels = labels.astype(np.int32)
  n = len(x)
  eval_size = int(data_config.eval_size)
  if not 1 <= eval_size < n:
    raise ValueError(f"data.eval_size must be in [1, {n - 1}] for digits ({n} images), "
                     f"got {eval_size}.")
  perm = np.random.default_rng(seed).permutation(n)
  eval_idx, train_idx = perm[:eval_size], perm[eval_size:]
  subset = int(data_config.subset_size)
  if subset < 0 or subset > len(train_idx):
    raise ValueError(f"data.subset_size must be in [0, {len(train_idx)}] (0 = all), "
                     f"got {subset}.")
  if subset:
    train_idx = train_idx[:subset]
  if data_config.standardize:
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0)
    std = np.where(std > 1e-6, std, 1.0)
    x = (x - mean) / std
  onehot = np.eye(10, dtype=np.float32)[labels]

  def part(idx):
    return {"x": x[idx].astype(np.float32), "y": onehot[idx], "label": labels[idx]}

  return Dataset("digits", part(train_idx), part(eval_idx), "classification",
                 input_dim=64, num_classes=10,
                 info={"num_train": len(train_idx), "num_eval": eval_size})


def make_vocab(data_config, texts: Sequence[str]) -> CharVocab:
  """The shared vocabulary named by ``data_config.vocab``."""
  if data_config.vocab == "ascii":
    return CharVocab.ascii()
  if data_config.vocab == "corpus":
    return CharVocab.from_texts(texts)
  raise ValueError(f"data.vocab={data_config.vocab!r} is not one of {VOCABS}.")


def text_dataset(name: str, text: str, vocab: CharVocab, data_config) -> Dataset:
  """Cut ``text`` into windows of ``context_length + 1`` tokens (stride ``context_length``).

  The last ``eval_fraction`` of the text is held out (a contiguous split, so no window of the
  evaluation text overlaps training text).
  """
  t = int(data_config.context_length)
  if t < 1:
    raise ValueError(f"data.context_length must be >= 1, got {t}.")
  frac = float(data_config.eval_fraction)
  if not 0.0 < frac < 1.0:
    raise ValueError(f"data.eval_fraction must be in (0, 1), got {frac}.")
  ids = vocab.encode(text)
  split = int(len(ids) * (1.0 - frac))

  def windows(stream):
    count = (len(stream) - 1) // t
    if count < 1:
      raise ValueError(f"corpus {name!r} has {len(ids)} characters: too few for windows of "
                       f"{t + 1} in both splits; raise data.max_chars or lower "
                       f"data.context_length.")
    starts = np.arange(count) * t
    return stream[starts[:, None] + np.arange(t + 1)[None, :]]

  train, evals = windows(ids[:split]), windows(ids[split:])
  digest = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:12]
  unk = float(np.mean(ids == 0))
  return Dataset(name, {"tokens": train}, {"tokens": evals}, "language_model",
                 num_classes=len(vocab),
                 info={"chars": len(text), "sha256": digest, "unknown_fraction": unk,
                       "train_windows": len(train), "eval_windows": len(evals),
                       "vocab_size": len(vocab)})


def load_dataset(data_config, seed: int) -> "Dataset | dict[str, Dataset]":
  """Build the dataset named by ``data_config.name``.

  Returns one :class:`Dataset`, or for ``mix`` a dict ``{"code": ..., "prose": ...}`` of two
  datasets with one shared vocabulary.
  """
  name = data_config.name
  if name == "digits":
    return load_digits_dataset(data_config, seed)
  if name in ("code", "prose") and int(data_config.get("switch_step", 0)) > 0:
    return two_stage_dataset(data_config)
  if name in ("code", "prose", "text"):
    text = corpus_text(name, data_config)
    return text_dataset(name, text, make_vocab(data_config, [text]), data_config)
  if name == "mix":
    texts = {k: corpus_text(k, data_config) for k in ("code", "prose")}
    vocab = make_vocab(data_config, list(texts.values()))
    return {k: text_dataset(k, v, vocab, data_config) for k, v in texts.items()}
  raise ValueError(f"data.name={name!r} is not one of {DATASETS}.")


def two_stage_dataset(data_config) -> Dataset:
  """``data.name``'s corpus whose training batches switch to the code/prose mix at
  ``data.switch_step`` (``data.code_fraction`` code); both corpora share one vocabulary, and
  the fingerprint ``info`` records the switch and the mix's corpora."""
  texts = {k: corpus_text(k, data_config) for k in ("code", "prose")}
  vocab = make_vocab(data_config, list(texts.values()))
  tasks = {k: text_dataset(k, v, vocab, data_config) for k, v in texts.items()}
  first, switch = tasks[data_config.name], int(data_config.switch_step)
  frac = float(data_config.code_fraction)
  info = {**first.info, "stage2": {"switch_step": switch, "code_fraction": frac,
                                   "mix": {t: d.info for t, d in tasks.items()}}}
  return dataclasses.replace(first, info=info, stage2=Stage2(switch, frac, tasks))
