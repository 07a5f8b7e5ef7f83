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

import contextlib
import logging
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from monoformer_jax import paths

# orbax 0.12.8's markers (orbax/checkpoint/_src/path/atomicity_types.py).
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_SUCCESS_FILE = "commit_success.txt"


def checkpoint_dir(workdir) -> epath.Path:
  """WORKDIR/checkpoints (a local workdir made absolute: orbax wants absolute paths)."""
  path = epath.Path(workdir)
  if "://" not in str(workdir):
    path = epath.Path(os.path.abspath(workdir))
  return path / "checkpoints"


def step_dirs(workdir) -> list[int]:
  """The steps with a `<step>` folder under WORKDIR/checkpoints, sorted (no orbax, no checks:
  for "does this run have checkpoints / which is the newest"; restore validates them)."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


# What orbax / tensorstore / XLA say when a readable checkpoint does not fit the run asking for it
# (another model, too little memory): errors of the run, not of the files, so no fallback.
NOT_CORRUPTION = (
    "is not compatible with the stored shape",
    "tree structures do not match",
    "RESOURCE_EXHAUSTED",
    "Out of memory",
    "out of memory",
)


class CheckpointMismatchError(ValueError):
  """A readable checkpoint of another model than the one asked for (not corruption: restoring
  an older step would not help, so nothing falls back)."""


def _flat_shapes(tree, prefix="") -> dict:
  """{'a/b/c': shape} of a nested dict of arrays / ShapeDtypeStructs / orbax array metadata."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_flat_shapes(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(value.shape)
  return out


def shape_mismatches(stored_params, wanted_params) -> list[str]:
  """What differs between a checkpoint's parameter shapes and the model's, one line each."""
  stored, wanted = _flat_shapes(stored_params), _flat_shapes(wanted_params)
  problems = [
      f"{k}: checkpoint {stored.get(k, 'missing')} vs model {v}"
      for k, v in sorted(wanted.items())
      if stored.get(k) != v
  ]
  problems += [f"{k}: not in the model" for k in sorted(set(stored) - set(wanted))]
  return problems


def _warn(message: str) -> None:
  logging.warning(message)
  print(f"WARNING: {message}", flush=True)


