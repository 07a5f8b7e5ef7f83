"""The training entry point with faults injected through the trainer's hooks (for the resume
tests): `python -m tests.fault_main --kill_after_step=N [monoformer_jax.main flags]`.

  --kill_after_step=N  SIGKILL right after step N is dispatched and logged, without saving it
                       (saves already under way are finished first, so the test knows which
                       checkpoint survives).
  --kill_at_step=N     SIGKILL once checkpoint step N is saved (and written to disk).
"""

import os
import signal
import sys

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


def main(argv):
  hooks, rest = [], []
  for arg in argv:
    name, _, value = arg.partition("=")
    if name in ("--kill_after_step", "--kill_at_step"):
      hooks.append(KillAfterStep(int(value), after_save=name == "--kill_at_step"))
    else:
      rest.append(arg)
  return entry.main(rest, hooks=hooks)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
