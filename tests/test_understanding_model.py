"""Input images (image understanding) in the model: where their tokens go, what sees what, and
that packing several samples and several images into a row changes nothing the mask forbids."""

import jax.numpy as jnp
import jax
import numpy as np
import pytest

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.sampling.decode import generate_tokens
from monoformer_jax.train.steps import batch_normalisers, make_loss_fn
from monoformer_jax.vision.encoders import patch_encoder, patch_features
from tests.helpers import random_params, tiny_config

INPUT_SHAPE = (4, 4, 3)  # patch 2: 4 tokens of 12 features per input image


def _config(**kw):
  return tiny_config(input_feature_dim=12, **kw)


def _batch(rows, seq_len=24, input_slots=2):
  """rows: per row, a list of samples (lists of pieces) -> encoded batch (input_features)."""
  shape = (4, 6, 3)
  batch = batch_lib.empty_batch(len(rows), seq_len, 1, shape, input_slots, INPUT_SHAPE)
  encoder = patch_encoder(INPUT_SHAPE, 2)
  for r, samples in enumerate(rows):
    builder = batch_lib.RowBuilder(batch, r, 6, False, input_tokens=encoder.tokens)
    for s in samples:
      builder.add(s)
  return encoder.encode_batch(batch)


def _logits(config, params, batch):
  return np.asarray(MonoFormer(config).apply({"params": params}, batch)["logits"])


def _sample(rng, config, n_before=3, n_after=4, images=1):
  pieces = [("text", rng.integers(3, config.vocab_size, n_before), False)]
  for _ in range(images):
    pieces.append(("input", rng.standard_normal(INPUT_SHAPE).astype(np.float32), None))
    pieces.append(("text", rng.integers(3, config.vocab_size, n_after), True))
  return pieces


def test_patch_features_flatten_each_patch_as_the_generated_images(rng):
  images = rng.standard_normal((2, 3, 4, 6, 5)).astype(np.float32)
  got = np.asarray(patch_features(jnp.asarray(images), 2))
  assert got.shape == (2, 3, 6, 20)
  # Patch (1, 2) of image [1, 2]: rows 2-3, columns 4-5, flattened (channel, row, column) as
  # x_embedder takes a generated image's patches (the official Conv2d's weight layout).
  np.testing.assert_array_equal(got[1, 2, 1 * 3 + 2], images[1, 2, 2:4, 4:6, :].transpose(2, 0, 1).reshape(-1))


def test_input_tokens_are_laid_out_and_only_the_answer_is_trained(rng):
  config = _config()
  batch = _batch([[_sample(rng, config)]])
  kinds = batch["kinds"][0]
  assert list(kinds[:11]) == [0, 0, 0, 3, 3, 3, 3, 0, 0, 0, 0]
  assert list(batch["patch_index"][0, 3:7]) == [0, 1, 2, 3]
  # Targets: the tokens after the image predict each other (the last untrained prompt token and
  # the image predict nothing).
  assert list(batch["loss_mask"][0, :11]) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
  assert batch["input_mask"][0].tolist() == [True, False]
  assert batch["input_features"].shape == (1, 2, 4, 12)


def test_im_embedder_exists_only_when_the_model_reads_images():
  with_inputs = _config()
  params = random_params(with_inputs)
  assert params["im_embedder_fc1"]["kernel"].shape == (12, with_inputs.hidden_size)
  assert params["im_embedder_fc2"]["kernel"].shape == (with_inputs.hidden_size, with_inputs.hidden_size)
  assert "im_embedder_fc1" not in random_params(tiny_config())


@pytest.mark.parametrize("bidirectional", [True, False])
def test_what_an_input_image_sees_and_what_sees_it(rng, seed, bidirectional):
  config = _config(bidirectional_input_image=bidirectional)
  params = random_params(config, seed)
  sample = _sample(rng, config, images=2)  # text(3) img(4) text(4) img(4) text(4)
  base = _logits(config, params, _batch([[sample]]))
  # Change the first image's last token only.
  changed = [list(p) for p in sample]
  img = changed[1][1].copy()
  img[2:4, 2:4] += 1.0  # the last 2x2 patch: token 3 of the image
  changed[1] = ("input", img, None)
  other = _logits(config, params, _batch([[changed]]))
  differs = np.abs(other[0] - base[0]).max(axis=-1) > 1e-4
  # Text before the image: untouched. The image's own tokens 0-2: touched only if bidirectional.
  # Everything after the changed token: touched.
  assert not differs[:3].any()
  assert differs[3:6].all() == bidirectional and differs[3:6].any() == bidirectional
  assert differs[6:].all()
  # Change the second image: the first image and the text between are untouched either way
  # (each image is its own block; a later image is never seen by earlier tokens).
  changed = [list(p) for p in sample]
  changed[3] = ("input", changed[3][1] + 1.0, None)
  other = _logits(config, params, _batch([[changed]]))
  differs = np.abs(other[0] - base[0]).max(axis=-1) > 1e-4
  assert not differs[:11].any() and differs[11:19].all()


