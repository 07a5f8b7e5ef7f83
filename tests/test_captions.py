"""Captioned MNIST (issue 20, part 3): the attribute measures, the captions they give the digits,
the caption path through the pipeline and a training run, and the pair measurement."""

import json

import numpy as np
import pytest

from benchmarks import caption_following
from monoformer_jax.data import captions, mnist, pipeline
from monoformer_jax.data import sequences as seq
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.inference.api import InferenceModel
from tests.helpers import run_module, session_shared


def _bar(width: int, lean: float) -> np.ndarray:
  """A vertical stroke `width` pixels wide through the centre, shifted `lean` pixels right per
  row upwards, as uint8 (28, 28, 1)."""
  image = np.zeros((28, 28, 1), np.uint8)
  for row in range(4, 24):
    centre = 14 + lean * (14 - row)
    lo = int(round(centre - width / 2))
    image[row, max(lo, 0) : max(lo + width, 0), 0] = 255
  return image


def test_ink_mass_and_slant_measure_what_they_name():
  thin, bold = _bar(2, 0.0), _bar(5, 0.0)
  right, left = _bar(3, 0.4), _bar(3, -0.4)
  mass = captions.ink_mass(np.stack([thin, bold]))
  assert mass[1] == pytest.approx(mass[0] * 5 / 2)
  lean = captions.slant(np.stack([right, left, _bar(3, 0.0)]))
  assert lean[0] == pytest.approx(0.4, abs=0.05) and lean[1] == pytest.approx(-0.4, abs=0.05)
  assert abs(lean[2]) < 0.05
  # Float images in [0, 1] measure as their uint8 originals.
  np.testing.assert_allclose(captions.slant(np.stack([right]) / 255.0), lean[:1], rtol=1e-12)
  with pytest.raises(ValueError, match=r"expected images \(N, H, W\)"):
    captions.ink_mass(np.zeros((2, 28, 28, 3, 1)))


def test_captions_split_each_class_into_thirds_by_its_own_measures():
  source = captions.MnistCaptionSource("train")
  images = np.stack([source.digits[i]["image"] for i in range(len(source))])
  labels = np.asarray([source.digits[i]["label"] for i in range(len(source))])
  weight, side = np.asarray(source.weight_words), np.asarray(source.slant_words)
  mass, lean = captions.ink_mass(images), captions.slant(images)
  for c in range(10):
    mine = labels == c
    assert abs((weight[mine] == "thin").mean() - 1 / 3) < 0.01 and abs((weight[mine] == "bold").mean() - 1 / 3) < 0.01
    assert mass[mine & (weight == "thin")].max() < mass[mine & (weight == "bold")].min()
  assert (
      lean[side == "leaning left"].max()
      < lean[side == ""].min()
      <= lean[side == ""].max()
      < lean[side == "leaning right"].min()
  )
  # Records: the class always, each attribute the digit has kept ~3/4 of the time, never one it lacks.
  prompts = source.captions()
  assert prompts == captions.MnistCaptionSource("train").captions()  # a pure function of the index
  for i in range(0, len(source), 97):
    words = prompts[i][:-1].split(" ")
    assert mnist.CLASS_NAMES[labels[i]] in words and prompts[i].endswith(".")
    assert ("thin" in words or "bold" in words) <= bool(weight[i]) and ("leaning" in words) <= bool(side[i])
  kept = np.mean([w in p for w, p in zip(weight, prompts) if w])
  assert 0.7 < kept < 0.8
  # Held-out digits are described on the training digits' scale.
  held = captions.MnistCaptionSource("holdout")
  np.testing.assert_array_equal(held.thresholds.weight, source.thresholds.weight)


def test_caption_records_become_prompts_of_the_t2i_prefix(tmp_path):
  source = captions.MnistCaptionSource("holdout")
  texts = [seq.T2I_PREFIX + c for c in source.captions()]
  tok = tok_lib.train_sentencepiece(texts, 300, str(tmp_path))
  it = pipeline.make_image_iterator(
      source, tok, batch_size=8, patch_size=7, t_token=False, text_dropout=0.0, num_epochs=1, max_prompt_tokens=40
  )
  batch = next(iter(it))
  rows = []
  for r in range(8):
    tokens = list(batch["tokens"][r])
    rows.append(tok.decode(tokens[1 : tokens.index(tok.im_start_id)]))
  assert set(rows) <= set(texts) and len(set(rows)) > 1


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
  return session_shared(
      tmp_path_factory,
      "caption_run",
      lambda work: run_module(
          "-m", "monoformer_jax.main", "--config=configs/mnist_tiny.py:captions,test", f"--workdir={work}"
      ),
  )


def test_a_caption_run_trains_and_its_pairs_share_their_noise(caption_run):
  config = json.loads((caption_run / "config.json").read_text())
  assert config["data"]["image_source"] == "mnist_captions"
  model = InferenceModel.from_workdir(str(caption_run))
  prompts = [captions.prompt("seven", weight="thin"), captions.prompt("two", side="leaning left")]
  first = caption_following.draw(model, prompts, seed=3)
  again = caption_following.draw(model, prompts, seed=3)
  np.testing.assert_array_equal(first, again)
  other = caption_following.draw(model, [captions.prompt("seven", weight="bold"), prompts[1]], seed=3)
  np.testing.assert_array_equal(other[1], first[1])  # pair member i's noise is i's, whatever else
  assert np.abs(other[0].astype(int) - first[0]).max() > 0  # the words reach the image

  class ReadsAll:  # stands in for the digit classifier: every sample read as its class

    def classify(self, images):
      return np.repeat(np.arange(10), len(images) // 10)

  report = caption_following.follow(model, per_class=1, seed=0, classifier=ReadsAll())
  for attribute in ("weight", "slant"):
    assert report[attribute]["pairs"] == 10 and 0 <= report[attribute]["pairs_following"] <= 1
    assert np.isfinite(report[attribute]["mean_difference"]) and report[attribute]["training_tercile_gap"] > 0
  assert report["class_accuracy"] == 1.0
