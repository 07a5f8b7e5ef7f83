"""Which train step runs next: a deterministic, resumable weighted round-robin.

With weights {'diffusion': 9, 'ar': 1} nine of every ten steps are diffusion steps, spread evenly
(smooth weighted round-robin: every step each kind earns its weight in credit, the richest kind
runs and pays the total). The credits are the whole state, saved in checkpoints.
"""

from __future__ import annotations

from typing import Mapping


class StepScheduler:

  def __init__(self, weights: Mapping[str, float]):
    self.weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
    if not self.weights:
      raise ValueError(f"schedule.weights must give some step kind a positive weight, got "
                       f"{dict(weights)}")
    self.total = sum(self.weights.values())
    self.credits = {k: 0.0 for k in self.weights}

  def next(self) -> str:
    for k, w in self.weights.items():
      self.credits[k] += w
    kind = max(self.weights, key=lambda k: (self.credits[k], k))
    self.credits[kind] -= self.total
    return kind

  def get_state(self) -> dict:
    return {"credits": dict(self.credits)}

  def set_state(self, state: Mapping) -> None:
    credits = dict(state["credits"])
    if set(credits) != set(self.weights):
      raise ValueError(f"scheduler state has kinds {sorted(credits)}, config has "
                       f"{sorted(self.weights)}")
    self.credits = {k: float(v) for k, v in credits.items()}
