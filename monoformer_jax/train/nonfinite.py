"""config.nonfinite: what the trainer does when a step's loss or gradient norm is NaN / Inf.

"stop" ends the run (exit 3, the checkpoints intact). "rollback" restores the last checkpoint,
skips the batches read since, scales the learning rate by `lr_factor` and goes on; it stops after
`max_tries` rollbacks without a checkpoint saved past the bad step. The trainer does the restore;
this file holds the check and the policy's state.
"""

from __future__ import annotations

import numpy as np

from monoformer_jax import cli


class NonFinite(Exception):
  """A step's loss or gradient norm is NaN / Inf (handled by config.nonfinite's policy)."""

  def __init__(self, step: int, names: list):
    super().__init__(f"non-finite {', '.join(names)} at step {step}")
    self.step = step


def check_finite(step: int, values: dict) -> None:
  """Raises NonFinite naming the metrics of `step` that are NaN / Inf."""
  bad = [k for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)]
  if bad:
    raise NonFinite(step, bad)


class Rollbacks:
  """The policy's state: the learning-rate scale so far and the rollbacks since the last
  checkpoint saved past a non-finite step. Saved in checkpoints, so a restarted run keeps both."""

  def __init__(self, policy, state: dict):
    self.policy = policy
    self.lr_scale = float(state.get("lr_scale", 1.0))
    self.tries = int(state.get("tries", 0))
    self.bad_step = int(state.get("bad_step", -1))

  def get_state(self) -> dict:
    return {"lr_scale": self.lr_scale, "tries": self.tries, "bad_step": self.bad_step}

  def saved(self, step: int) -> None:
    if step > self.bad_step:
      self.tries = 0

  def next_try(self, bad: NonFinite) -> None:
    """Counts a rollback for `bad`, or raises cli.RunStopped when the policy says stop."""
    if self.policy.policy == "stop":
      raise cli.RunStopped(
          f"{bad} (lower the learning rate or check the data; config.nonfinite.policy=rollback "
          "recovers instead); the checkpoints saved before it are intact"
      )
    if self.tries >= self.policy.max_tries:
      raise cli.RunStopped(
          f"{bad}, after {self.tries} rollbacks without a checkpoint past step {self.bad_step} "
          "(config.nonfinite.max_tries); the checkpoints saved before it are intact"
      )
    self.tries += 1
    self.bad_step = max(self.bad_step, bad.step)
    self.lr_scale *= self.policy.lr_factor


def with_lr_scale(config, scale: float):
  """`config` with optimizer.learning_rate scaled (the schedule's shape kept)."""
  if scale == 1.0:
    return config
  scaled = config.copy_and_resolve_references()
  scaled.optimizer.learning_rate = config.optimizer.learning_rate * scale
  return scaled
