"""Augmentations of images on the host (NumPy), for the steps and tools that train on few images."""

from __future__ import annotations

import numpy as np


def translate(images: np.ndarray, dy, dx, max_shift: int, mode: str = "constant") -> np.ndarray:
  """images (N, H, W, C), image i moved dy[i] pixels down and dx[i] right (|d| <= max_shift);
  what moves in is filled as np.pad's `mode` fills (zeros, or the edge value with 'edge')."""
  m = max_shift
  h, w = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode=mode)
  out = np.empty_like(images)
  for i, (y, x) in enumerate(zip(dy, dx)):
    out[i] = padded[i, m - y : m - y + h, m - x : m - x + w]
  return out
