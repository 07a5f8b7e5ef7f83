"""Beta schedules and IDDPM timestep respacing, in float64 NumPy (host-side, trace-time constants).

Everything here runs once when a diffusion is built; nothing is traced. float64 matters: the
cumulative product of 1000 alphas and the 1/alpha_bar tables lose digits in float32, and the
official code builds them in float64 too (jnp.float64 would silently be float32 without x64).
"""

from __future__ import annotations

import math

import numpy as np

BETA_SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> np.ndarray:
  """The DDPM linear schedule 1e-4..0.02, rescaled so any step count spans the same noise range.

  The official code multiplies both ends by 1000/num_timesteps, so 1000 steps give exactly
  linspace(1e-4, 0.02, 1000).
  """
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM cosine schedule: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2.

  beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at max_beta so the last step stays
  finite.
  """

  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [
      min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ]
  return np.asarray(betas, dtype=np.float64)


def named_betas(schedule: str, num_timesteps: int) -> np.ndarray:
  if schedule == "linear":
    return linear_betas(num_timesteps)
  if schedule == "cosine":
    return cosine_betas(num_timesteps)
  raise ValueError(f"unknown beta schedule {schedule!r}; one of {BETA_SCHEDULES}")


def spaced_timesteps(num_timesteps: int, respacing: str | int | None) -> list[int]:
  """Original timesteps kept by an IDDPM respacing string, sorted ascending.

  "" / None       : all steps.
  "250" / 250     : 250 steps spread evenly (fractional stride, Python rounding) over [0, T).
  "10,15,20"      : T is cut into 3 equal sections with 10, 15 and 20 evenly spread steps each.
  "ddim50"        : the integer stride s with len(range(0, T, s)) == 50 (DDIM-style, starts at 0).
  """
  if respacing is None or respacing == "":
    return list(range(num_timesteps))
  if isinstance(respacing, int):
    respacing = str(respacing)
  respacing = respacing.strip()
  if respacing.startswith("ddim"):
    wanted = int(respacing[len("ddim") :])
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == wanted:
        return list(range(0, num_timesteps, stride))
    raise ValueError(f"cannot take exactly {wanted} steps with an integer stride from {num_timesteps}")
  counts = [int(part) for part in respacing.split(",")]
  section, extra = divmod(num_timesteps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = section + (1 if i < extra else 0)
    if count > size:
      raise ValueError(f"cannot take {count} steps from a section of {size} steps")
    if count < 1:
      raise ValueError(f"respacing {respacing!r}: every section needs at least one step")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    # Accumulated (not j * stride) and Python's round (half to even), on purpose: both decide
    # which steps the official code keeps when a position lands on .5.
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return sorted(set(kept))


def respaced_betas(base_alphas_cumprod: np.ndarray, kept: list[int]) -> np.ndarray:
  """Betas of the chain that visits only `kept`, with the same alpha_bar at every kept step.

  beta_k = 1 - alpha_bar[kept[k]] / alpha_bar[kept[k-1]], with alpha_bar before the first := 1.
  """
  betas, last = [], 1.0
  for step in kept:
    betas.append(1.0 - base_alphas_cumprod[step] / last)
    last = base_alphas_cumprod[step]
  return np.asarray(betas, dtype=np.float64)
