"""Several images in one sequence, in and out: each image its own bidirectional block and its own
noise level; a row of several images equals, image by image, the rows the mask says it must;
packing changes no loss; one sampling call writes text, an image, text about it, another image,
and the KV cache equals the full recompute throughout."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import batch as batch_lib
from monoformer_jax import diffusion
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.data import interleaved as interleaved_data
from monoformer_jax.data import sequences as seq
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.run import config as config_lib
from monoformer_jax.run import sharding
from monoformer_jax.train import data_streams, steps
from monoformer_jax.sampling import decode, init_cache, run_interleaved, span_length
from monoformer_jax.sampling import image as image_lib
from monoformer_jax.sampling import interleaved as interleaved_lib
from monoformer_jax.vision.encoders import patch_encoder
from tests.helpers import random_params, tiny_config

IMS, IME = 95, 96  # stand-ins for <|im_start|>, <|im_end|> in the 97-token tiny vocabulary
SHAPE = (4, 6, 3)  # the tiny config's image (6 patches of 2x2)
INPUT_SHAPE, INPUT_TOKENS = (4, 4, 3), 4  # an image the model reads: 4 patch tokens of 12 features


@pytest.fixture(scope="module")
def models(module_seed):
  """models(t_embed): a random tiny model of that variant that also reads images (read-only)."""

  @functools.lru_cache(maxsize=None)
  def get(t_embed: str):
    config = tiny_config(t_embed=t_embed, num_classes=3, input_feature_dim=12)
    return config, random_params(config, seed=module_seed(f"params {t_embed}"), scale=0.5)

  return get


@pytest.fixture(params=["adaln_before_decoder", "add_before_image_tokens"])
def model(request, models):
  return models(request.param)


# ----------------------------------------------------------------------------------------------
# Generation: text, an image, text about it, another image, in one call.


def _trigger_params(params, triggers, gain: float = 6.0, peak: float = 20.0, spread: float = 0.3):
  """Params whose greedy text picks <|im_start|> right after any token of `triggers`, never
  elsewhere (the one-image tests' trigger, tests/test_inference_image.py, for several tokens).

  Hidden unit 0 of every token embedding is -gain, +gain for a trigger: after the final norm its
  sign says whether a trigger was fed. The head reads unit 0 as +w for <|im_start|> and -w for
  every other token, a shift shared by them all (their order is the rest of the head's, scaled
  by `peak` against near-ties); tokens 0, 1 and <|im_end|> get no shift, so they are never chosen
  unless <|im_start|> is masked. The other units are scaled to an RMS of `spread * gain`: beside a
  unit 0 that alone carries the norm, every token looks alike and the text is one token repeated.
  """
  p = jax.tree.map(np.array, params)
  emb, head = p["embed_tokens"]["embedding"], p["lm_head"]["kernel"]
  emb[:, 1:] *= spread * gain / np.sqrt(np.mean(emb[:, 1:] ** 2))
  emb[:, 0] = -gain
  emb[list(triggers), 0] = gain
  head *= peak
  w = 4.0 * np.abs(head[1:]).sum(axis=0).max()
  head[0, :] = -w
  head[:, IMS] = 0.0
  head[0, IMS] = w
  head[0, [0, 1, IME]] = 0.0
  p["norm"]["scale"][0] = 1.0
  return p


def _fresh_token(tokens, start, seen):
  """Index of the first token at or after `start` that is not in `seen` nor before it (a token
  that, made a trigger, changes nothing before it), or None."""
  for i in range(start, len(tokens)):
    if tokens[i] not in set(seen) | set(tokens[:i]) | {0, 1, IMS, IME}:
      return i
  return None


def _find_triggers(base, config, objective, prompts, kw):
  """Adds triggers one by one (a token of row 0's text not seen before it: making it a trigger
  changes nothing before it), each at least 2 text tokens after the last image (or the
  prompt), until row 0 opens kw['max_images'] images or no token is new; returns the triggers
  and where row 0's <|im_start|> tokens are."""
  triggers = []
  while True:
    tokens = interleaved_lib.generate_interleaved(_trigger_params(base, triggers), config, objective, prompts, **kw)
    tokens = tokens[0]["tokens"]
    opened = [i for i, t in enumerate(tokens) if t == IMS]
    k = _fresh_token(tokens, opened[-1] + 3 if opened else 1, prompts[0])
    if len(opened) == kw["max_images"] or k is None:
      return triggers, opened
    triggers.append(tokens[k])


def _document(items, images, null):
  """RowBuilder pieces of a fed sequence: token ids, and ("read", image) where the prompt reads
  an image; each <|im_start|> that does not open a read image is followed by its clean image."""
  pieces, text, k = [], [], 0
  for i, item in enumerate(items):
    if isinstance(item, tuple):
      pieces += [("text", text, True), ("input", item[1], None)]
      text = []
      continue
    text.append(item)
    reads_next = i + 1 < len(items) and isinstance(items[i + 1], tuple)
    if item == IMS and not reads_next and k < len(images):
      pieces += [("text", text, True), ("image", images[k], null)]
      text, k = [], k + 1
  return [p for p in pieces + [("text", text, True)] if p[0] != "text" or p[1]]


def _length(pieces, config):
  sizes = {"image": span_length(config), "input": INPUT_TOKENS}
  return sum(len(v) if k == "text" else sizes[k] for k, v, _ in pieces)


def _full_recompute_images(params, config, objective, prefixes, slots, sample_ids, rng, scale, num_steps):
  """The official way for image k of a row: at every step the whole sequence, the earlier
  images clean (t = 0) in their slots, the drawn one at x_t in slot k; CFG against the whole
  `<s><|im_start|>` + span, recomputed too."""
  batch = _batch(config, [[p] for p in prefixes], max(_length(p, config) for p in prefixes), max(slots) + 1)
  uncond = jax.tree.map(
      jnp.asarray,
      image_lib.full_sequence_batch(config, [[1, IMS]] * len(prefixes), [config.num_classes] * len(prefixes)),
  )
  rows, slots = jnp.arange(len(prefixes)), jnp.asarray(slots)
  model = MonoFormer(config)

  def cond_fn(x, t):
    images = batch["images"].at[rows, slots].set(x)
    times = jnp.zeros(batch["image_mask"].shape).at[rows, slots].set(t)
    return model.apply({"params": params}, batch, images, times, return_logits=False)["image"][rows, slots]

  def uncond_fn(x, t):
    return model.apply({"params": params}, uncond, x[:, None], t[:, None], return_logits=False)["image"][:, 0]

  denoise = diffusion.guided_denoise_fn(cond_fn, uncond_fn, scale, "eps", config.learn_sigma)
  run = jax.jit(
      lambda r: image_lib.run_sampler(
          objective, denoise, r, jnp.asarray(sample_ids, jnp.int32), SHAPE, ImageSampling(num_steps=num_steps)
      )
  )
  return np.asarray(run(rng))


def test_one_call_writes_text_an_image_text_about_it_and_another_image(models, rng):
  """Row 0 reads an image in its prompt, then writes text until the model opens an image after
  a trigger token, text about it, a second image after a second trigger, more text; row 1 opens
  an image at once. Every image is the full recompute's (the read image and the earlier images,
  clean, in the sequence), the cache holds the full recompute's keys/values, and every token
  chosen is the full recompute's greedy choice."""
  config, base = models("add_before_image_tokens")
  key = jax.random.key(int(rng.integers(1 << 30)))
  objective = diffusion.make_objective("gaussian")
  m, span, max_images = 14, span_length(config), 2
  kw = dict(
      image_token=IMS,
      end_token=IME,
      uncond_prompt=[1, IMS],
      max_new_tokens=m,
      max_images=max_images,
      options=ImageSampling(guidance_scale=2.0, num_steps=3),
      rng=key,
  )
  # Triggers found one by one: a new token of the plain text, then one after the first image
  # (tiny random models repeat themselves: a few prompts may be needed).
  for _ in range(8):
    read = rng.standard_normal(INPUT_SHAPE).astype(np.float32)
    prompt_pieces = [
        [("text", [1, IMS], False), ("input", read, None), ("text", [IME, *rng.integers(3, 90, 3)], False)],
        [("text", [1, *rng.integers(3, 90, 8), IMS], False)],
    ]
    prompt_batch = _batch(config, [[p] for p in prompt_pieces], 10, 1)
    prompts = np.asarray(prompt_batch["tokens"]).tolist()
    kw["prompt_inputs"] = {k: prompt_batch[k] for k in ("kinds", "patch_index", "input_features")}
    triggers, opened = _find_triggers(base, config, objective, prompts, kw)
    if len(opened) == max_images:
      break
  assert len(opened) == max_images, (triggers, opened)
  params = _trigger_params(base, triggers)
  state = run_interleaved(params, config, objective, prompts, **kw)
  generated, counts, images, drawn = jax.device_get(
      (state["generated"], state["num_generated"], state["images"], state["images_drawn"])
  )
  tokens = [list(map(int, g[:n])) for g, n in zip(generated, counts)]
  # Row 0: text, a trigger, <|im_start|> <|im_end|>, text about it, a trigger, the second image.
  assert [i for i, t in enumerate(tokens[0]) if t == IMS] == opened and len(tokens[0]) == m
  assert opened[0] >= 2 and opened[1] - opened[0] >= 4  # 2+ text tokens before and between
  for i in opened:
    assert tokens[0][i - 1] in triggers and tokens[0][i + 1] == IME
  assert drawn[0] == 2
  assert tokens[1][0] == IME and drawn[1] == tokens[1].count(IMS) + 1
  assert not np.array_equal(images[0, 0], images[0, 1])

  # Each image against the official full recompute of its whole prefix.
  null = config.num_classes
  items = [  # what was fed: the prompt (its read image as one item), the new tokens but the last
      [1, IMS, ("read", read), *prompts[0][2 + INPUT_TOKENS :], *tokens[0][:-1]],
      [*prompts[1], *tokens[1][:-1]],
  ]
  prefixes, slots, ids = [], [], []
  for r in range(len(prompts)):
    for k in range(int(drawn[r])):
      doc = _document(items[r], list(images[r, : k + 1]), null)
      upto = [i for i, p in enumerate(doc) if p[0] == "image"][k]
      prefixes.append(doc[:upto] + [("image", np.zeros(SHAPE, np.float32), null)])
      slots.append(k)
      ids.append(r + k * interleaved_lib.IMAGE_ID_STRIDE)
  ref = _full_recompute_images(params, config, objective, prefixes, slots, ids, jax.random.fold_in(key, 1), 2.0, 3)
  got = np.stack([images[r, k] for r in range(len(prompts)) for k in range(int(drawn[r]))])
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())

  # The whole sequences recomputed (clean images, t = 0): keys/values and greedy choices.
  rows = [_document(f, list(images[r, : drawn[r]]), null) for r, f in enumerate(items)]
  size = max(_length(p, config) for p in rows)
  batch = _batch(config, [[r] for r in rows], size, max_images)
  full = jax.jit(
      lambda p, b: MonoFormer(config).apply(
          {"params": p},
          b,
          b["images"],
          jnp.zeros(b["image_mask"].shape),
          cache=init_cache(config, len(rows), size),
          cache_index=0,
      )
  )(params, batch)
  seg, kinds = np.asarray(batch["segment_ids"]), np.asarray(batch["kinds"])
  for r, prompt in enumerate(prompts):
    ours = np.asarray(state["cache"]["meta"]["segment_ids"][r]) > 0
    theirs = seg[r] > 0
    assert ours.sum() == theirs.sum() == len(prompt) + len(tokens[r]) - 1 + int(drawn[r]) * span
    for name in ("k", "v"):
      want = np.asarray(full["cache"]["layers"][name][:, r])[:, :, theirs]
      got = np.asarray(state["cache"]["layers"][name][:, r])[:, :, ours]
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # Each image its own block in the cache (the read one too), text -1.
    np.testing.assert_array_equal(
        np.asarray(state["cache"]["meta"]["image_id"][r])[ours],
        np.asarray(full["cache"]["meta"]["image_id"][r])[theirs],
    )
    text_at = np.nonzero(theirs & (kinds[r] == batch_lib.KIND_TEXT))[0]
    chosen = text_at[np.sum(np.asarray(prompt_batch["kinds"][r]) == batch_lib.KIND_TEXT) - 1 :]
    opened = 0
    for slot, tok, prev in zip(chosen, tokens[r], [prompt[-1]] + tokens[r][:-1]):
      if prev == IMS:  # written, not chosen
        assert tok == IME
        opened += 1
        continue
      logits = np.array(full["logits"][r, slot])
      if opened >= max_images:
        logits[IMS] = -np.inf
      assert int(np.argmax(logits)) == tok, (r, slot)


