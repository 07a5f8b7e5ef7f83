"""What a training checkpoint holds, as a named record: the step, the train state, and where the
loop stood (the scheduler, each data iterator, the half-filled metrics window, config.nonfinite's
state), so a restarted run goes on exactly where the saved one was.

Stored through run/checkpoints.py's Checkpointer: the state as arrays, the rest as its JSON
`extra` item.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from monoformer_jax.run import checkpoints


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """One checkpoint of a training run. `data`: per step kind, its iterator's state;
  `metrics_window`: metrics.Accumulator's state; `nonfinite`: nonfinite.Rollbacks' state."""

  step: int
  state: Any
  scheduler: dict
  data: dict = dataclasses.field(default_factory=dict)
  metrics_window: dict = dataclasses.field(default_factory=dict)
  nonfinite: dict = dataclasses.field(default_factory=dict)

  def save(self, checkpointer: checkpoints.Checkpointer) -> None:
    """Saves as checkpoint `step` (asynchronously: returns once the arrays are copied)."""
    extra = {
        "scheduler": self.scheduler,
        "data": self.data,
        "metrics_window": self.metrics_window,
        "nonfinite": self.nonfinite,
    }
    checkpointer.save(self.step, self.state, extra, force=True)

  @classmethod
  def restore_latest(cls, checkpointer: checkpoints.Checkpointer, abstract_state) -> Optional[Snapshot]:
    """The newest loadable checkpoint (arrays sharded as `abstract_state` says), or None.
    Checkpoints of older runs may lack the data, metrics-window and nonfinite entries."""
    found = checkpointer.restore_latest(abstract_state)
    if found is None:
      return None
    step, state, extra = found
    return cls(
        step=step,
        state=state,
        scheduler=extra["scheduler"],
        data=extra.get("data", {}),
        metrics_window=extra.get("metrics_window", {}),
        nonfinite=extra.get("nonfinite", {}),
    )
