"""Which train step runs next: a deterministic, resumable weighted round-robin.

With weights {'diffusion': 9, 'ar': 1} nine of every ten steps are diffusion steps, spread evenly
(smooth weighted round-robin: every step each kind earns its weight in credit, the richest kind
runs and pays the total). The credits are the whole state, saved in checkpoints.

An optional text warm-up runs AR steps only for the first `text_warmup_steps` global steps (the
round-robin starts after it), the way MonoFormer itself starts from a trained language model: the
prompt tokens already have contextual features when the image tokens begin to read them. (On the
embedded default, 150 warm-up steps improved the text and cost digits: benchmarks/RESULTS.md.)
"""

from __future__ import annotations

from typing import Mapping


class StepScheduler:

  def __init__(self, weights: Mapping[str, float], text_warmup_steps: int = 0):
    self.weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
    if not self.weights:
      raise ValueError(f"schedule.weights must give some step kind a positive weight, got {dict(weights)}")
    self.text_warmup_steps = int(text_warmup_steps)
    if self.text_warmup_steps < 0 or (self.text_warmup_steps and "ar" not in self.weights):
      raise ValueError(
          f"schedule.text_warmup_steps={text_warmup_steps} needs to be >= 0, and "
          f"a positive 'ar' weight (it runs AR steps)"
      )
    self.total = sum(self.weights.values())
    self.credits = {k: 0.0 for k in self.weights}

  def next(self, step: int) -> str:
    """The kind of global step `step` (0-based; the trainer's step counter)."""
    if step < self.text_warmup_steps:
      return "ar"
    for k, w in self.weights.items():
      self.credits[k] += w
    kind = max(self.weights, key=lambda k: (self.credits[k], k))
    self.credits[kind] -= self.total
    return kind

  def get_state(self) -> dict:
    return {"credits": dict(self.credits)}

  def set_state(self, state: Mapping) -> None:
    saved = dict(state["credits"])
    if set(saved) != set(self.weights):
      raise ValueError(f"scheduler state has kinds {sorted(saved)}, config has {sorted(self.weights)}")
    self.credits = {k: float(v) for k, v in saved.items()}
