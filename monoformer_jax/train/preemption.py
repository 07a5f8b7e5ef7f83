"""Preemption: a SIGTERM makes every process of the run save the same step and stop."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Preemption:
  """SIGTERM (preemption) -> every process saves the same step and stops.

  One process without jax.distributed: our SIGTERM handler sets a flag the loop checks between
  steps. Under jax.distributed, `jax.distributed.initialize` has installed JAX's own SIGTERM
  notifier: a SIGTERM to any one process reaches all of them through the coordination service,
  and `reached_preemption_sync_point(step)` turns True on every process at the same step (one
  past the largest step any of them had reached), so they all take part in one collective save.
  A Python handler installed after `initialize` would take the signal from JAX's notifier (no
  process would ever reach the sync point), so under jax.distributed we install none.

  JAX's protocol takes each process's last reported step (0 before the first report), so the
  step the loop starts from is reported on entry: a notice arriving while the first step
  compiles then stops the run after that step, where unreported it would set the sync point to
  step 1, long past in a resumed run, and no process would ever save. (A notice arriving before
  that, while the checkpoint is restored, is lost that way; the scheduler's kill at the end of
  its grace period then restarts the job from the same checkpoint.)
  """

  def __init__(self, step: int):
    self.requested = False
    self._previous = None
    self._synced = False
    self._step = step

  def __enter__(self):
    self._synced = jax.distributed.is_initialized()
    if self._synced:
      self.reached(self._step)
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. notebooks): no handler
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Called after every step on every process: JAX's sync
    protocol counts on every process reporting each step."""
    if self._synced and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
