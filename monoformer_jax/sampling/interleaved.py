"""Text and images in one call: write text, draw an image where the model opens one, go on.

The text loop (inference/decode.py) stops as soon as a live row is about to feed `<|im_start|>`
(it chose it, or its prompt ends with it). The image phase then, for those rows only:
  1. writes `<|im_start|>` into the cache,
  2. samples the image span over the cached prefix (the whole text so far) with the objective's
     compiled sampler, classifier-free guided against the official unconditional prompt
     `<s><|im_start|>` (a small cache of its own),
  3. writes the finished image into the cache as clean tokens (its patches through the image
     input path with t = 0 conditioning), and
  4. makes `<|im_end|>` the row's next token, so text continues after the image.
Rows that are not drawing keep their pending token; the span's slots are empty (segment 0) for
them. Each phase costs every row 1 + span cache slots, so the cache can grow to B * max_images
phases (rows rarely open images at the same step); it grows in buckets as text does
(decode.cache_size_for), and the host makes room before each phase.

The k-th image of sample n takes its noise from sample id n + k * IMAGE_ID_STRIDE: the first image
of a prompt is the same image `image.sample_images` draws for that prompt with the same key.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from monoformer_jax import diffusion
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.sampling import cache as cache_lib
from monoformer_jax.sampling import decode
from monoformer_jax.sampling import image as image_lib
from monoformer_jax.sampling.tokens import TokenSampling
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer

IMAGE_ID_STRIDE = 1 << 20


@functools.partial(
    jax.jit, static_argnames=("config", "image_token", "end_token", "max_images", "options"), donate_argnames=("state",)
)
def draw_pending(
    params,
    state: dict,
    uncond_ids,
    rng,
    objective,
    *,
    config: ModelConfig,
    image_token: int,
    end_token: int,
    max_images: int,
    options: ImageSampling,
) -> dict:
  """One image phase for every live row whose next token is `image_token` (the cache needs
  1 + span free slots after state['index']; `state` is donated)."""
  b = state["generated"].shape[0]
  pending = (~state["done"]) & (state["next_token"] == image_token)
  # 1. <|im_start|> of the drawing rows.
  out = MonoFormer(config).apply(
      {"params": params},
      decode.text_batch(state["next_token"][:, None], pending.astype(jnp.int32)[:, None], state["position"][:, None]),
      cache=state["cache"],
      cache_index=state["index"],
      return_logits=False,
      return_image=False,
  )
  cache = cache_lib.constrain_cache(out["cache"])
  at, start = state["index"] + 1, state["position"] + 1
  slots = jnp.minimum(state["images_drawn"], max_images - 1)
  null = jnp.full((b, max_images), config.num_classes, jnp.int32)
  # 2. sample the span over the cached text.
  cond_fn = image_lib.cached_model_fn(
      params, config, cache, at, start, slots, pending, num_slots=max_images, labels=null
  )
  denoise = _guided(cond_fn, params, config, uncond_ids, null, options)
  ids = state["sample_ids"] + state["images_drawn"] * IMAGE_ID_STRIDE
  x0 = image_lib.run_sampler(objective, denoise, rng, ids, image_lib.image_shape(config), options)
  # 3. the clean image into the cache (t = 0 is the clean end for both objectives).
  cache = image_lib.write_clean_image(
      params, config, cache, at, start, slots, pending, x0, clean_model_t=0.0, num_slots=max_images, labels=null
  )
  return _after_drawing(state, pending, slots, x0, cache, end_token, image_lib.span_length(config))


def _guided(cond_fn, params, config: ModelConfig, uncond_ids, null, options: ImageSampling):
  """`cond_fn` guided against the unconditional prompt `uncond_ids` (a small cache of its own)
  when `options` guide, else as it is; `null` (B, slots): the null class labels."""
  if not options.guided:
    return cond_fn
  b, u = null.shape[0], uncond_ids.shape[0]
  u_ids = jnp.broadcast_to(uncond_ids[None, :], (b, u))
  u_cache = image_lib.prompt_cache(
      params, config, u_ids, jnp.full((b,), u, jnp.int32), u + image_lib.span_length(config)
  )
  uncond_fn = image_lib.cached_model_fn(
      params,
      config,
      u_cache,
      u,
      jnp.full((b,), u, jnp.int32),
      jnp.zeros((b,), jnp.int32),
      jnp.ones((b,), bool),
      labels=null[:, :1],
  )
  return diffusion.guided_denoise_fn(cond_fn, uncond_fn, options.guidance_scale, options.cfg_mode, config.learn_sigma)


def _after_drawing(state: dict, pending, slots, x0, cache: dict, end_token: int, span: int) -> dict:
  """The decode state after an image phase: the drawing rows' images `x0` in their `slots`, the
  span's `span` slots of `cache` taken, and <|im_end|> their next token (recorded as generated)."""
  b, max_new = state["generated"].shape
  rows = jnp.arange(b)
  images = (
      state["images"].at[rows, slots].set(jnp.where(pending[:, None, None, None], x0, state["images"][rows, slots]))
  )
  n = state["num_generated"]
  col = jnp.minimum(n, max_new - 1)
  generated = state["generated"].at[rows, col].set(jnp.where(pending, end_token, state["generated"][rows, col]))
  n = n + pending.astype(jnp.int32)
  return dict(
      state,
      cache=cache_lib.constrain_cache(cache),
      index=state["index"] + 1 + span,
      next_token=jnp.where(pending, end_token, state["next_token"]),
      position=jnp.where(pending, state["position"] + 1 + span, state["position"]),
      generated=generated,
      num_generated=n,
      done=state["done"] | (pending & (n >= max_new)),
      images_drawn=state["images_drawn"] + pending.astype(jnp.int32),
      images=images,
  )