# ----------------------------------------------------------------------------------------------
# The model: several images in a row, each its own block at its own noise level.


def _batch(config, rows, seq_len, slots, input_slots=1):
  """rows: per row, a list of samples (RowBuilder pieces) -> a batch with input features."""
  encoder = patch_encoder(INPUT_SHAPE, 2)
  batch = batch_lib.empty_batch(len(rows), seq_len, slots, SHAPE, input_slots, INPUT_SHAPE)
  for r, samples in enumerate(rows):
    builder = batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token, encoder.tokens)
    for s in samples:
      builder.add(s)
  return jax.tree.map(jnp.asarray, encoder.encode_batch(batch))


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, batch, times, config, cache=None, cache_index=0):
  """Logits, denoiser outputs (and the cache) of `batch` with its images at `times`."""
  return MonoFormer(config).apply(
      {"params": params}, batch, batch["images"], jnp.asarray(times, jnp.float32), cache=cache, cache_index=cache_index
  )


def _span_after(params, config, prefix, times, at: int, slot: int):
  """The denoiser output of image `slot` written as a span at `at` after the tokens of `prefix`
  (a one-row batch whose images and labels hold that image's too, at `times`) in a cache, and
  that cache: what sampling computes."""
  size = prefix["tokens"].shape[1]
  cached = _forward(params, prefix, times, config, init_cache(config, 1, size), 0)["cache"]
  one = jnp.ones((1,), bool)
  rows = image_lib.span_batch(config, jnp.asarray([at]), jnp.asarray([slot]), one, prefix["labels"])
  rows["images"] = prefix["images"]
  out = _forward(params, rows, times, config, cached, at)
  return out["image"][0, slot], out["cache"]


