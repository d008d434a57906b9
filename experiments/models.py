"""Models in Flax NNX: an MLP for the digits images and a tiny decoder-only GPT.

The trainer never calls a model object directly: it splits it once with
:func:`split_params` into a static ``graphdef`` and a plain nested dict of parameter arrays,
and rebuilds the module inside the loss with ``nnx.merge``. The curvature probes therefore see
an ordinary pytree of arrays.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MODELS = ("mlp", "gpt")
ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"model.activation={name!r} is not one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MLP(nnx.Module):
  """Fully connected network ``in -> widths[0] -> ... -> widths[-1] -> out``.

  Args:
    in_features: input dimension (inputs are flattened).
    widths: hidden widths, e.g. ``(200, 200)`` (Cohen et al. 2021 use 2×200 tanh).
    out_features: output dimension.
    activation: 'tanh', 'gelu' or 'relu'.
    rngs: ``nnx.Rngs`` for the initialisation.
  """

  def __init__(self, in_features: int, widths, out_features: int, *, activation: str = "tanh",
               rngs: nnx.Rngs):
    widths = tuple(int(w) for w in widths)
    if any(w < 1 for w in widths):
      raise ValueError(f"model.widths must be positive integers, got {widths}.")
    self.act = _activation(activation)
    dims = (in_features,) + widths
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.out = nnx.Linear(dims[-1], out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = self.act(layer(x))
    return self.out(x)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with a fused QKV projection."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    init = nnx.initializers.normal(0.02)
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=init, rngs=rngs)
    self.proj = nnx.Linear(width, width, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    q, k, v = (z.reshape(b, t, h, d // h) for z in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return self.proj(out)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = CausalSelfAttention(width, num_heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc = nnx.Linear(width, mlp_ratio * width, kernel_init=init, rngs=rngs)
    self.fc_out = nnx.Linear(mlp_ratio * width, width, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.fc_out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """Tiny decoder-only transformer: token + learned position embeddings, pre-LN blocks.

  Args:
    vocab_size: number of token ids.
    context_length: maximum sequence length (size of the position table).
    depth: number of blocks.
    width: model dimension (divisible by ``num_heads``).
    num_heads: attention heads.
    mlp_ratio: hidden size of the block MLP as a multiple of ``width``.
    rngs: ``nnx.Rngs`` for the initialisation.

  Maps int tokens ``[B, T]`` (``T <= context_length``) to logits ``[B, T, vocab_size]``.
  """

  def __init__(self, vocab_size: int, context_length: int, *, depth: int, width: int,
               num_heads: int, mlp_ratio: int = 4, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"model.width={width} must be divisible by model.num_heads={num_heads}.")
    if min(depth, width, num_heads, context_length, vocab_size) < 1:
      raise ValueError("model.depth, model.width, model.num_heads, data.context_length and the "
                       "vocabulary size must all be >= 1.")
    init = nnx.initializers.normal(0.02)
    self.context_length = context_length
    self.embed = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
    self.pos = nnx.Param(init(rngs.params(), (context_length, width)))
    self.blocks = nnx.List([Block(width, num_heads, mlp_ratio, rngs=rngs)
                            for _ in range(depth)])
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab_size, kernel_init=init, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.context_length:
      raise ValueError(f"sequence length {t} exceeds the model's context_length "
                       f"{self.context_length}.")
    x = self.embed(tokens) + self.pos[...][:t]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def build_model(model_config, dataset, seed: int) -> nnx.Module:
  """The model named by ``model_config.name``, sized from the dataset, seeded by ``seed``."""
  rngs = nnx.Rngs(params=seed)
  name = model_config.name
  if name == "mlp":
    if dataset.kind != "classification":
      raise ValueError(f"model.name='mlp' needs an image dataset (data.name='digits'); "
                       f"got data.name={dataset.name!r}.")
    return MLP(dataset.input_dim, model_config.widths, dataset.num_classes,
               activation=model_config.activation, rngs=rngs)
  if name == "gpt":
    if dataset.kind != "language_model":
      raise ValueError(f"model.name='gpt' needs a text dataset (data.name in 'code', 'prose', "
                       f"'text', 'mix'); got data.name={dataset.name!r}.")
    context = dataset.train["tokens"].shape[1] - 1
    return GPT(dataset.num_classes, context, depth=model_config.depth,
               width=model_config.width, num_heads=model_config.num_heads,
               mlp_ratio=model_config.mlp_ratio, rngs=rngs)
  raise ValueError(f"model.name={name!r} is not one of {MODELS}.")


def split_params(model: nnx.Module) -> tuple[Any, dict]:
  """``(graphdef, params)``: a static graph and a plain nested dict of parameter arrays.

  ``nnx.merge(graphdef, params)`` rebuilds the module (inside jit, from traced params).
  Models here hold nothing but parameters; anything else would be silently dropped, so it is
  rejected.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("model holds non-parameter state (e.g. batch statistics or RNG state); "
                     "the functional trainer supports parameters only.")
  return graphdef, nnx.to_pure_dict(params)


def count_params(params) -> int:
  """Total number of parameter entries."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