def test_packed_rows_and_two_images_per_row_equal_their_parts(rng, seed):
  """Two samples packed in one row (the second's image in input slot 1) give each the logits
  it has alone; a sample's tokens never see the other's."""
  config = _config()
  params = random_params(config, seed)
  a, b = _sample(rng, config, 2, 3), _sample(rng, config, 4, 2, images=2)
  packed = _logits(config, params, _batch([[a, b]], seq_len=32, input_slots=3))
  alone_a = _logits(config, params, _batch([[a]], seq_len=32, input_slots=3))
  alone_b = _logits(config, params, _batch([[b]], seq_len=32, input_slots=3))
  len_a, len_b = 2 + 4 + 3, 4 + 4 + 2 + 4 + 2
  np.testing.assert_allclose(packed[0, :len_a], alone_a[0, :len_a], atol=2e-5, rtol=0)
  np.testing.assert_allclose(packed[0, len_a : len_a + len_b], alone_b[0, :len_b], atol=2e-5, rtol=0)


def test_input_features_of_the_wrong_width_are_named(rng):
  config = _config()
  params = random_params(config)
  batch = _batch([[_sample(rng, config)]])
  batch["input_features"] = batch["input_features"][..., :8]
  with pytest.raises(ValueError, match="input_features have width 8, model.input_feature_dim is 12"):
    MonoFormer(config).apply({"params": params}, batch)
  with pytest.raises(ValueError, match="model.input_feature_dim is 0"):
    MonoFormer(tiny_config()).apply({"params": random_params(tiny_config())}, _batch([[_sample(rng, config)]]))


def test_cached_answers_equal_a_full_recompute(rng, seed):
  """Greedy answers through the KV cache (decode.generate_tokens with the image in the prompt)
  equal token-by-token greedy decoding that recomputes the whole sequence each time."""
  config = _config(max_position_embeddings=64)
  params = random_params(config, seed, scale=1.0)
  encoder = patch_encoder(INPUT_SHAPE, 2)
  prompts = [
      [
          ("text", [1, 5], False),
          ("input", rng.standard_normal(INPUT_SHAPE).astype(np.float32), None),
          ("text", rng.integers(3, config.vocab_size, 3), False),
      ]
      for _ in range(3)
  ]
  length = 2 + encoder.tokens + 3
  batch = batch_lib.empty_batch(3, length, 1, (4, 6, 3), 1, INPUT_SHAPE)
  for r, pieces in enumerate(prompts):
    batch_lib.RowBuilder(batch, r, 6, False, encoder.tokens).add(pieces)
  features = encoder(batch["input_images"])
  inputs = {"kinds": batch["kinds"], "patch_index": batch["patch_index"], "input_features": features}
  new = 6
  cached = generate_tokens(params, config, batch["tokens"].tolist(), max_new_tokens=new, prompt_inputs=inputs)

  def grow(a, fill):
    return np.concatenate([a, np.full((3, new), fill, a.dtype)], axis=1)

  full = {k: grow(batch[k], 0) for k in ("tokens", "kinds", "patch_index")}
  full["segment_ids"] = grow(batch["segment_ids"], 1)
  full["positions"] = np.broadcast_to(np.arange(length + new, dtype=np.int32), (3, length + new)).copy()
  full["input_features"] = np.asarray(features)
  for k in range(new):
    logits = _logits(config, params, full)
    full["tokens"][:, length + k] = logits[:, length + k - 1].argmax(-1)
  np.testing.assert_array_equal(np.asarray(cached), full["tokens"][:, length:])


