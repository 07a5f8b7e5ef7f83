"""A small MNIST digit classifier: the quality benchmark of the embedded default.

Trained in the project on the train split of MNIST-5k (`data.mnist.split_indices`), it plays the
part that Inception plays for ImageNet:
  * `digit_fid(samples, reference)`: Frechet distance between Gaussian fits of its penultimate
    features (128-d) of generated and real digits;
  * `conditional_accuracy(samples, labels)`: how often class-conditional samples are recognised as
    the class they were asked for.
The weights are cached as an .npz (parameters plus held-out accuracy) keyed by recipe version and
seed, so a run trains it once (about 20 s on two CPU cores).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from etils import epath

from monoformer_jax import paths
from monoformer_jax.data import augment, mnist
from monoformer_jax.evaluation.fid import frechet_distance

RECIPE_VERSION = 1  # bump when the architecture or training recipe changes (invalidates caches)
FEATURE_DIM = 128


class DigitCNN(nn.Module):
  """conv 3x3 (16) - pool - conv 3x3 (32) - pool - dense 128 (features) - dense 10."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name="out")(features), features


def _as_input(images) -> np.ndarray:
  """uint8 (N, 28, 28[, 1]) -> float32 (N, 28, 28, 1) in [0, 1]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"digit images must be uint8 in [0, 255], got {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (28, 28, 1):
    raise ValueError(f"digit images must have shape (N, 28, 28, 1), got {images.shape}")
  return images.astype(np.float32) / 255.0


@jax.jit
def _forward(params, x):
  return DigitCNN().apply({"params": params}, x)


class DigitClassifier:
  """Inference wrapper around trained DigitCNN parameters (host NumPy in, NumPy out)."""

  def __init__(self, params, heldout_accuracy: float = float("nan")):
    self.params = params
    self.heldout_accuracy = heldout_accuracy

  def _run(self, images, batch_size: int = 500):
    x = _as_input(images)
    logits, features = [], []
    for i in range(0, len(x), batch_size):
      chunk = x[i : i + batch_size]
      pad = batch_size - len(chunk) if len(x) > batch_size else 0  # one shape for full batches
      out = _forward(self.params, np.concatenate([chunk, np.zeros((pad, 28, 28, 1), np.float32)]))
      logits.append(np.asarray(out[0])[: len(chunk)])
      features.append(np.asarray(out[1])[: len(chunk)])
    if not logits:
      return np.zeros((0, 10), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(logits), np.concatenate(features)

  def logits(self, images) -> np.ndarray:
    return self._run(images)[0]

  def classify(self, images) -> np.ndarray:
    """Predicted digit per image, int32 (N,)."""
    return self.logits(images).argmax(-1).astype(np.int32)

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features, float32 (N, 128)."""
    return self._run(images)[1]

  def save(self, path: str) -> None:
    flat = {
        "/".join(k.key for k in keys): np.asarray(v) for keys, v in jax.tree_util.tree_flatten_with_path(self.params)[0]
    }
    # Atomic: a concurrent reader sees the old file or the whole new one.
    paths.save_npz(path, __version__=RECIPE_VERSION, __heldout_accuracy__=self.heldout_accuracy, **flat)

  @classmethod
  def load(cls, path: str) -> "DigitClassifier":
    with paths.load_npz(path) as f:
      if int(f["__version__"]) != RECIPE_VERSION:
        raise ValueError(f"{path}: classifier recipe v{int(f['__version__'])}, expected v{RECIPE_VERSION}")
      params: dict = {}
      for key in f.files:
        if key.startswith("__"):
          continue
        node = params
        *parents, leaf = key.split("/")
        for p in parents:
          node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(f[key])
      return cls(params, float(f["__heldout_accuracy__"]))


def _shift(batch: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
  """Random translations of up to max_shift pixels (4,500 digits are few; this helps held-out)."""
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, len(batch)))
  return augment.translate(batch, max_shift - dy, max_shift - dx, max_shift)


