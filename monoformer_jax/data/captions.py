"""Captioned MNIST: free-text captions from measured attributes of each digit.

A caption names the class and, when the digit is clearly one or the other, its stroke weight (ink
mass against the other digits of its class: "thin" / "bold") and its slant (from the ink's second
moments: "leaning left" / "leaning right"), e.g. "Please generate an image of thin seven leaning
right." (the pipeline's text-to-image prefix + the caption). Each image gets one caption, drawn
once from its index: some name only the class, some one attribute, some both, so a model trained
on them takes any of those prompts.

The same measurements score generated digits (benchmarks/caption_following.py): a sample asked
"bold" should carry more ink than its twin asked "thin" from the same noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from monoformer_jax.data import mnist, sequences
from monoformer_jax.data.sources import MnistSource, Source

WEIGHT_WORDS = ("thin", "bold")
SLANT_WORDS = ("leaning left", "leaning right")
# How often a caption keeps an attribute the digit has (dropping it teaches the marginal prompts).
KEEP_ATTRIBUTE = 0.75


def _ink(images) -> np.ndarray:
  """(N, H, W[, 1]) images, uint8 0..255 or float in [0, 1] -> float (N, H, W) ink in [0, 1]."""
  x = np.asarray(images)
  x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else np.clip(x.astype(np.float64), 0.0, 1.0)
  if x.ndim == 4:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f"expected images (N, H, W) or (N, H, W, 1), got shape {np.shape(images)}")
  return x


def ink_mass(images) -> np.ndarray:
  """Mean ink per pixel of each image (stroke weight for a fixed class)."""
  return _ink(images).mean(axis=(1, 2))


def slant(images) -> np.ndarray:
  """Horizontal shift of the ink per row upwards (> 0: leaning right), -mu11 / mu02 of the ink
  distribution (rows grow downwards, so a right lean makes x and y anti-correlated)."""
  x = _ink(images)
  total = x.sum(axis=(1, 2)) + 1e-12
  rows, cols = np.arange(x.shape[1])[None, :, None], np.arange(x.shape[2])[None, None, :]
  yc = (x * rows).sum(axis=(1, 2)) / total
  xc = (x * cols).sum(axis=(1, 2)) / total
  dy, dx = rows - yc[:, None, None], cols - xc[:, None, None]
  mu11 = (x * dx * dy).sum(axis=(1, 2)) / total
  mu02 = (x * dy * dy).sum(axis=(1, 2)) / total
  return -mu11 / (mu02 + 1e-12)


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Attribute cut points measured on the training digits: per-class terciles of ink mass, and
  terciles of slant over all digits. Below the first tercile is "thin" / "leaning left", above the
  second "bold" / "leaning right"; the middle third gets no word."""

  weight: np.ndarray  # (num_classes, 2)
  slant: np.ndarray  # (2,)

  @classmethod
  def measure(cls, images, labels, num_classes: int = 10) -> "Thresholds":
    mass, lean = ink_mass(images), slant(images)
    weight = np.stack([np.quantile(mass[labels == c], [1 / 3, 2 / 3]) for c in range(num_classes)])
    return cls(weight=weight, slant=np.quantile(lean, [1 / 3, 2 / 3]))

  def words(self, images, labels) -> tuple[list[str], list[str]]:
    """Per image: its weight word and slant word ('' in the middle third)."""
    mass, lean = ink_mass(images), slant(images)
    lo, hi = self.weight[labels, 0], self.weight[labels, 1]
    weight = np.where(mass < lo, WEIGHT_WORDS[0], np.where(mass > hi, WEIGHT_WORDS[1], ""))
    side = np.where(lean < self.slant[0], SLANT_WORDS[0], np.where(lean > self.slant[1], SLANT_WORDS[1], ""))
    return weight.tolist(), side.tolist()


def caption(class_name: str, weight: str = "", side: str = "") -> str:
  """'[weight ]class[ side].': the pipeline puts the text-to-image prefix before it, so the prompt
  reads as the class template's 'Please generate an image of seven.'"""
  return " ".join(w for w in (weight, class_name, side) if w) + "."


def prompt(class_name: str, weight: str = "", side: str = "") -> str:
  """The whole prompt a caption is trained as (what to sample with)."""
  return sequences.T2I_PREFIX + caption(class_name, weight, side)


def train_thresholds() -> Thresholds:
  images, labels = mnist.load_mnist5k()
  train, _ = mnist.split_indices(len(labels))
  return Thresholds.measure(images[train], labels[train])


class MnistCaptionSource(Source):
  """MNIST-5k with captions: {"image": uint8 (28, 28, 1), "label": int, "prompt": str}.

  The thresholds come from the training split whatever `split` is read, so a held-out digit is
  described on the same scale. Which attributes a caption keeps is fixed per record (drawn from
  `seed` and the record's index), so the source stays a pure function of the index.
  """

  def __init__(self, split: str = "train", seed: int = 0):
    self.digits = MnistSource(split=split)
    self.class_names = mnist.CLASS_NAMES
    self.thresholds = train_thresholds()
    rows = self.digits.indices  # the split's records, in order
    self.weight_words, self.slant_words = self.thresholds.words(self.digits.images[rows], self.digits.labels[rows])
    self.seed, self.split = seed, split

  def __len__(self) -> int:
    return len(self.digits)

  def __getitem__(self, i: int) -> dict:
    record = self.digits[i]
    keep = np.random.default_rng((self.seed, i)).random(2) < KEEP_ATTRIBUTE
    weight = self.weight_words[i] if keep[0] else ""
    side = self.slant_words[i] if keep[1] else ""
    return {"image": record["image"], "label": record["label"], "prompt": caption(record["class_name"], weight, side)}

  def captions(self) -> list[str]:
    return [self[i]["prompt"] for i in range(len(self))]

  def __repr__(self) -> str:
    return f"MnistCaptionSource(split={self.split!r}, seed={self.seed})"
