"""The trained weights shipped in the package (`pretrained:NAME`) open by name and meet their bar:
digits the project's classifier recognises, and for all_in_one held-out digits read right."""

import json
import pathlib

import numpy as np
import pytest

from monoformer_jax.data import mnist
from monoformer_jax.evaluation import digit_classifier
from monoformer_jax.inference import InferenceModel
from monoformer_jax.run import images as images_lib
from monoformer_jax.run import open as open_lib
from monoformer_jax.sampling.describe import answer_names
from tests.helpers import shared_digit_classifier

NAMES = ("mnist_tiny", "all_in_one")
# The bars of a few digits (the cards' figures, measured on hundreds, are higher; 20 digits at
# ~98% miss three or more once in ~1,000 seeds, and the seed is fixed).
DIGITS_BAR = 0.9
READING_BAR = 0.9


def _open(name) -> InferenceModel:
  try:
    return InferenceModel.from_workdir(f"pretrained:{name}")
  except Exception as e:  # pylint: disable=broad-except  # any failure to load is this message
    pytest.fail(
        f"pretrained:{name} no longer opens ({type(e).__name__}: {e}); remake it with "
        f"`python benchmarks/make_pretrained.py --name {name}`"
    )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  return digit_classifier.load_or_train(shared_digit_classifier(tmp_path_factory))


def test_the_names_and_their_cards():
  assert set(NAMES) <= set(open_lib.pretrained_names())
  for name in NAMES:
    folder = pathlib.Path(open_lib.PRETRAINED_DIR / name)
    card = json.loads((folder / "CARD.json").read_text())
    assert card["name"] == name and card["command"].startswith("python -m monoformer_jax.main --config=configs/")
    assert card["quality"]["digits_recognised"] >= 0.93 and card["code"]
    # Weights only: the folder is the weights, the tokenizer and a few KB.
    weights = (folder / "weights.safetensors").stat().st_size
    others = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "weights.safetensors")
    assert weights < 8_000_000 and others < 400_000, (weights, others)
  assert (
      json.loads((open_lib.PRETRAINED_DIR / "all_in_one" / "CARD.json").read_text())["quality"]["reading_accuracy"]
      >= 0.95
  )


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_draw_digits_the_classifier_recognises(name, classifier):
  model = _open(name)
  images, labels = model.sample_classes(list(range(10)), 2)  # the run's own sampler and guidance
  digits = images_lib.to_uint8(model.decode(images))
  accuracy = float((classifier.classify(digits) == labels).mean())
  assert accuracy >= DIGITS_BAR, accuracy


def test_all_in_one_reads_held_out_digits():
  model = _open("all_in_one")
  images, labels = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(images))
  pick = np.concatenate([held[labels[held] == c][:2] for c in range(10)])
  answers = model.describe(images[pick], "Which digit is this?")
  named = np.asarray(answer_names(answers, list(mnist.CLASS_NAMES)))
  assert float((named == labels[pick]).mean()) >= READING_BAR, list(zip(answers, labels[pick]))
