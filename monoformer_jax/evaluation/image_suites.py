"""The image suites of `monoformer_jax.evaluate` (also used by `fid_samples`), on numpy images.

mnist  digit FID in the feature space of the project's MNIST classifier and the class accuracy
       of conditional samples (the embedded default).
fid    FID and Inception Score with the FID Inception-v3 (weights from a user's .pth) against
       reference statistics: an ADM-style .npz (`mu`/`sigma`, or uint8 images in `arr_0`) or a
       folder of images.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from monoformer_jax import paths
from monoformer_jax.data import mnist
from monoformer_jax.evaluation import digit_classifier as dc
from monoformer_jax.evaluation import fid, inception, inception_convert, sample_dirs


def load_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(images uint8 (N, H, W, C), labels int32 (N,) or None) from a samples .npz (`images` or
  `arr_0`, optional `labels`) or a `fid_samples` directory; errors name the file."""
  if epath.Path(path).is_dir():
    images, labels = sample_dirs.load_samples(path)
    return images, labels.astype(np.int32)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"no such samples file {path}")
  try:
    with paths.load_npz(path) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except  # zip / pickle errors of all kinds
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  images = arrays.get("images", arrays.get("arr_0"))
  if images is None:
    raise ValueError(f"{path}: no 'images' or 'arr_0' array (has {sorted(arrays)})")
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{path}: images must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
  labels = arrays.get("labels")
  if labels is None:
    return images, None
  labels = labels.reshape(-1)
  if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: 'labels' must be {len(images)} integers, got {labels.dtype} {labels.shape}")
  return images, labels.astype(np.int32)


def _check_digits(images: np.ndarray, name: str) -> None:
  if images.shape[1:] != (28, 28, 1):
    raise ValueError(f"{name}: the mnist suite needs 28x28 grayscale digits (N, 28, 28, 1), got {images.shape}")


def mnist_suite(
    images: np.ndarray, labels: np.ndarray | None, reference_path: str = "", cache_dir: str = "", name: str = "samples"
) -> dict:
  _check_digits(images, name)
  if reference_path:
    reference = load_images(reference_path)[0]
    _check_digits(reference, reference_path)
  else:
    reference = mnist.load_mnist5k()[0]
  classifier = dc.load_or_train(cache_dir or None)
  # FID from few samples is biased upwards; the same number of real digits calibrates it.
  real = reference[np.random.default_rng(0).permutation(len(reference))[: len(images)]]
  out = {
      "digit_fid": dc.digit_fid(images, reference, classifier),
      "digit_fid_real_same_size": dc.digit_fid(real, reference, classifier),
      "num_samples": int(len(images)),
      "num_reference": int(len(reference)),
      "classifier_heldout_accuracy": classifier.heldout_accuracy,
  }
  if labels is not None:
    predicted = classifier.classify(images)
    out["class_accuracy"] = float((predicted == labels).mean())
    out["class_accuracy_per_class"] = {
        str(c): float((predicted[labels == c] == c).mean()) for c in sorted(set(labels.tolist()))
    }
  return out


def as_rgb(images: np.ndarray) -> np.ndarray:
  """Grayscale (N, H, W, 1) as RGB, the way image folders are read (PIL convert('RGB'))."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def reference_statistics(reference: str, features_fn, batch_size: int = 100):
  """(mu, sigma, number of reference images, or None when stored `mu`/`sigma` were used)."""
  seen = [0]

  def counting_features(images):
    seen[0] += len(images)
    return features_fn(images)

  if epath.Path(reference).is_dir():
    mu, sigma = fid.statistics_from_folder(reference, counting_features, batch_size)
  elif not epath.Path(reference).is_file():
    raise FileNotFoundError(f"no such reference file or folder {reference}")
  else:
    try:
      mu, sigma = fid.load_reference_statistics(reference, counting_features, batch_size)
    except KeyError as e:  # a missing array: one message, not KeyError's quoted repr
      raise ValueError(e.args[0]) from None
    except (OSError, EOFError, ValueError) as e:
      if str(e).startswith(str(reference)):  # fid.py's own messages already name the file
        raise
      raise ValueError(f"{reference}: not a readable .npz ({type(e).__name__}: {e})") from None
  return mu, sigma, (seen[0] or None)


def inception_metrics(
    images: np.ndarray, features_fn, reference: str, *, batch_size: int = 100, splits: int = 10
) -> dict:
  """FID against `reference` and Inception Score of uint8 images, from `features_fn(images) ->
  {'pool': (N, D), 'logits': (N, classes)}` (an `inception.InceptionFeatures`)."""
  images = as_rgb(images)
  if len(images) < max(2, splits):
    raise ValueError(f"FID / IS need at least max(2, is_splits={splits}) samples, got {len(images)}")
  mu_ref, sigma_ref, num_reference = reference_statistics(reference, features_fn, batch_size)
  stats, logits = fid.RunningStatistics(), []
  for start in range(0, len(images), batch_size):
    out = features_fn(images[start : start + batch_size])
    dim = out["pool"].shape[-1]
    if mu_ref.shape != (dim,) or sigma_ref.shape != (dim, dim):
      raise ValueError(
          f"{reference}: statistics of shape {mu_ref.shape} / {sigma_ref.shape}, "
          f"but the Inception pool features have {dim} dimensions"
      )
    stats.update(out["pool"])
    logits.append(out["logits"])
  score, score_std = fid.inception_score(logits=np.concatenate(logits), splits=splits)
  out = {
      "fid": fid.frechet_distance(stats.mean, stats.covariance, mu_ref, sigma_ref),
      "inception_score": score,
      "inception_score_std": score_std,
      "num_samples": int(len(images)),
  }
  if num_reference is not None:
    out["num_reference"] = int(num_reference)
  return out


def fid_suite(images: np.ndarray, weights: str, reference: str, *, batch_size: int = 100, splits: int = 10) -> dict:
  """`inception_metrics` with the FID Inception read from a pytorch-fid .pth file."""
  if not epath.Path(weights).is_file():
    raise FileNotFoundError(f"no such Inception weights file {weights}")
  features = inception.InceptionFeatures(inception_convert.load_fid_inception(weights), batch_size=batch_size)
  return inception_metrics(images, features, reference, batch_size=batch_size, splits=splits)
