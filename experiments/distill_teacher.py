"""The teacher of a distillation run: trained by the ordinary trainer, or loaded.

If ``config.distill.teacher_dir`` is empty, the teacher (architecture and length in
``config.distill.teacher``) is trained by ``experiments.trainer.train_and_evaluate`` into
``<workdir>/teacher``, a normal run directory (config.json, metrics.jsonl, plots, Orbax
checkpoints: an interrupted teacher resumes like any run). Otherwise it is loaded from
``teacher_dir``, a run directory of the runner on the same data and vocabulary with
``model.name='gpt'``: the architecture from its ``config.json``, the parameters from the newest
checkpoint that verifies (a target-less Orbax restore of ``state["train"]["params"]``, mapped
onto the freshly built teacher's parameter tree). The teacher is frozen afterwards.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import config_lib
from experiments import models


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The runner config of the teacher: the base config with the teacher's model and length."""
  raw = config.to_dict()
  d = raw.pop("distill")
  t = d["teacher"]
  raw["num_steps"] = t["num_steps"]
  raw["optimizer"]["learning_rate"] = t["learning_rate"]
  raw["model"].update(depth=t["depth"], width=t["width"], num_heads=t["num_heads"],
                      mlp_ratio=t["mlp_ratio"])
  raw["checkpoint"]["enabled"] = True  # the student phase reads the params from here
  raw["checkpoint"]["resume"] = True
  raw["eval_every"] = 0
  return config_lib.validate_config(ml_collections.ConfigDict(raw))


def load_params(run_dir: str, template: Any) -> Any:
  """The params of the newest verified checkpoint in ``run_dir/checkpoints``, as ``template``.

  The checkpoint is restored without a target (Orbax then gives dicts with string keys); each
  leaf of ``template`` (the freshly built model's params) is looked up by its path.
  """
  import convergence  # pylint: disable=g-import-not-at-top
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  ckdir = checkpointing.checkpoint_dir(run_dir)
  if not checkpointing.has_checkpoints(run_dir):
    raise FileNotFoundError(f"no checkpoints in {ckdir!r} (config.distill.teacher_dir must be "
                            "a run directory written by the runner with checkpoints on).")
  mgr = convergence.TieredCheckpointManager(ckdir, async_save=False)
  try:
    state = mgr.restore_latest_valid().state
  finally:
    mgr.close()
  train = state["train"]
  tree = train["params"] if isinstance(train, dict) else train[1]

  def lookup(path, leaf):
    node = tree
    for entry in path:
      key = getattr(entry, "key", getattr(entry, "idx", None))
      node = node[str(key)] if isinstance(node, dict) and str(key) in node else node[key]
    arr = np.asarray(node)
    if arr.shape != leaf.shape:
      raise ValueError(f"teacher checkpoint leaf {jax.tree_util.keystr(path)} has shape "
                       f"{arr.shape}, the teacher config builds {leaf.shape}.")
    return jnp.asarray(arr, leaf.dtype)
  return jax.tree_util.tree_map_with_path(lookup, template)


def get_teacher(config, workdir: str, dataset) -> tuple[Any, dict, Any, dict]:
  """``(graphdef, params, model_config, info)``: train (or load) and return the teacher."""
  d = config.distill
  if d.teacher_dir:
    run_dir = d.teacher_dir
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
      saved = json.load(f)
    model_cfg = ml_collections.ConfigDict(saved["model"])
    if model_cfg.name != "gpt":
      raise ValueError(f"teacher_dir {run_dir!r} holds a {model_cfg.name!r} model, not a gpt.")
    for k in ("name", "vocab", "context_length", "max_chars", "eval_fraction", "path"):
      if saved["data"].get(k) != config.data[k]:
        raise ValueError(f"teacher_dir {run_dir!r} was trained with data.{k}="
                         f"{saved['data'].get(k)!r}, this run uses {config.data[k]!r}.")
    info = {"teacher_dir": run_dir, "trained_here": False}
  else:
    run_dir = os.path.join(workdir, "teacher")
    tcfg = teacher_config(config)
    from experiments import trainer  # pylint: disable=g-import-not-at-top
    summary = trainer.train_and_evaluate(tcfg, run_dir)
    model_cfg = tcfg.model
    info = {"teacher_dir": run_dir, "trained_here": True,
            "teacher_train_seconds": summary.get("wall_seconds")}
  graphdef, template = models.split_params(models.build_model(model_cfg, dataset, config.seed + 1))
  params = load_params(run_dir, template)
  info["teacher_params"] = models.count_params(params)
  return graphdef, params, model_cfg, info
