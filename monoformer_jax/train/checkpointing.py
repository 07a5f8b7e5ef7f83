"""orbax checkpoints of the whole run: train state + scheduler + data-iterator state.

Layout: WORKDIR/checkpoints/<step>/{state, extra}. How orbax 0.12.8 marks a finished save on a
local (or any non-GCS) file system: it writes into `<step>.orbax-checkpoint-tmp`, writes
`commit_success.txt` into it when everything is on disk, then renames the folder to `<step>`
(orbax/checkpoint/_src/path/atomicity.py, AtomicRenameTemporaryPath.finalize); on GCS it writes
straight into `<step>` and `commit_success.txt` alone marks it finished (CommitFileTemporaryPath).
So a killed save leaves a `*.orbax-checkpoint-tmp` folder, which orbax never lists as a step; the
trainer warns about such leftovers and lets orbax delete them. On restore a `<step>` folder
without `commit_success.txt` (a copy cut short, say) is skipped with a warning, and a step that
fails to load (corrupt files) is reported and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

# orbax 0.12.8's markers (orbax/checkpoint/_src/path/atomicity_types.py).
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_SUCCESS_FILE = "commit_success.txt"


def step_dirs(workdir: str) -> list[int]:
  """The steps with a `<step>` folder under WORKDIR/checkpoints, sorted (no orbax, no checks:
  for "does this run have checkpoints / which is the newest"; restore validates them)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _warn(message: str) -> None:
  logging.warning(message)
  print(f"WARNING: {message}", flush=True)


class Checkpointer:
  """`clean_unfinished`: warn about and delete saves a killed job left half-written. Only the
  training job itself may: a reader (sampling from a running job's workdir) would delete the
  save in progress."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               clean_unfinished: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if clean_unfinished and jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if TMP_DIR_SUFFIX in name:
          _warn(f"ignoring and deleting the unfinished save {self.directory}/{name} (a job was "
                "stopped while writing it)")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=clean_unfinished)
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
      if not os.path.exists(os.path.join(self.directory, str(step), COMMIT_SUCCESS_FILE)):
        _warn(f"checkpoint {self.directory}/{step} has no {COMMIT_SUCCESS_FILE} (its save never "
              "finished); falling back to the previous checkpoint")
        continue
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
  # One local device: under multi-host every process loads its own copy (jax.devices()[:1] would
  # name process 0's device, which other processes cannot address).
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
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