def _text(rng, config, n, train=True):
  return ("text", rng.integers(3, config.vocab_size - 2, n), train)


def _image(rng, label=0):
  return ("image", rng.standard_normal(SHAPE).astype(np.float32), label)


def _input(rng):
  return ("input", rng.standard_normal(INPUT_SHAPE).astype(np.float32), None)


def _close(got, want):
  """Equal up to float32 noise relative to the values' scale (a tiny model's: ~1e-7)."""
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def _differs(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_two_images_in_a_row_equal_their_parts(model, rng):
  """text a, image 1 (t1), text b, image 2 (t2), text c in one sample: everything up to image 2
  equals the row holding only text a, image 1, text b; image 2 and text c equal the cached
  continuation of that prefix (what sampling computes); image 2 reads image 1 at t1."""
  config, params = model
  span = span_length(config)
  a, b, c = _text(rng, config, 3), _text(rng, config, 4), _text(rng, config, 2)
  two = [a, _image(rng, 1), b, _image(rng, 2), c]
  times = np.array([[37.0, 612.0]], np.float32)
  size = 9 + 2 * span
  n1 = 7 + span  # text a, image 1, text b
  full = _forward(params, _batch(config, [[two]], size, 2), times, config)
  part = _forward(params, _batch(config, [[two[:3]]], n1, 1), times[:, :1], config)
  _close(full["logits"][0, :n1], part["logits"][0, :n1])
  _close(full["image"][0, 0], part["image"][0, 0])
  # The prefix into a cache, then image 2's span at slot 1, then text c, each attending to it.
  batch = _batch(config, [[two]], size, 2)
  prefix = dict(_batch(config, [[two[:3]]], size, 2), images=batch["images"], labels=batch["labels"])
  image2, cache = _span_after(params, config, prefix, times, n1, 1)
  _close(image2, full["image"][0, 1])
  tail = decode.text_batch(
      jnp.asarray(c[1][None], jnp.int32), jnp.ones((1, 2), jnp.int32), n1 + span + jnp.arange(2)[None]
  )
  tail.update(images=batch["images"], labels=batch["labels"])
  _close(_forward(params, tail, times, config, cache, n1 + span)["logits"][0], full["logits"][0, n1 + span :])
  # Image 2 reads image 1 as it is: its pixels and its own noise level.
  other = [a, _image(rng, 1), b, two[3], c]
  assert _differs(
      _forward(params, _batch(config, [[other]], size, 2), times, config)["image"][0, 1], full["image"][0, 1]
  )
  assert _differs(_forward(params, batch, times + [[100.0, 0.0]], config)["image"][0, 1], full["image"][0, 1])


def test_read_and_generated_images_in_one_row(models, rng):
  """text, an input image, text, a generated image, text, another generated image, text: the
  input image's block and the text before the first generated image equal the row that ends
  there; each generated image equals the row that ends with it; both read the input image."""
  config, params = models("adaln_before_decoder")
  span = span_length(config)
  sample = [
      _text(rng, config, 2, False),
      _input(rng),
      _text(rng, config, 3),
      _image(rng, 0),
      _text(rng, config, 2),
      _image(rng, 1),
      _text(rng, config, 2),
  ]
  times = np.array([[250.0, 5.0]], np.float32)
  ends = np.cumsum([2, 4, 3, span, 2, span, 2])  # where each piece ends
  full = _forward(params, _batch(config, [[sample]], int(ends[-1]), 2), times, config)
  upto_text = _forward(params, _batch(config, [[sample[:3]]], int(ends[2]), 1), times[:, :1], config)
  _close(full["logits"][0, : ends[2]], upto_text["logits"][0])
  for k, piece in ((0, 3), (1, 5)):
    upto = _forward(params, _batch(config, [[sample[: piece + 1]]], int(ends[piece]), k + 1), times[:, : k + 1], config)
    _close(full["image"][0, k], upto["image"][0, k])
    _close(full["logits"][0, : ends[piece]], upto["logits"][0])
  read_other = list(sample)
  read_other[1] = _input(rng)
  changed = _forward(params, _batch(config, [[read_other]], int(ends[-1]), 2), times, config)
  assert _differs(changed["image"][0, 0], full["image"][0, 0]) and _differs(changed["image"][0, 1], full["image"][0, 1])
  _close(changed["logits"][0, :2], full["logits"][0, :2])  # the text before the input image


def test_packed_samples_of_several_images_equal_each_alone(models, rng):
  """Two samples of two generated images each (one also reads an image) packed in a row, its
  image slots 0-1 and 2-3: each sample's logits and images are those it has alone."""
  config, params = models("add_before_image_tokens")
  span = span_length(config)
  s1 = [_text(rng, config, 3), _image(rng, 0), _text(rng, config, 2), _image(rng, 1), _text(rng, config, 1)]
  s2 = [_text(rng, config, 1, False), _input(rng), _text(rng, config, 2), _image(rng, 2), _image(rng, 0)]
  n1, n2 = 6 + 2 * span, 3 + 4 + 2 * span
  t1, t2 = [3.0, 700.0], [420.0, 999.0]
  packed = _forward(params, _batch(config, [[s1, s2]], n1 + n2, 4), np.array([t1 + t2], np.float32), config)
  alone = _forward(params, _batch(config, [[s1], [s2]], n2, 2), np.array([t1, t2], np.float32), config)
  _close(packed["logits"][0, :n1], alone["logits"][0, :n1])
  _close(packed["logits"][0, n1:], alone["logits"][1, :n2])
  _close(packed["image"][0], np.concatenate([alone["image"][0], alone["image"][1]]))


# ----------------------------------------------------------------------------------------------
# The losses: packing changes none; each generated image at its own noise level.


def test_packed_and_unpacked_rows_give_the_same_losses_and_gradients(models, rng, monkeypatch):
  """Three samples (two images; an input image and two images; one image), one per row or
  packed two in a row, each image at the same t and noise in both layouts: the mixed step's
  losses (LM and diffusion), counts and gradients are the same."""
  config, params = models("add_before_image_tokens")
  objective = diffusion.make_objective("gaussian", learn_sigma=config.learn_sigma)
  samples = [
      [_text(rng, config, 3), _image(rng, 0), _text(rng, config, 2), _image(rng, 1), _text(rng, config, 2)],
      [_text(rng, config, 2, False), _input(rng), _text(rng, config, 2), _image(rng, 2), _text(rng, config, 1)]
      + [_image(rng, 0), _text(rng, config, 3)],
      [_text(rng, config, 4), _image(rng, 1), _text(rng, config, 3)],
  ]
  t_img = rng.integers(0, 1000, 5).astype(np.int32)
  noise_img = rng.standard_normal((5, *SHAPE)).astype(np.float32)
  span = span_length(config)
  layouts = {  # (rows, image slots, seq_len, the image of each (row, slot); -1: none)
      "unpacked": ([[samples[0]], [samples[1]], [samples[2]]], 2, 12 + 2 * span, [[0, 1], [2, 3], [4, -1]]),
      "packed": ([[samples[0], samples[1]], [samples[2]]], 4, 19 + 4 * span, [[0, 1, 2, 3], [4, -1, -1, -1]]),
  }
  draws = {}

  def same_draws(objective, images, rng, row_ids):
    """steps._noisy_images with each image's own t and noise, wherever it sits."""
    del rng, row_ids
    which = np.asarray(draws[images.shape[:2]]).reshape(-1)
    t = jnp.asarray(np.where(which >= 0, t_img[which], 0))
    noise = jnp.asarray(np.where(which[:, None, None, None] >= 0, noise_img[which], 0.0))
    x0 = images.reshape((-1,) + images.shape[2:])
    return x0, objective.add_noise(x0, noise, t), t, objective.model_timesteps(t), noise

  monkeypatch.setattr(steps, "_noisy_images", same_draws)
  loss_fn = steps.make_loss_fn("mixed", config, objective, 1.0, 0.5)
  results = {}
  for name, (rows, slots, size, which) in layouts.items():
    batch = _batch(config, rows, size, slots)
    draws[batch["images"].shape[:2]] = which
    norms = steps.batch_normalisers(batch)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    results[name] = grad_fn(params, batch, jax.random.key(0), norms, jnp.arange(len(rows)))
  (loss_u, aux_u), grads_u = results["unpacked"]
  (loss_p, aux_p), grads_p = results["packed"]
  assert float(aux_u["images"]) == float(aux_p["images"]) == 5
  assert float(aux_u["lm_tokens"]) == float(aux_p["lm_tokens"]) > 0
  for key in ("loss_lm", "loss_diffusion", "loss_diffusion_mse", "loss_diffusion_vb"):
    _close(aux_p[key], aux_u[key])
  _close(loss_p, loss_u)
  for g_p, g_u in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)):
    np.testing.assert_allclose(g_p, g_u, rtol=0, atol=1e-5 * max(float(np.abs(g_u).max()), 1e-6))


