"""What a training run tells its user: `report(line)` for every line, `Progress` for the progress
line and the throughput of each logging window.

Lines go to stdout, flushed at once: users watch them as they come and the tests read them.
`Progress` has the shape of clu's ReportProgress (counts per window, a report per log step), which
is not used itself because clu's periodic_actions import TensorFlow.
"""

from __future__ import annotations

import time
from typing import Optional

import jax

LOSS_KEYS = ("loss_diffusion", "loss_lm", "loss_understand")  # shown on the progress line


def report(line: str) -> None:
  """Shows `line` to the user (every process's stdout; callers decide which processes speak)."""
  print(line, flush=True)


class Progress:
  """Tokens/s, images/s, TFLOP/s and MFU over each logging window, and the progress line with the
  time since the start and the estimated time to the last step.

  `restart_window` leaves out what should not count (a first step's compile, a rollback)."""

  def __init__(self, num_train_steps: int, start_step: int, peak_flops: Optional[float]):
    """`peak_flops`: one device's peak FLOP/s (None where unknown: no MFU)."""
    self.num_train_steps, self.start_step, self.peak_flops = num_train_steps, start_step, peak_flops
    self.started = time.perf_counter()
    self.restart_window()

  def restart_window(self) -> None:
    self.window_start = time.perf_counter()
    self.tokens = self.images = self.flops = 0.0
    self.steps = 0

  def add(self, tokens: float, images: float, flops: float) -> None:
    """Counts one step."""
    self.tokens += tokens
    self.images += images
    self.flops += flops
    self.steps += 1

  def window_metrics(self) -> dict:
    """The window's throughput (the timing values of a metrics row); starts the next window."""
    dt = max(time.perf_counter() - self.window_start, 1e-9)
    n = jax.device_count()
    out = {
        "step_time_s": dt / max(self.steps, 1),
        "tokens_per_s": self.tokens / dt,
        "images_per_s": self.images / dt,
        "tflops_per_device": self.flops / dt / n / 1e12,
    }
    if self.peak_flops:
      out["mfu"] = self.flops / dt / n / self.peak_flops
    self.restart_window()
    return out

  def elapsed(self) -> float:
    return time.perf_counter() - self.started

  def line(self, step: int, metrics: dict) -> str:
    """`step N/TOTAL loss_...=... lr=... T tok/s elapsed Es eta Es` (the ETA at this run's rate)."""
    elapsed = self.elapsed()
    rate = (step - self.start_step) / max(elapsed, 1e-9)
    eta = (self.num_train_steps - step) / max(rate, 1e-9)
    losses = " ".join(f"{k}={metrics[k]:.4f}" for k in LOSS_KEYS if k in metrics)
    return (
        f"step {step}/{self.num_train_steps} {losses} lr={metrics.get('learning_rate', 0):.2e} "
        f"{metrics['tokens_per_s']:.0f} tok/s elapsed {elapsed:.0f}s eta {eta:.0f}s"
    )
