"""FID and Inception Score from Inception features, in float64 NumPy.

Feature extraction is separate (`inception.InceptionFeatures`); everything here takes features,
logits, or a `features_fn(images uint8 NHWC) -> pool features (N, 2048)` callable, so it also serves
features computed elsewhere. Reference statistics come from
  * ADM reference-batch `.npz` files (the official guided-diffusion evaluation): `mu`/`sigma` when
    present, otherwise the images in `arr_0` are run through `features_fn`;
  * a folder of images (PNG/JPEG/..., read with PIL and converted to RGB);
  * any `.npz` written by `save_statistics` (same `mu`/`sigma` keys as ADM's).
"""

import os
from typing import Callable, Iterable

import numpy as np
import scipy.linalg
import scipy.special
from etils import epath
from PIL import Image

from monoformer_jax import paths

FeaturesFn = Callable[[np.ndarray], np.ndarray]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

  Numerical handling as in the standard FID code: if the square root of the product is not finite
  (a singular product, e.g. fewer samples than dimensions), eps is added to both diagonals and the
  root recomputed; a complex root whose diagonal has a non-negligible imaginary part is an error,
  otherwise only its real part is used.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not fit means of {mu1.size}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.abs(np.diagonal(covmean).imag).max()
    if imaginary > 1e-3:
      raise ValueError(f"matrix square root has a large imaginary component ({imaginary:.3g})")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def softmax(logits) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def inception_score(logits=None, probs=None, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal chunks of exp(E_x KL(p(y|x) || p(y))).

  Give either the Inception logits (N, classes; all 1008 of the FID graph, softmaxed here) or class
  probabilities. Chunks follow the input order, as in the original Inception Score code; N must be
  at least `splits`, and a trailing remainder (N mod splits samples) is left out.
  """
  if (logits is None) == (probs is None):
    raise ValueError("give exactly one of logits or probs")
  p = softmax(logits) if probs is None else np.asarray(probs, np.float64)
  if p.ndim != 2:
    raise ValueError(f"expected (N, classes), got shape {p.shape}")
  if not 1 <= splits <= len(p):
    raise ValueError(f"need 1 <= splits <= N, got splits={splits}, N={len(p)}")
  chunk = len(p) // splits
  scores = []
  for i in range(splits):
    part = p[i * chunk : (i + 1) * chunk]
    marginal = part.mean(axis=0, keepdims=True)
    # xlogy: classes with p = 0 contribute 0 (not nan) when probabilities are given directly.
    kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


class RunningStatistics:
  """Mean and covariance of features seen in batches, in float64, without keeping the features.

  Batches are merged with Chan et al.'s pairwise update (means and centred sums of squares), which
  avoids the cancellation of the naive sum-of-outer-products formula. `covariance` uses N - 1, like
  `np.cov(features, rowvar=False)` in the standard FID code.
  """

  def __init__(self, dim: int | None = None):
    self.count = 0
    self.dim = dim
    self._mean = None if dim is None else np.zeros(dim)
    self._m2 = None if dim is None else np.zeros((dim, dim))

  def update(self, features) -> "RunningStatistics":
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"expected features of shape (N, D), got {x.shape}")
    if self.dim is None:
      self.dim, self._mean, self._m2 = x.shape[1], np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
    if x.shape[1] != self.dim:
      raise ValueError(f"feature dimension {x.shape[1]} != {self.dim} seen before")
    n = len(x)
    if n == 0:
      return self
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    batch_m2 = centred.T @ centred
    total = self.count + n
    delta = batch_mean - self._mean
    self._m2 = self._m2 + batch_m2 + np.outer(delta, delta) * (self.count * n / total)
    self._mean = self._mean + delta * (n / total)
    self.count = total
    return self

  @property
  def mean(self) -> np.ndarray:
    if not self.count:
      raise ValueError("no features seen")
    return self._mean.copy()

  @property
  def covariance(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
    return self._m2 / (self.count - 1)


def _pool(output) -> np.ndarray:
  # Accept either a features array or InceptionFeatures' {'pool', 'logits'} dict.
  return np.asarray(output["pool"] if isinstance(output, dict) else output)


def statistics_from_batches(batches: Iterable[np.ndarray], features_fn: FeaturesFn):
  """(mu, sigma) of features_fn over an iterable of uint8 NHWC image batches."""
  stats = RunningStatistics()
  for images in batches:
    stats.update(_pool(features_fn(images)))
  return stats.mean, stats.covariance


def statistics_from_images(images: np.ndarray, features_fn: FeaturesFn, batch_size: int = 500):
  images = np.asarray(images)
  return statistics_from_batches((images[i : i + batch_size] for i in range(0, len(images), batch_size)), features_fn)


def load_reference_statistics(path: str, features_fn: FeaturesFn | None = None, batch_size: int = 500):
  """(mu, sigma) from an ADM reference batch or a saved-statistics `.npz`.

  Uses the stored `mu`/`sigma` when the file has them (beware: ADM's were computed with TensorFlow's
  Inception graph, which pytorch-fid's port approximates closely but not bit for bit). Otherwise
  computes them from the uint8 images in `arr_0`, which needs `features_fn`.
  """
  with paths.load_npz(path) as data:
    if "mu" in data and "sigma" in data:
      return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if "arr_0" not in data:
      raise KeyError(f"{path}: no 'mu'/'sigma' and no 'arr_0' images (keys: {sorted(data)})")
    if features_fn is None:
      raise ValueError(f"{path} holds images only ('arr_0'); pass features_fn to compute statistics")
    images = data["arr_0"]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{path}: 'arr_0' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
  return statistics_from_images(images, features_fn, batch_size)


def save_statistics(path: str, mu, sigma) -> None:
  """Writes `mu`/`sigma` under ADM's key names, so `load_reference_statistics` reads them back."""
  paths.save_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def image_files(folder: str) -> list[str]:
  names = sorted(p.name for p in epath.Path(folder).iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
  return [os.path.join(folder, n) for n in names]


def _folder_batches(files: list[str], batch_size: int):
  """Yields uint8 batches of at most batch_size; a change of image size starts a new batch."""
  batch = []
  for name in files:
    with epath.Path(name).open("rb") as f, Image.open(f) as img:
      array = np.asarray(img.convert("RGB"), np.uint8)
    if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
      yield np.stack(batch)
      batch = []
    batch.append(array)
  if batch:
    yield np.stack(batch)


def statistics_from_folder(folder: str, features_fn: FeaturesFn, batch_size: int = 50):
  """(mu, sigma) of the images in a folder (sorted by name, not recursive)."""
  return statistics_from_batches(_folder_batches(image_files(folder), batch_size), features_fn)


def fid_from_features(features1, features2, eps: float = 1e-6) -> float:
  """FID between two feature sets (N1, D), (N2, D)."""
  s1 = RunningStatistics().update(features1)
  s2 = RunningStatistics().update(features2)
  return frechet_distance(s1.mean, s1.covariance, s2.mean, s2.covariance, eps)
