"""Every ```python block of README.md runs (issue 9 §4).

The blocks are found in README.md at collection time, in order (one test each, named by the
README line of the fence), so a block added later is run without touching this file. Each
block runs in a fresh namespace holding only the fixtures it reads: a tiny model and data
that stand in for the reader's own (``loss_fn(params, batch)``, ``params``, ``batch``, an Adam
``opt_state``, distillation logits and hidden states; see ``FIXTURES``). A block that reads a
name it neither defines nor finds in ``FIXTURES`` fails before it runs, naming it: define the
name in the block, or add a small fixture here. Tracebacks point at README.md's own lines.
"""

from __future__ import annotations

import builtins
import functools
import pathlib
import re
import symtable
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\s`]*)[^`]*$")
_PYTHON = {"python", "py", "python3"}


class Block(NamedTuple):
  line: int      # README line of the first line of code (1-based)
  source: str


def readme_blocks(text: str) -> list[Block]:
  """The ```python fenced blocks of a Markdown text, in order (CommonMark fences)."""
  blocks, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence = len(m["indent"]), m["fence"]
    body, j = [], i + 1
    while j < len(lines):
      close = _FENCE.match(lines[j])
      if (close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence)
          and not close["info"]):
        break
      body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
      j += 1
    if m["info"].lower() in _PYTHON:
      blocks.append(Block(i + 2, "\n".join(body) + "\n"))
    i = j + 1
  return blocks


def names_read(source: str) -> tuple[set[str], set[str]]:
  """(names the block reads from its module namespace, names it binds there).

  Read: referenced at the top level, or referenced as a global inside a function of the
  block. Builtins are left out. A name the block both reads and binds is in both sets (it
  may be read before it is bound, e.g. ``params = step(params)``)."""
  top = symtable.symtable(source, "README.md", "exec")
  bound = {s.get_name() for s in top.get_symbols()
           if s.is_assigned() or s.is_imported() or s.is_namespace()}
  read: set[str] = set()

  def walk(table, is_top):
    for s in table.get_symbols():
      if s.is_referenced() and (is_top or s.is_global()):
        read.add(s.get_name())
    for child in table.get_children():
      walk(child, False)

  walk(top, True)
  return {n for n in read if not hasattr(builtins, n)}, bound


# ----------------------------------------------------------------------------- fixtures
# A 4 -> 3 tanh regression (15 parameters) and [2, 6, 11] distillation tensors: every
# block runs in a few seconds on a CPU.

@functools.cache
def _regression():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 16, 4)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(4, 3)).astype(np.float32))
  batches = [{"x": jnp.asarray(a), "y": jnp.asarray(b)} for a, b in zip(x, y)]
  params = {"w": jnp.asarray(0.3 * rng.normal(size=(4, 3)), jnp.float32),
            "b": jnp.zeros(3, jnp.float32)}

  def loss_fn(params, batch):
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return jnp.mean((pred - batch["y"]) ** 2)

  return loss_fn, params, batches


@functools.cache
def _adam_state():
  """The state of ``optax.adam(1e-2)`` after 3 steps (Adam's preconditioner exists)."""
  loss_fn, params, batches = _regression()
  tx = optax.adam(1e-2)
  state = tx.init(params)
  for batch in batches[:3]:
    updates, state = tx.update(jax.grad(loss_fn)(params, batch), state, params)
    params = optax.apply_updates(params, updates)
  return state


@functools.cache
def _distill():
  b, t, v, hs, ht = 2, 6, 11, 8, 6
  rng = np.random.default_rng(1)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  h_student, w_student, h_teacher, w_teacher = f32(b, t, hs), f32(hs, v), f32(b, t, ht), \
      f32(ht, v)
  return {
      "h_student": h_student, "W_student": w_student,
      "h_teacher": h_teacher, "W_teacher": w_teacher,
      "student_logits": h_student @ w_student, "teacher_logits": h_teacher @ w_teacher,
      "labels": jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32),
      "mask": jnp.asarray(np.arange(t) < np.array([[t], [t - 2]])),   # second row padded
  }


FIXTURES: dict[str, Callable[[], Any]] = {
    "loss_fn": lambda: _regression()[0],          # loss_fn(params, batch) -> scalar
    "params": lambda: _regression()[1],
    "batch": lambda: _regression()[2][0],
    "batches": lambda: _regression()[2],          # a few batches, for a training loop
    "opt_state": _adam_state,                     # optax.adam state after 3 steps
    **{k: (lambda k=k: _distill()[k]) for k in (
        "student_logits", "teacher_logits", "labels", "mask",
        "h_student", "W_student", "h_teacher", "W_teacher")},
}


# ----------------------------------------------------------------------------- tests

BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
  assert BLOCKS, f"no ```python block found in {README}"


def test_block_extraction_finds_every_fence():
  text = ("intro\n```python\na = 1\n```\n\n```bash\nls\n```\n  ```py\n  b = a\n  ```\n"
          "````python\nc = '```'\n```\nd = 3\n````\n")
  assert readme_blocks(text) == [Block(3, "a = 1\n"), Block(10, "b = a\n"),
                                 Block(13, "c = '```'\n```\nd = 3\n")]
  read, bound = names_read("import jax\nx = f(x)\ndef g(p):\n  return h(p) + len(p)\n")
  assert read == {"x", "f", "h"} and bound == {"jax", "x", "g"}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_block_runs(block):
  read, bound = names_read(block.source)
  unknown = sorted(read - bound - FIXTURES.keys())
  if unknown:
    pytest.fail(f"README.md block at line {block.line} reads {unknown}, which it does not "
                f"define and tests/test_readme_examples.py has no fixture for: define them in "
                f"the block (or say in the text what the reader provides) and add a small "
                f"fixture to FIXTURES.", pytrace=False)
  namespace = {"__name__": "__readme__"}
  namespace.update({n: FIXTURES[n]() for n in sorted(read & FIXTURES.keys())})
  # Padded so that tracebacks give README.md's line numbers.
  code = compile("\n" * (block.line - 1) + block.source, str(README), "exec")
  exec(code, namespace)  # pylint: disable=exec-used