def test_each_image_of_a_row_is_denoised_at_its_own_noise_level(models, seed):
  """The diffusion step on a row of two images draws a t per image; its loss is the mean of
  image 1's term in the row that ends with image 1 and image 2's term over the cached prefix
  holding image 1 at image 1's own t (what the mask lets image 2 see)."""
  config, params = models("adaln_before_decoder")
  rng = np.random.default_rng(seed)
  objective = diffusion.make_objective("gaussian", learn_sigma=config.learn_sigma)
  span = span_length(config)
  two = [_text(rng, config, 3), _image(rng, 1), _text(rng, config, 2), _image(rng, 2), _text(rng, config, 2)]
  size, n1 = 7 + 2 * span, 5 + span
  batch = _batch(config, [[two]], size, 2)
  key, rows = jax.random.key(seed), jnp.arange(1)
  loss_fn = steps.make_loss_fn("diffusion", config, objective, 1.0, 0.0)
  first, prefix = _batch(config, [[two[:2]]], 3 + span, 1), _batch(config, [[two[:3]]], size, 2)

  @jax.jit
  def reference(params):
    x0, x_t, t, model_t, noise = steps._noisy_images(objective, batch["images"], key, rows)
    times = model_t.reshape(1, 2)
    noisy = x_t.reshape(batch["images"].shape)
    out1 = _forward(params, dict(first, images=noisy[:, :1]), times[:, :1], config)["image"][0, 0]
    out2 = _span_after(params, config, dict(prefix, images=noisy, labels=batch["labels"]), times, n1, 1)[0]
    terms = objective.loss(jnp.stack([out1, out2]), x0, x_t, noise, t)["loss"]
    return t, terms

  t, terms = reference(params)
  assert int(t[0]) != int(t[1])
  loss, aux = jax.jit(loss_fn)(params, batch, key, steps.batch_normalisers(batch), rows)
  _close(aux["loss_diffusion"], terms.mean())
  _close(loss, terms.mean())


