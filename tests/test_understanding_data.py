"""The images the `understand` steps read: as stored, or moved by a few pixels at random
(`data.understand_max_shift`), the answer unchanged."""

import numpy as np
import pytest

from configs import mnist_tiny
from monoformer_jax.data import pipeline
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.data.understanding import make_understanding_iterator
from monoformer_jax.run import config as config_lib

NAMES = ["zero", "one", "two", "three", "four", "five"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [f"record {i} of {i * 7}: which digit is this?" for i in range(300)] + NAMES
  return tok_lib.train_sentencepiece(texts, 300, str(tmp_path_factory.mktemp("tok")))


class _Digits:
  """Six random 12x10 one-channel images, labels 0..5."""

  skip_bad_records = False

  def __init__(self, seed):
    self.images = np.random.default_rng(seed).integers(0, 256, size=(6, 12, 10, 1), dtype=np.uint8)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": i, "index": i}

  def __repr__(self):
    return "_Digits()"


def _read(tok, source, max_shift, epochs=3):
  it = make_understanding_iterator(
      source,
      tok,
      batch_size=2,
      input_shape=(12, 10, 1),
      input_tokens=4,
      class_names=NAMES,
      max_shift=max_shift,
      num_epochs=epochs,
      shuffle=False,
      shard_index=0,
      shard_count=1,
  )
  return list(it)


def _shift_of(read, stored, max_shift):
  """The (dy, dx) that moves `stored` to `read` with the edge value filling in, or None."""
  m = max_shift
  padded = np.pad(stored, ((m, m), (m, m), (0, 0)), mode="edge")
  h, w = stored.shape[:2]
  for dy in range(-m, m + 1):
    for dx in range(-m, m + 1):
      if np.array_equal(read, padded[m - dy : m - dy + h, m - dx : m - dx + w]):
        return dy, dx
  return None


def test_read_images_are_stored_ones_moved_by_at_most_max_shift(tok, seed):
  source = _Digits(seed)
  stored = [pipeline.image_to_float(source[i]["image"]) for i in range(len(source))]
  plain = _read(tok, source, 0, epochs=1)
  shifted = _read(tok, source, 2)
  assert len(shifted) == 9  # 3 epochs of 6 records, 2 a row
  # Unshuffled: row r of batch b reads record (2 b + r) mod 6.
  for b, batch in enumerate(plain):  # no shift: the stored image itself
    for r, row in enumerate(batch["input_images"][:, 0]):
      np.testing.assert_array_equal(row, stored[2 * b + r])
  shifts = []
  for b, batch in enumerate(shifted):
    np.testing.assert_array_equal(batch["tokens"], plain[b % 3]["tokens"])  # the same answers
    for r, row in enumerate(batch["input_images"][:, 0]):
      shifts.append(_shift_of(row, stored[(2 * b + r) % 6], 2))
  assert None not in shifts  # every read image is a stored one moved by at most 2 pixels
  # 18 independent draws of 25 shifts (13 distinct expected): more than 4 at (0, 0), or fewer
  # than 6 distinct, has a chance below 1e-3.
  assert sum(s == (0, 0) for s in shifts) <= 4 and len(set(shifts)) >= 6, shifts
  per_record = [shifts[i::6] for i in range(6)]
  assert any(len(set(v)) > 1 for v in per_record)  # drawn afresh each epoch


def test_a_shift_as_large_as_the_image_is_named(tok, seed):
  with pytest.raises(ValueError, match="max_shift 10 is not in 0..9"):
    _read(tok, _Digits(seed), 10)
  c = mnist_tiny.get_config("all_in_one,test")
  c.data.understand_max_shift = 28
  with pytest.raises(config_lib.ConfigError, match=r"data.understand_max_shift.*28 is not in 0..27"):
    config_lib.validate_config(c, ["diffusion", "ar", "understand"], num_devices=1)
