"""What one accelerator chip can do: peak dense bf16 FLOP/s, HBM size and bandwidth, interconnect.

Public per-chip figures of Google Cloud's TPU system-architecture pages (v4, v5e, v5p, v6e) and
NVIDIA's data sheets; the roofline of `tools/compile_for` divides a compiled step's work by them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the topology prefix ("v5e") or a GPU's name
  device_kind: str  # what jax's Device.device_kind says for it
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: int
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # chip-to-chip interconnect, all links of one chip together


TPU_CHIPS = (
    Chip("v4", "TPU v4", 275e12, 32 * GIB, 1228e9, 600e9),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 200e9),
    Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 600e9),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, 448e9),
)


def tpu_chip(topology_name: str) -> Chip:
  """The chip of a topology name such as 'v5e:16x16' or 'v4:4x4x4'."""
  prefix = topology_name.split(":", 1)[0].strip().lower()
  for chip in TPU_CHIPS:
    if chip.name == prefix:
      return chip
  raise ValueError(f"unknown TPU generation {prefix!r} in {topology_name!r}; one of {[c.name for c in TPU_CHIPS]}")


def chip_for_device_kind(device_kind: str) -> Optional[Chip]:
  """The chip whose jax device_kind is `device_kind` (exact match: 'TPU v5' is v5p, not v5e)."""
  for chip in TPU_CHIPS:
    if chip.device_kind.lower() == device_kind.strip().lower():
      return chip
  return None


def per_core(chip: Chip, cores: int) -> Chip:
  """One TensorCore's share of `chip` when a slice exposes each core as a device (v4 does)."""
  if cores <= 1:
    return chip
  return dataclasses.replace(
      chip,
      peak_flops=chip.peak_flops / cores,
      hbm_bytes=chip.hbm_bytes // cores,
      hbm_bytes_per_s=chip.hbm_bytes_per_s / cores,
      ici_bytes_per_s=chip.ici_bytes_per_s / cores,
  )