def test_understanding_loss_reads_the_image_trains_the_answer_only_and_diffuses_nothing(rng, seed):
  """The `understand` step's loss: it changes with the image and with the answer, not with the
  question (untrained); the image gets no diffusion loss (no gradient reaches the image-generation
  layers)."""
  config = _config()
  params = random_params(config, seed)
  loss_fn = make_loss_fn("understand", config, None, 1.0, 1.0)
  sample = _sample(rng, config, n_before=3, n_after=4)  # question (untrained) ... answer (trained)
  question = ("text", rng.integers(3, config.vocab_size, 3), False)
  sample = sample[:2] + [question] + sample[2:]

  def loss(pieces):
    batch = _batch([[pieces]], seq_len=24)
    value, aux = loss_fn(params, batch, jax.random.key(0), batch_normalisers(batch), np.arange(1))
    return float(value), aux, batch

  base, aux, batch = loss(sample)
  assert set(aux) == {"loss_understand", "answer_tokens"} and float(aux["answer_tokens"]) == 4
  other_image = list(sample)
  other_image[1] = ("input", sample[1][1] + 1.0, None)
  assert abs(loss(other_image)[0] - base) > 1e-4
  other_question = list(sample)
  other_question[2] = ("text", (question[1] + 1) % config.vocab_size, False)
  assert abs(loss(other_question)[0] - base) > 1e-4  # the answer reads the question...
  other_answer = list(sample)
  other_answer[3] = ("text", (sample[3][1] + 1) % config.vocab_size, True)
  assert abs(loss(other_answer)[0] - base) > 1e-4
  # ...but the question itself is never a target: only the answer's 4 tokens are (predicted from
  # the question's last token and the answer's first three).
  assert list(batch["loss_mask"][0, :14]) == [0] * 9 + [1, 1, 1, 1, 0]

  grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), batch_normalisers(batch), np.arange(1))[0])(params)
  for name in ("x_embedder", "final_layer", "t_embedder", "adaln_module"):
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads[name])), name
  assert np.any(np.asarray(grads["im_embedder_fc1"]["kernel"]))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_an_image_read_through_x_embedder_is_a_clean_generated_one(rng, seed, num_classes):
  """model.input_embedder='x_embedder': every logit of a row that reads an image equals the row
  where the same image is a generated one at t = 0 of the null class; another image changes
  the text after it, and the understanding loss trains x_embedder."""
  config = tiny_config(input_feature_dim=12, input_embedder="x_embedder", num_classes=num_classes)
  params = random_params(config, seed)
  shape = (4, 6, 3)  # the model's own images: 6 patches of 2x2x3
  image = rng.standard_normal(shape).astype(np.float32)
  before, after = rng.integers(3, config.vocab_size, 3), rng.integers(3, config.vocab_size, 5)

  def read(img):
    batch = batch_lib.empty_batch(1, 16, 1, shape, 1, shape)
    builder = batch_lib.RowBuilder(batch, 0, 6, False, input_tokens=6)
    builder.add([("text", before, False), ("input", img, None), ("text", after, True)])
    return patch_encoder(shape, 2).encode_batch(batch)

  generated = batch_lib.empty_batch(1, 16, 1, shape)
  batch_lib.RowBuilder(generated, 0, 6, False).add(
      [("text", before, False), ("image", image, None), ("text", after, True)]
  )
  generated["labels"][:] = num_classes  # the null class
  want = MonoFormer(config).apply({"params": params}, generated, generated["images"], np.zeros((1, 1), np.int32))
  got = _logits(config, params, read(image))
  np.testing.assert_allclose(got, np.asarray(want["logits"]), atol=2e-5, rtol=0)
  other = _logits(config, params, read(image + 1.0))
  assert np.abs(other[0, 9:14] - got[0, 9:14]).max() > 1e-3  # the text after the image reads it

  loss_fn = make_loss_fn("understand", config, None, 1.0, 1.0)
  batch = read(image)
  grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0), batch_normalisers(batch), np.arange(1))[0])(params)
  assert "im_embedder_fc1" not in params and np.any(np.asarray(grads["x_embedder"]["kernel"]))


def test_x_embedder_reading_takes_only_the_models_own_patches():
  with pytest.raises(ValueError, match="reads the model's own 2x2 patches \\(12 values\\), not features of width 8"):
    tiny_config(input_feature_dim=8, input_embedder="x_embedder")
  with pytest.raises(ValueError, match="needs t_embed='adaln_before_decoder'"):
    tiny_config(input_feature_dim=12, input_embedder="x_embedder", t_embed="add_before_image_tokens")
  with pytest.raises(ValueError, match="input_embedder='mlp' is not one of"):
    tiny_config(input_embedder="mlp")
  config = tiny_config(input_feature_dim=12, input_embedder="x_embedder")  # 6 patches an image
  batch = _batch([[_sample(np.random.default_rng(0), config)]])  # 4x4x3 inputs: 4 patches
  with pytest.raises(ValueError, match="own shape \\(6 patches\\), got 4 patches an image"):
    MonoFormer(config).apply({"params": random_params(config)}, batch)