class Checkpointer:
  """`clean_unfinished`: warn about and delete saves a killed job left half-written. Only the
  training job itself may: a reader (sampling from a running job's workdir) would delete the
  save in progress. `read_only`: a reader that writes nothing (no folder is created)."""

  def __init__(
      self,
      workdir: str,
      *,
      max_to_keep: int = 3,
      async_save: bool = True,
      clean_unfinished: bool = False,
      read_only: bool = False,
  ):
    self.directory = checkpoint_dir(workdir)
    self._repairs = clean_unfinished  # the training job moves bad steps aside; readers never do
    if clean_unfinished and jax.process_index() == 0 and self.directory.is_dir():
      for path in sorted(self.directory.iterdir()):
        if TMP_DIR_SUFFIX in path.name:
          _warn(f"ignoring and deleting the unfinished save {path} (a job was stopped while writing it)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save and not read_only,
        create=not read_only,
        cleanup_tmp_directories=clean_unfinished,
    )
    # Handlers named up front, so a step's metadata (its arrays' shapes) reads before a restore.
    # PyTreeRestore reads a part of the state (the weights alone: `restore_weights`).
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add("state", args_type, ocp.StandardCheckpointHandler())
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add("extra", args_type, ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
    """Saves asynchronously (returns once the device arrays are copied). A write that fails
    (a full disk, a file-size limit), here or in the background, is raised by this call, the
    next one or `wait` / `close` as one OSError naming the finished steps that remain."""
    with self._write_errors():
      return self.manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
          force=force,
      )

  def wait(self):
    with self._write_errors():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _write_errors(self):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # only write failures are rephrased
      if not (isinstance(e, OSError) or "Error writing" in str(e) or "os_error_code" in str(e)):
        raise
      finished = [
          s for s in step_dirs(self.directory.parent) if (self.directory / str(s) / COMMIT_SUCCESS_FILE).exists()
      ]
      why = " ".join(str(e).split())
      # tensorstore buries the OS's reason ("...: File too large [os_error_code='27']") in a
      # long message, quoted once more when errors are gathered: name it from the code alone.
      code = re.search(r"os_error_code\W*(\d+)", why)
      if isinstance(e, OSError) and e.errno:
        why = f"{e.strerror}, errno {e.errno}"
      else:
        why = f"{os.strerror(int(code.group(1)))}, errno {code.group(1)}" if code else why[:300]
      raise OSError(
          f"writing a checkpoint under {self.directory} failed ({why}); "
          f"the finished checkpoints {finished} are intact and a restart resumes from the last"
      ) from e

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, *, at_most: Optional[int] = None) -> Optional[tuple[int, Any, dict]]:
    """(step, state, extra) of the newest loadable checkpoint (at or before step `at_most` when
    given), or None if there is none.

    `abstract_state` holds jax.ShapeDtypeStruct leaves with shardings, so arrays come back
    already sharded on the current mesh (which may differ from the one that saved them).
    """

    def restore(step):
      self._check_shapes(step, abstract_state.params)
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore())
      restored = self.manager.restore(step, args=args)
      return step, restored["state"], dict(restored["extra"])

    return self._newest(restore, at_most)

  def restore_weights(
      self, abstract_params, *, ema: bool = True, at_most: Optional[int] = None
  ) -> Optional[tuple[int, Any]]:
    """(step, weights) of the newest loadable checkpoint: its EMA weights (or, `ema=False`, the
    raw ones) and nothing else. The optimizer's arrays are never read from storage, and each
    weight is read straight into the dtype and sharding of its `abstract_params` leaf."""
    name = "ema_params" if ema else "params"
    item = {name: abstract_params}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape), item
    )

    def restore(step):
      self._check_shapes(step, abstract_params, name)
      args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      return step, self.manager.restore(step, args=ocp.args.Composite(state=args))["state"][name]

    return self._newest(restore, at_most)

  def _newest(self, restore, at_most: Optional[int]):
    """restore(step) of the newest step that loads (at or before `at_most`), falling back past
    unfinished and corrupt ones; None if none loads."""
    for step in reversed([s for s in self.steps() if at_most is None or s <= at_most]):
      if not (self.directory / str(step) / COMMIT_SUCCESS_FILE).exists():
        _warn(
            f"checkpoint {self.directory}/{step} has no {COMMIT_SUCCESS_FILE} (its save never "
            "finished); falling back to the previous checkpoint"
        )
        self._move_aside(step)
        continue
      try:
        return restore(step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # corruption: try the previous
        if any(pattern in str(e) for pattern in NOT_CORRUPTION):
          # Restoring an older step would fail the same way (or roll the run back for nothing).
          raise CheckpointMismatchError(
              f"checkpoint {self.directory}/{step} is readable but cannot be restored into this "
              f"run ({type(e).__name__}: {str(e)[:500]}); nothing was rolled back"
          ) from e
        logging.warning(
            "checkpoint at step %d could not be restored (%s: %s); trying the previous one",
            step,
            type(e).__name__,
            str(e)[:300],
        )
        print(
            f"WARNING: checkpoint {self.directory}/{step} is unreadable "
            f"({type(e).__name__}); falling back to the previous checkpoint",
            flush=True,
        )
        self._move_aside(step)
    return None

  def _move_aside(self, step: int) -> None:
    """Moves a step that cannot be restored to WORKDIR/corrupt_checkpoints/ (kept for
    inspection, never deleted), so the resumed run can save that step again (orbax refuses a
    step it already lists). Only the training job does; every process waits for process 0."""
    if not self._repairs:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / "corrupt_checkpoints"
      aside.mkdir(parents=True, exist_ok=True)
      target, n = aside / str(step), 1
      while target.exists():
        target, n = aside / f"{step}.{n}", n + 1
      paths.move_tree(self.directory / str(step), target)
      _warn(f"moved checkpoint step {step} aside to {target} (kept for inspection)")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()

  def _check_shapes(self, step: int, abstract_params, name: str = "params") -> None:
    """Raises CheckpointMismatchError when step's readable metadata holds parameters of other
    shapes than `abstract_params`, or no `name` weights at all (unreadable metadata is left to
    the restore, as corruption)."""
    try:
      state = self.manager.item_metadata(step)["state"]
      keys = list(state.keys())
    except Exception:  # pylint: disable=broad-except  # unreadable: the restore decides
      return
    if name not in keys:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} holds no {name} (it has {', '.join(sorted(keys))})"
          + ("; open its raw weights instead (use_ema=False, --nouse_ema)" if name == "ema_params" else "")
      )
    problems = shape_mismatches(state[name], abstract_params)
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} holds a model of another shape than the config "
          f"({len(problems)} parameters differ: {'; '.join(problems[:6])}): a checkpoint of "
          "another model, or the wrong config"
      )

  def close(self):
    with self._write_errors():
      self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