# ----------------------------------------------------------------------------------------------
# The pipeline: documents of 1..N images, generated and read, each its own block.


class WordTokenizer:
  """A tokenizer stand-in: one id per word (a hash), the special ids of tokenizer.Tokenizer."""

  bos_id, eos_id, im_start_id, im_end_id, newline_ids = 1, 2, 90, 91, [3]

  def encode(self, text: str) -> list[int]:
    return [4 + zlib.crc32(word.encode()) % 80 for word in text.split()]


class Digits:
  """Record i: a 4x4x1 image holding i (< 256), label i % 3."""

  class_names = ("red", "green", "blue")

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 1), i % 256, np.uint8), "label": i % 3}

  def __repr__(self):
    return f"Digits({self.n})"


def _documents(seed, **kw):
  options = dict(
      batch_size=6, max_images=3, patch_size=2, t_token=True, image_shape=(4, 4, 1), seed=seed, text_dropout=0.0
  )
  options.update(kw)
  return interleaved_data.make_interleaved_iterator(Digits(200), WordTokenizer(), **options)


def _record_ids(images):
  return np.round((images[..., 0, 0, 0] + 1) * 127.5).astype(int)


def test_documents_hold_one_to_the_cap_of_images_each_its_own_block(seed):
  """Each row is one sample of 1..3 consecutive records, each image after its prompt between
  <|im_start|> and <|im_end|>, in its own slot (its own block, model/mask.py); the
  <|im_start|> before it is trained with the text (the model learns to open images)."""
  tok, p = WordTokenizer(), 4
  batch = next(_documents(seed, train_text=True, shuffle=False))
  counts = batch["image_mask"].sum(axis=1)
  assert batch["image_mask"].shape == (6, 3) and set(counts) <= {1, 2, 3} and len(set(counts)) > 1
  ids = _record_ids(batch["images"])
  for r in range(6):
    n = int(counts[r])
    assert batch["image_mask"][r].tolist() == [True] * n + [False] * (3 - n)
    np.testing.assert_array_equal(ids[r, :n], 3 * r + np.arange(n))  # consecutive records
    seg, kinds = batch["segment_ids"][r], batch["kinds"][r]
    assert set(seg) <= {0, 1} and batch["positions"][r][seg > 0].tolist() == list(range((seg > 0).sum()))
    assert batch["tokens"][r, 0] == tok.bos_id and batch["tokens"][r, (seg > 0).sum() - 1] == tok.eos_id
    opens = np.flatnonzero((batch["tokens"][r] == tok.im_start_id) & (kinds == batch_lib.KIND_TEXT))
    assert len(opens) == n
    for k, at in enumerate(opens):
      assert kinds[at + 1] == batch_lib.KIND_T_TOKEN and batch["patch_index"][r, at + 1] == k * p
      image = slice(at + 2, at + 2 + p)
      assert (kinds[image] == batch_lib.KIND_IMAGE).all()
      np.testing.assert_array_equal(batch["patch_index"][r, image], k * p + np.arange(p))
      assert batch["tokens"][r, at + 2 + p] == tok.im_end_id
      assert batch["targets"][r, at - 1] == tok.im_start_id and batch["loss_mask"][r, at - 1] == 1
      assert batch["labels"][r, k] == (3 * r + k) % 3


