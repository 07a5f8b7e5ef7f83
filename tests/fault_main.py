"""The training entry point with faults injected through the trainer's hooks (for the resume
tests): `python -m tests.fault_main --kill_after_step=N [monoformer_jax.main flags]`.

  --kill_after_step=N  SIGKILL right after step N is dispatched and logged, without saving it
                       (saves already under way are finished first, so the test knows which
                       checkpoint survives).
  --kill_at_step=N     SIGKILL once checkpoint step N is saved (and written to disk).
  --kill_mid_save=N    SIGKILL inside orbax's background commit of step N, once every array and
                       the JSON are written, just before the commit marker and the rename that
                       make the step a checkpoint.
  --sigterm_after_step=N[:P]  SIGTERM to itself right after step N, on process P only (default 0):
                       a preemption notice reaching one process of a multi-process run. Every
                       process then waits 2.5 s, and 0.2 s after each later step: JAX's SIGTERM
                       notifier looks for the signal once a second, and the tiny test run must
                       not end before the notice has reached every process.
"""

import os
import signal
import sys
import time

import jax
from orbax.checkpoint._src.path import atomicity

from monoformer_jax import main as entry


class KillAfterStep:

  def __init__(self, step: int, after_save: bool):
    self.step, self.after_save = step, after_save

  def after_step(self, context):
    if context.step != self.step or (self.after_save and not context.saved):
      return
    context.checkpointer.wait()
    context.writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class SigtermAfterStep:

  def __init__(self, step: int, process: int):
    self.step, self.process = step, process

  def after_step(self, context):
    if context.step == self.step and jax.process_index() == self.process:
      print(f"test: SIGTERM to process {self.process} after step {self.step}", flush=True)
      os.kill(os.getpid(), signal.SIGTERM)
    if context.step >= self.step:
      time.sleep(2.5 if context.step == self.step else 0.2)


def kill_mid_save(step: int) -> None:
  """Patches orbax's step-folder commit (AtomicRenameTemporaryPath.finalize, orbax 0.12.8) to
  SIGKILL this process when it would commit `step`."""
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def killing_finalize(self, *args, **kwargs):
    if self._final_path.name == str(step):  # pylint: disable=protected-access
      print(f"test: SIGKILL while committing checkpoint {step}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize


def main(argv):
  hooks, rest = [], []
  for arg in argv:
    name, _, value = arg.partition("=")
    if name in ("--kill_after_step", "--kill_at_step"):
      hooks.append(KillAfterStep(int(value), after_save=name == "--kill_at_step"))
    elif name == "--kill_mid_save":
      kill_mid_save(int(value))
    elif name == "--sigterm_after_step":
      step, _, process = value.partition(":")
      hooks.append(SigtermAfterStep(int(step), int(process or 0)))
    else:
      rest.append(arg)
  return entry.main(rest, hooks=hooks)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