def _train_step(optimizer):
  """The compiled step (params, opt_state, x, y) -> (params, opt_state, loss) of `optimizer`."""

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = DigitCNN().apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train_digit_classifier(
    seed: int = 0, epochs: int = 10, batch_size: int = 64, learning_rate: float = 3e-3, verbose: bool = False
):
  """Trains on the MNIST-5k train split; returns (DigitClassifier, info dict)."""
  start = time.time()
  images, labels = mnist.load_mnist5k()
  train_idx, held_idx = mnist.split_indices(len(images))
  x_train, y_train = _as_input(images[train_idx]), np.asarray(labels[train_idx])
  params = DigitCNN().init(jax.random.key(seed), x_train[:1])["params"]
  steps_per_epoch = len(x_train) // batch_size
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
  opt_state = optimizer.init(params)

  step = _train_step(optimizer)
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(x_train))
    for s in range(steps_per_epoch):  # the ragged tail is dropped: one compiled shape
      idx = order[s * batch_size : (s + 1) * batch_size]
      params, opt_state, loss = step(params, opt_state, _shift(x_train[idx], rng), y_train[idx])
    if verbose:
      print(f"digit classifier epoch {epoch + 1}/{epochs}: loss {float(loss):.4f}", flush=True)
  classifier = DigitClassifier(jax.device_get(params))
  accuracy = float((classifier.classify(images[held_idx]) == labels[held_idx]).mean())
  classifier.heldout_accuracy = accuracy
  return classifier, {
      "heldout_accuracy": accuracy,
      "train_seconds": time.time() - start,
      "num_train": len(train_idx),
      "num_heldout": len(held_idx),
  }


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "monoformer_jax")


def load_or_train(cache_dir: Optional[str] = None, seed: int = 0) -> DigitClassifier:
  """The cached classifier for (recipe, seed), trained and saved on first use."""
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"digit_classifier_v{RECIPE_VERSION}_seed{seed}.npz")
  if epath.Path(path).exists():
    try:
      return DigitClassifier.load(path)
    except (OSError, ValueError, KeyError) as e:  # a truncated or stale file: retrain over it
      print(f"retraining the digit classifier: cannot use {path} ({e})", flush=True)
  classifier, _ = train_digit_classifier(seed)
  epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
  classifier.save(path)
  return classifier


def _stats(features: np.ndarray):
  features = np.asarray(features, np.float64)
  if len(features) < 2:
    raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
  return features.mean(0), np.cov(features, rowvar=False)


def digit_fid(samples, reference_images, classifier: Optional[DigitClassifier] = None) -> float:
  """Frechet distance between the classifier features of `samples` and `reference_images`.

  Both uint8 (N, 28, 28, 1). With fewer images than feature dimensions (128) the covariances are
  singular and the distance is biased upwards; compare runs at equal sample counts.
  """
  classifier = classifier or load_or_train()
  stats = _stats(classifier.features(samples)) + _stats(classifier.features(reference_images))
  with warnings.catch_warnings():
    # ReLU units that never fire on digits make both covariances singular; sqrtm warns about
    # that, but the distance restricted to the live units is still exact.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return frechet_distance(*stats)


def conditional_accuracy(samples, labels, classifier: Optional[DigitClassifier] = None) -> float:
  """Fraction of samples that the classifier recognises as their conditioning label."""
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(samples):
    raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
  classifier = classifier or load_or_train()
  return float((classifier.classify(samples) == labels).mean())


def digit_scores(samples, labels, reference_images, classifier: DigitClassifier) -> dict:
  """What the benchmarks report of class-conditional digits (uint8 (N, 28, 28, 1), asked for
  `labels`): the fraction recognised as asked, the same per class (0-9), and the digit-FID
  against `reference_images`."""
  labels = np.asarray(labels).reshape(-1)
  predicted = classifier.classify(samples)
  return {
      "accuracy": float((predicted == labels).mean()),
      "per_class": [float((predicted[labels == c] == c).mean()) for c in range(10)],
      "fid": float(digit_fid(samples, reference_images, classifier)),
  }
