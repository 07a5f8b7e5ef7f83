"""orbax checkpoints of the whole run: train state + scheduler + data-iterator state.

Layout: WORKDIR/checkpoints/<step>/{state, extra}. orbax writes each save into a temporary folder
and renames it when complete, so a killed save never leaves a half-written step behind under its
final name. On restore, a step that fails to load (corrupted files) is reported and the previous
one is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
    """Saves asynchronously (returns once the device arrays are copied)."""
    return self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           extra=ocp.args.JsonSave(extra)), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state) -> Optional[tuple[int, Any, dict]]:
    """(step, state, extra) of the newest loadable checkpoint, or None if there is none.

    `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings, so arrays come back
    already sharded on the current mesh (which may differ from the one that saved them).
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["extra"])
      except Exception as e:  # pylint: disable=broad-except  # any corruption: try the previous
        logging.warning("checkpoint at step %d could not be restored (%s: %s); trying the "
                        "previous one", step, type(e).__name__, str(e)[:300])
        print(f"WARNING: checkpoint {self.directory}/{step} is unreadable "
              f"({type(e).__name__}); falling back to the previous checkpoint", flush=True)
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def load_for_inference(workdir: str, *, use_ema: bool = True):
  """(config, model_config, params, tokenizer) of a training run, for sampling and evaluation.

  Reads WORKDIR/config.json (the resolved config the run saved) and the latest good checkpoint;
  returns the EMA weights unless `use_ema` is False. The tokenizer is the one the run used.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from monoformer_jax.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.setup import build_tokenizer  # pylint: disable=import-outside-toplevel

  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{workdir!r} is not a training run directory (no config.json)")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model_config = ModelConfig.from_mapping(config.model)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  optimizer = state_lib.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model_config, optimizer, mesh, rules)
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    got = ckpt.restore_latest(abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  if got is None:
    raise FileNotFoundError(f"no checkpoint found in {workdir}/checkpoints")
  _, state, _ = got
  params = state.ema_params if use_ema else state.params
  return config, model_config, params, build_tokenizer(config, workdir)
