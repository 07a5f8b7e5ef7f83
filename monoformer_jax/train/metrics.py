"""Metric writing (JSONL + TensorBoard via tensorboardX), FLOP counting and peak FLOP/s (for MFU).

Only process 0 writes. `clu.metrics` accumulates per-step values between log points.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import jax
import numpy as np
from clu import metrics as clu_metrics
from etils import epath

from monoformer_jax import paths
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run import chips as chips_lib
from monoformer_jax.run import tensorboard
from monoformer_jax.train.reporting import report

# Dense bf16 peak FLOP/s of GPUs, keyed by a substring of `device.device_kind` (TPUs: run/chips.py).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
  chip = chips_lib.chip_for_device_kind(device_kind)
  if chip is not None:
    return chip.peak_flops
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def local_peak_flops() -> Optional[float]:
  """The peak FLOP/s of one of this process's devices (None: unknown, or devices of mixed kinds)."""
  kinds = {d.device_kind for d in jax.local_devices()}
  return peak_flops(kinds.pop()) if len(kinds) == 1 else None


def forward_flops_per_sequence(config: ModelConfig, seq_len: int, image_tokens: int, lm_head: bool) -> float:
  """Matmul FLOPs of one forward pass over one row (embedding gathers not counted).

  Causal text attention is counted at half cost; a row holding generated-image tokens is counted
  at full attention cost (bidirectional image block), as the issue asks.
  """
  h, d = config.hidden_size, config.dim_per_head
  q, kv = config.num_heads * d, config.num_kv_heads * d
  per_token_layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size)
  dense = seq_len * config.num_layers * per_token_layer
  pairs = seq_len * seq_len if image_tokens else seq_len * (seq_len + 1) / 2
  attention = config.num_layers * 4 * q * pairs
  head = 2 * seq_len * h * config.vocab_size if lm_head else 0
  image = 0
  if image_tokens:
    image = 2 * image_tokens * (config.patch_dim * h + h * 2 * h + h * config.patch_size**2 * config.output_channels)
  return float(dense + attention + head + image)


def train_flops_per_step(config: ModelConfig, batch_size: int, seq_len: int, image_tokens: int, lm_head: bool) -> float:
  """Forward + backward = 3 x forward."""
  return 3.0 * batch_size * forward_flops_per_sequence(config, seq_len, image_tokens, lm_head)


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and TensorBoard events.

  `resume_step` (the step training restarts from: the restored checkpoint's, or 0) drops what a
  killed run logged past it, so the steps it redoes are not logged twice: metrics.jsonl is
  rewritten without the rows of later steps, and TensorBoard, whose event files are append-only,
  is told to hide their events (tensorboardX's purge_step: a SessionLog.START at resume_step + 1
  makes TensorBoard discard earlier files' events from that step on).
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    # A bucket object cannot be appended to: there the rows are kept here and the whole file is
    # written (one atomic object write) on every logged step. Locally each row is appended.
    self._rows = None if paths.is_local(workdir) else []
    self._tb = None
    self._rewinds = 0  # event files opened by `rewind` (each needs its own name)
    if enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      tb_dir = epath.Path(workdir) / "tensorboard"
      purge = None
      if self._rows is not None and self.path.exists():
        self._rows = self.path.read_text().splitlines(keepends=True)
      if resume_step is not None:
        self.discard_after(resume_step)
        if tensorboard.has_events(tb_dir):
          purge = int(resume_step) + 1
      self._tb = tensorboard.summary_writer(tb_dir, purge_step=purge)

  def rewind(self, step: int) -> None:
    """Drops what was logged past `step` (a rollback to that checkpoint): metrics.jsonl rows,
    and TensorBoard's events through a new event file that purges them."""
    if not self.enabled:
      return
    self.discard_after(step)
    self._tb.close()
    self._rewinds += 1
    self._tb = tensorboard.summary_writer(
        self.path.parent / "tensorboard", purge_step=int(step) + 1, filename_suffix=f".rewind{self._rewinds}"
    )

  def discard_after(self, step: int) -> int:
    """Rewrites metrics.jsonl (atomically) without rows past `step`; returns how many it dropped.

    A line cut short by a kill in the middle of a write is dropped too.
    """
    if not self.enabled or not self.path.exists():
      return 0
    kept, dropped = [], 0
    for line in self.path.read_text().splitlines(keepends=True):
      try:
        row = json.loads(line)
        keep = int(row["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
    if dropped:
      paths.write_text_atomic(self.path, "".join(kept))
      if self._rows is not None:
        self._rows = kept
      report(
          f"dropped {dropped} metrics.jsonl rows past step {step} (logged after the checkpoint "
          "training goes on from)"
      )
    return dropped

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {
        k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) or np.ndim(v) == 0 else v)
        for k, v in scalars.items()
    }
    for k, v in clean.items():
      if isinstance(v, float) and not math.isfinite(v):
        clean[k] = None if math.isnan(v) else v
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._rows is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._rows.append(line)
      self.path.write_text("".join(self._rows))
    for k, v in clean.items():
      if isinstance(v, float):
        self._tb.add_scalar(k, v, int(step))

  def write_image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, image_hwc_uint8, int(step), dataformats="HWC")

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(name, text, int(step))

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Accumulator:
  """Averages each metric over the steps since the last log (clu.metrics.Average per key).

  Its state (per key: float32 total and count) goes into checkpoints, so a run resumed in the
  middle of a logging window logs the same averages as one that never stopped.
  """

  def __init__(self):
    self.values: dict = {}

  def add(self, metrics: dict) -> None:
    for k, v in metrics.items():
      m = clu_metrics.Average.from_model_output(np.asarray(v, np.float32))
      self.values[k] = m if k not in self.values else self.values[k].merge(m)

  def compute_and_reset(self) -> dict:
    out = {k: float(m.compute()) for k, m in self.values.items()}
    self.values = {}
    return out

  def get_state(self) -> dict:
    """JSON-able; float32 totals round-trip exactly through Python floats."""
    return {k: [float(np.asarray(m.total)), int(np.asarray(m.count))] for k, m in self.values.items()}

  def set_state(self, state: dict) -> None:
    self.values = {
        k: clu_metrics.Average(total=np.float32(total), count=np.int32(count)) for k, (total, count) in state.items()
    }