def test_documents_read_and_generate_images_in_one_row(seed):
  """With input_fraction, a record may be read instead of drawn: its tokens are input tokens
  (input slot, no diffusion), the class name after it is trained, the <|im_start|> before it is
  not; rows hold read and generated images together."""
  tok = WordTokenizer()
  it = _documents(seed, input_fraction=0.5, input_tokens=4, batch_size=8)
  batch = next(it)
  assert batch["input_mask"].shape == (8, 3)
  reads, draws = batch["input_mask"].sum(axis=1), batch["image_mask"].sum(axis=1)
  assert ((reads > 0) & (draws > 0)).any() and (1 <= reads + draws).all() and (reads + draws <= 3).all()
  names = [tok.encode(n) for n in Digits.class_names]
  for r in range(8):
    kinds, tokens = batch["kinds"][r], batch["tokens"][r]
    starts = np.flatnonzero(np.diff(np.r_[0, kinds == batch_lib.KIND_INPUT_IMAGE]) == 1)
    assert len(starts) == reads[r]
    for k, at in enumerate(starts):
      np.testing.assert_array_equal(batch["patch_index"][r, at : at + 4], 4 * k + np.arange(4))
      assert tokens[at - 1] == tok.im_start_id and batch["loss_mask"][r, at - 2] == 0  # not trained
      label = _record_ids(batch["input_images"][r, k]) % 3
      after = at + 4 + 2  # <|im_end|> \n, then the name, trained
      assert tokens[after : after + len(names[label])].tolist() == names[label]
      assert batch["loss_mask"][r, after - 1 : after - 1 + len(names[label])].all()
    opens = np.flatnonzero((tokens == tok.im_start_id) & (np.r_[kinds[1:], 0] == batch_lib.KIND_T_TOKEN))
    assert len(opens) == draws[r] and not batch["loss_mask"][r, opens - 1].any()  # train_text=False


