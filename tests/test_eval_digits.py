"""The digit classifier of the embedded default: accuracy, cache, FID in its feature space."""

import os
import time

import numpy as np
import pytest

from monoformer_jax.data import mnist
from monoformer_jax.evaluation import digit_classifier as dc
from tests.helpers import shared_digit_classifier

pytestmark = pytest.mark.slow  # trains a CNN once (~20-40 s on two cores)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  cache = shared_digit_classifier(tmp_path_factory)  # trained once per session, then loaded
  return dc.load_or_train(cache), cache


@pytest.fixture(scope="module")
def heldout():
  images, labels = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(images))
  return images[held], labels[held]


def test_accuracy_on_heldout_digits_and_cache(trained, heldout):
  classifier, cache = trained
  images, labels = heldout
  accuracy = dc.conditional_accuracy(images, labels, classifier)
  assert accuracy >= 0.97
  assert accuracy == pytest.approx(classifier.heldout_accuracy)
  assert dc.conditional_accuracy(images, (labels + 1) % 10, classifier) < 0.05
  # The second call loads the saved weights instead of training again.
  files = os.listdir(cache)
  assert files == [f"digit_classifier_v{dc.RECIPE_VERSION}_seed0.npz"]
  start = time.time()
  again = dc.load_or_train(cache)
  assert time.time() - start < 5
  np.testing.assert_array_equal(again.features(images[:37]), classifier.features(images[:37]))
  assert again.heldout_accuracy == classifier.heldout_accuracy


def test_digit_fid(trained, heldout, rng):
  classifier, _ = trained
  images, _ = heldout
  order = rng.permutation(len(images))
  a, b = images[order[:250]], images[order[250:]]
  assert abs(dc.digit_fid(images, images, classifier)) < 1e-3
  same_distribution = dc.digit_fid(a, b, classifier)
  noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
  blurred = ((a.astype(np.int32) + np.roll(a, 3, axis=2)) // 2).astype(np.uint8)
  # One CI run measured 24 for two halves of held-out data and 464 for uniform noise (19x).
  assert dc.digit_fid(noise, images, classifier) > 8 * same_distribution
  assert same_distribution < dc.digit_fid(blurred, b, classifier)
  features = classifier.features(a)
  assert features.shape == (250, dc.FEATURE_DIM) and features.std() > 0


def test_digit_scores_are_accuracy_per_class_and_fid(trained, heldout):
  classifier, _ = trained
  images, labels = heldout
  wrong = np.where(labels == 3, 5, np.where(labels == 5, 3, labels))  # threes and fives swapped
  scores = dc.digit_scores(images, wrong, images[:250], classifier)
  assert scores["accuracy"] == dc.conditional_accuracy(images, wrong, classifier)
  assert max(scores["per_class"][3], scores["per_class"][5]) < 0.1
  assert min(s for c, s in enumerate(scores["per_class"]) if c not in (3, 5)) >= 0.9
  assert scores["fid"] == dc.digit_fid(images, images[:250], classifier)


def test_inputs_are_checked(trained, tmp_path):
  classifier, _ = trained
  with pytest.raises(ValueError, match="uint8"):
    classifier.classify(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\)"):
    classifier.classify(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="3 samples but 2 labels"):
    dc.conditional_accuracy(np.zeros((3, 28, 28), np.uint8), [1, 2], classifier)
  path = str(tmp_path / "c.npz")
  classifier.save(path)
  with np.load(path) as f:
    np.savez(path, **{**dict(f), "__version__": dc.RECIPE_VERSION + 1})
  with pytest.raises(ValueError, match="recipe"):
    dc.DigitClassifier.load(path)