def generate_interleaved(
    params, config: ModelConfig, objective, prompts: Sequence[Sequence[int]], **options
) -> list[dict]:
  """Per prompt {'tokens': new ids (<|im_start|> / <|im_end|> around each image), 'images': a
  list of (H, W, C) arrays in order}; `options` as `run_interleaved`. Text keys derive from
  fold_in(rng, 0), image noise from fold_in(rng, 1)."""
  state = run_interleaved(params, config, objective, prompts, **options)
  generated, counts, images, drawn = jax.device_get(
      (state["generated"], state["num_generated"], state["images"], state["images_drawn"])
  )
  return [
      {"tokens": [int(t) for t in generated[r, : counts[r]]], "images": [images[r, k] for k in range(drawn[r])]}
      for r in range(len(prompts))
  ]


def run_interleaved(  # pylint: disable=too-many-arguments  # public: a keyword per sampling option
    params,
    config: ModelConfig,
    objective,
    prompts: Sequence[Sequence[int]],
    *,
    image_token: int,
    end_token: int,
    uncond_prompt: Sequence[int],
    max_new_tokens: int,
    sampling: TokenSampling = TokenSampling(),
    stop_tokens: Sequence[int] = (),
    max_images: int = 1,
    options: ImageSampling = ImageSampling(guidance_scale=1.0, num_steps=50),
    rng: Optional[jax.Array] = None,
    sample_ids=None,
    mesh=None,
    rules=None,
    prompt_inputs: Optional[dict] = None,
) -> dict:
  """`generate_interleaved`'s final decode state (the cache included: every token fed, text
  and clean images, at the slots where segment_ids > 0). Images are drawn with `options`.
  `prompt_inputs`: images the prompts read (decode.prefill's: their `kinds`, `patch_index` and
  `input_features`), so a row can read an image and then draw others; every text and image
  after reads it."""
  if max_images < 1:
    raise ValueError(f"max_images must be >= 1, got {max_images}")
  options.check_objective(objective.kind)
  ids, lengths = decode.pad_prompts(prompts)
  total = _cache_length(config, ids, lengths, max_new_tokens, max_images)
  rng = jax.random.key(0) if rng is None else rng

  def write_text(state):
    return decode.decode_until(
        params,
        state,
        jax.random.fold_in(rng, 0),
        config=config,
        sampling=sampling,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        image_token=image_token,
        max_images=max_images,
    )

  def draw_images(state):
    return draw_pending(
        params,
        state,
        jnp.asarray(uncond_prompt, jnp.int32),
        jax.random.fold_in(rng, 1),
        objective,
        config=config,
        image_token=image_token,
        end_token=end_token,
        max_images=max_images,
        options=options,
    )

  with decode.mesh_context(mesh, rules):
    state = decode.prefill_rows(params, config, ids, lengths, sample_ids, prompt_inputs, max_new_tokens, total)
    state["images"] = jnp.zeros((len(prompts), max_images) + image_lib.image_shape(config), jnp.float32)
    return _alternate(state, write_text, draw_images, image_token, 1 + image_lib.span_length(config), total)


def _cache_length(config: ModelConfig, ids, lengths, max_new_tokens: int, max_images: int) -> int:
  """The most cache slots the padded prompts `ids` can come to need: every row's text, and an
  image phase (1 + span slots for every row) each time a row opens one (B * max_images at most).
  Raises where a row's prompt, text and images exceed the model's positions."""
  span = image_lib.span_length(config)
  if int(lengths.max()) + max_new_tokens + max_images * (1 + span) > config.max_position_embeddings:
    raise ValueError(
        f"prompt + max_new_tokens + {max_images} image(s) of {span} tokens exceed "
        f"max_position_embeddings={config.max_position_embeddings}"
    )
  return ids.shape[1] - 1 + max_new_tokens + ids.shape[0] * max_images * (1 + span)


def _alternate(state: dict, write_text, draw_images, image_token: int, phase_slots: int, total: int) -> dict:
  """Text until every row is done, and an image phase (`phase_slots` cache slots, made room for
  first) whenever a live row is about to feed `image_token`."""
  while True:
    state = write_text(state)
    done, pending = jax.device_get((state["done"], (~state["done"]) & (state["next_token"] == image_token)))
    if done.all():
      return state
    if not pending.any():  # the loop stopped on a full cache
      state = decode.ensure_room(state, 1, total)
      continue
    state = draw_images(decode.ensure_room(state, phase_slots, total))
