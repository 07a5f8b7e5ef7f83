"""TFDS ArrayRecord latents: builder round trip through tfds.data_source, and train-time sampling."""

import glob
import os
import tempfile

import numpy as np
import pytest

from monoformer_jax.data import pipeline, tfds_latents
from monoformer_jax.data import tokenizer as tok_lib


def _arrays(rng, n, shape=(4, 4, 3), prompts=False):
  out = {
      "mean": rng.standard_normal((n, *shape)).astype(np.float32),
      "logvar": rng.uniform(-3, 0, (n, *shape)).astype(np.float32),
      "label": rng.integers(0, 5, n),
  }
  if prompts:
    out["prompt"] = [f"prompt número {i} {rng.integers(1000)}" for i in range(n)]
  return out


def test_latents_round_trip(tmp_path, rng):
  splits = {"train": _arrays(rng, 9, prompts=True), "validation": _arrays(rng, 3, prompts=True)}
  leftovers = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "tmp*tfds")))
  before = leftovers()
  tfds_latents.write_latents(str(tmp_path), splits)
  assert leftovers() <= before  # TFDS's bucket lookup leaves no empty temp directory behind
  for name, arrays in splits.items():
    src = tfds_latents.latent_source(str(tmp_path), name)
    assert len(src) == len(arrays["mean"])
    assert repr(src) == repr(tfds_latents.latent_source(str(tmp_path), name))
    seen = set()
    for i in range(len(src)):
      r = src[i]
      j = int(r["index"])
      seen.add(j)
      np.testing.assert_array_equal(r["mean"], arrays["mean"][j])
      np.testing.assert_array_equal(r["logvar"], arrays["logvar"][j])
      assert r["label"] == arrays["label"][j] and r["prompt"] == arrays["prompt"][j]
    assert seen == set(range(len(arrays["mean"])))
  with pytest.raises(FileExistsError, match="already there"):
    tfds_latents.write_latents(str(tmp_path), splits)
  with pytest.raises(FileNotFoundError, match="no monoformer_latents dataset"):
    tfds_latents.latent_source(str(tmp_path / "empty"))


def test_write_latents_checks_shapes(tmp_path, rng):
  bad = _arrays(rng, 4)
  bad["logvar"] = bad["logvar"][:, :2]
  with pytest.raises(ValueError, match="same \\(N, H, W, C\\) shape"):
    tfds_latents.write_latents(str(tmp_path), {"train": bad})


def test_sample_latent(rng):
  mean = rng.standard_normal((64, 64, 4)).astype(np.float32)
  rec = {"mean": mean, "logvar": np.full_like(mean, np.log(0.25))}
  z = pipeline.sample_latent(rec, rng, 0.5)
  assert z.dtype == np.float32
  np.testing.assert_allclose(((z / 0.5 - mean) / 0.5).std(), 1.0, atol=0.05)
  rec["logvar"] = np.full_like(mean, -60.0)  # no spread: exactly mean * scale
  # (the draw adds noise x exp(-30) ~ 1e-13: below float32 rounding of all but tiny means)
  np.testing.assert_allclose(pipeline.sample_latent(rec, rng, 0.18215), mean * 0.18215, rtol=1e-6, atol=1e-12)


def test_image_iterator_over_latents(tmp_path, rng, seed):
  arrays = _arrays(rng, 10)
  tfds_latents.write_latents(str(tmp_path), {"train": arrays})
  names = ["cat", "dog", "eel", "fox", "gnu"]
  tok = tok_lib.train_sentencepiece(
      [f"an image of {n}." for n in names] * 20 + ["please generate a photo"] * 20, 300, str(tmp_path / "tok")
  )
  src = tfds_latents.latent_source(str(tmp_path), "train", class_names=names)
  it = pipeline.make_image_iterator(
      src,
      tok,
      batch_size=4,
      patch_size=2,
      t_token=False,
      latent_scale=0.5,
      text_dropout=0.0,
      seed=seed,
      shard_index=0,
      shard_count=1,
  )
  b = next(it)
  assert b["images"].shape == (4, 1, 4, 4, 3) and b["image_mask"].all()
  for r in range(4):
    # The row's latent is a noisy draw around one stored mean; its label names that class.
    dist = [np.abs(b["images"][r, 0] / 0.5 - m).mean() for m in arrays["mean"]]
    j = int(np.argmin(dist))
    assert b["labels"][r, 0] == arrays["label"][j]
    text = tok.decode(b["tokens"][r][: list(b["tokens"][r]).index(tok.im_start_id)])
    assert names[arrays["label"][j]] in text
  # The noise is a function of (seed, position): a second pass draws the same, a new seed not.
  again = pipeline.make_image_iterator(
      src,
      tok,
      batch_size=4,
      patch_size=2,
      t_token=False,
      latent_scale=0.5,
      text_dropout=0.0,
      seed=seed,
      shard_index=0,
      shard_count=1,
  )
  np.testing.assert_array_equal(next(again)["images"], b["images"])