def test_documents_resume_and_shard_like_one_image_rows(seed):
  """A state resumes the next batch exactly; two processes' first batches are the single
  process's first batch, split (documents are dealt in blocks of batch_size)."""
  one = _documents(seed, shard_index=0, shard_count=1)
  next(one)
  state = one.get_state()
  want = next(one)
  again = _documents(seed, shard_index=0, shard_count=1)
  again.set_state(state)
  got = next(again)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  first = next(_documents(seed, shard_index=0, shard_count=1, batch_size=6))
  halves = [next(_documents(seed, shard_index=p, shard_count=2, batch_size=3)) for p in range(2)]
  for key in first:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[key])


def test_a_document_is_cut_at_the_cap_and_the_row_length():
  """An image past the cap or the row's end ends the sample, its <|im_start|> with it; text is
  cut anywhere."""
  tok, img = WordTokenizer(), np.zeros((4, 4, 1), np.float32)
  parts = [("text", [5, 6]), ("image", img, 0), ("text", [7]), ("input", img), ("text", [8]), ("image", img, 1)]
  pieces = seq.document_sample(tok, parts)
  lengths = {"image": 5, "input": 4}

  def flat(ps):  # text ids, "G" for an image to generate, "R" for one to read
    return [t for k, v, _ in ps for t in (list(v) if k == "text" else ["G" if k == "image" else "R"])]

  def cut(max_len, max_images=2, max_inputs=1):
    return flat(seq.cut_document(pieces, lengths, max_len, max_images, max_inputs, tok.im_start_id))

  whole = [1, 5, 6, 90, "G", 91, 3, 7, 90, "R", 91, 3, 8, 90, "G", 91, 3, 2]
  assert flat(pieces) == whole and cut(29) == whole
  assert cut(100, max_images=1) == whole[:13]  # the second image: past the cap
  assert cut(100, max_inputs=0) == whole[:8]
  assert cut(28) == whole[:-1] and cut(26) == whole[:15]  # text cut anywhere, after an image too
  assert cut(25) == whole[:13]  # the second image does not fit: cut before its <|im_start|>
  assert cut(8) == [1, 5, 6] and cut(11) == whole[:7] and cut(10) == whole[:6]


def test_the_trainer_reads_documents_up_to_data_max_images_per_row():
  config = config_lib.base_config()
  config.data.update(max_images_per_row=3, image_batch_size=4, prompt_dropout=0.0, worker_count=1)
  config.model.update(image_height=28, image_width=28, image_channels=1, patch_size=7)
  model_config = config_lib.model_config_from(config)
  tok = WordTokenizer()
  stream = data_streams.build_data(config, model_config, tok, ["diffusion"])["diffusion"]
  batch = next(stream.iterator)
  assert batch["image_mask"].shape == (4, 3) and batch["image_mask"].sum() > 4
  config.data.max_images_per_row = 0
  with pytest.raises(config_lib.ConfigError, match="data.max_images_per_row"):
    config_lib.validate_config(config, ["diffusion"], num_devices=1)


def _reading_documents_config(seed):
  config = config_lib.base_config()
  config.seed = seed
  config.data.update(max_images_per_row=3, read_fraction=0.5, image_batch_size=8, text_batch_size=2, text_seq_len=24)
  config.data.update(prompt_dropout=0.0, worker_count=1, tokenizer_vocab_size=93)
  config.model.update(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1)
  config.model.update(image_height=28, image_width=28, image_channels=1, patch_size=7)
  config.input_images.update(encoder="patch", patch_size=7)
  config.schedule.update(diffusion=0.0, mixed=1.0)
  return config


def test_mixed_steps_train_documents_that_read_and_draw(seed):
  """data.read_fraction: the mixed stream's documents read some digits (encoded on the way in)
  and draw others; the name after a read digit is LM-trained and depends on that digit, the
  text rows beside them read nothing."""
  config = _reading_documents_config(seed)
  config_lib.validate_config(config, ["mixed"], num_devices=1)
  model_config = config_lib.model_config_from(config)
  stream = data_streams.build_data(config, model_config, WordTokenizer(), ["mixed"])["mixed"]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  batch = jax.device_get(stream.next_global(mesh))
  assert "input_images" not in batch and batch["input_features"].shape == (10, 3, 16, 49)
  reads, draws = batch["input_mask"].sum(axis=1), batch["image_mask"].sum(axis=1)
  assert ((reads > 0) & (draws > 0))[:8].any() and not reads[8:].any() and not draws[8:].any()
  assert stream.spec()["input_features"].shape == batch["input_features"].shape
  objective = diffusion.make_objective("gaussian", learn_sigma=True)
  loss_fn = jax.jit(steps.make_loss_fn("mixed", model_config, objective, 1.0, 1.0))
  params = random_params(model_config, seed)
  # The LM loss of the document rows alone: the names after their read digits (prompts untrained).
  answers = dict(batch, loss_mask=batch["loss_mask"] * (np.arange(10) < 8)[:, None])
  assert answers["loss_mask"].sum() >= reads.sum()
  norms = steps.batch_normalisers(answers)

  def lm_loss(features):
    out = loss_fn(params, dict(answers, input_features=features), jax.random.key(0), norms, jnp.arange(10))
    return float(out[1]["loss_lm"])

  features = batch["input_features"]
  base = lm_loss(features)
  noise = 4 * np.random.default_rng(seed).standard_normal(features.shape).astype(np.float32)
  read = batch["input_mask"][..., None, None]
  assert np.isfinite(base) and abs(lm_loss(features + np.where(read, noise, 0)) - base) > 5e-5  # ~100 float32 ulps
  assert lm_loss(features + np.where(read, 0, noise)) == base  # empty input slots are read by nothing


def test_read_fraction_names_what_it_needs():
  for update, needs in (
      (dict(data=dict(read_fraction=1.5)), "in \\[0, 1\\]"),
      (dict(data=dict(max_images_per_row=1)), "max_images_per_row >= 2"),
      (dict(input_images=dict(encoder="none")), "input_images.encoder"),
      (dict(schedule=dict(mixed=0.0, diffusion=1.0)), "schedule.mixed"),
  ):
    bad = _reading_documents_config(0)
    for section, values in update.items():
      bad[section].update(values)
    kinds = [k for k in ("diffusion", "mixed") if bad.schedule[k] > 0]
    with pytest.raises(config_lib.ConfigError, match="data.read_fraction.*" + needs):
      config_lib.validate_config(bad, kinds, num_devices=1)
