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
import numpy as np

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
  b, max_new = state["generated"].shape
  rows = jnp.arange(b)
  span = image_lib.span_length(config)
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
  denoise = cond_fn
  if options.guided:
    u = uncond_ids.shape[0]
    u_ids = jnp.broadcast_to(uncond_ids[None, :], (b, u))
    u_cache = image_lib.prompt_cache(params, config, u_ids, jnp.full((b,), u, jnp.int32), u + span)
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
    denoise = diffusion.guided_denoise_fn(
        cond_fn, uncond_fn, options.guidance_scale, options.cfg_mode, config.learn_sigma
    )
  ids = state["sample_ids"] + state["images_drawn"] * IMAGE_ID_STRIDE
  x0 = image_lib.run_sampler(objective, denoise, rng, ids, image_lib.image_shape(config), options)
  # 3. the clean image into the cache (t = 0 is the clean end for both objectives).
  cache = image_lib.write_clean_image(
      params, config, cache, at, start, slots, pending, x0, 0.0, num_slots=max_images, labels=null
  )
  images = (
      state["images"].at[rows, slots].set(jnp.where(pending[:, None, None, None], x0, state["images"][rows, slots]))
  )
  # 4. <|im_end|> is the drawing rows' next token (recorded as generated text).
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


def run_interleaved(
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
  b, span = len(prompts), image_lib.span_length(config)
  phases = b * max_images
  total = ids.shape[1] - 1 + max_new_tokens + phases * (1 + span)
  if int(lengths.max()) + max_new_tokens + max_images * (1 + span) > config.max_position_embeddings:
    raise ValueError(
        f"prompt + max_new_tokens + {max_images} image(s) of {span} tokens exceed "
        f"max_position_embeddings={config.max_position_embeddings}"
    )
  rng = jax.random.key(0) if rng is None else rng
  text_rng, image_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
  sample_ids = np.arange(b) if sample_ids is None else np.asarray(sample_ids)
  stops = tuple(int(t) for t in stop_tokens)
  with decode.mesh_context(mesh, rules):
    state = decode.prefill(
        params,
        jnp.asarray(ids),
        jnp.asarray(lengths),
        jnp.asarray(sample_ids),
        prompt_inputs,
        config=config,
        cache_size=decode.cache_size_for(ids.shape[1], total),
        max_new_tokens=max_new_tokens,
    )
    state["images"] = jnp.zeros((b, max_images) + image_lib.image_shape(config), jnp.float32)
    while True:
      state = decode.decode_until(
          params,
          state,
          text_rng,
          config=config,
          sampling=sampling,
          stop_tokens=stops,
          image_token=image_token,
          max_images=max_images,
      )
      done, pending = jax.device_get((state["done"], (~state["done"]) & (state["next_token"] == image_token)))
      if done.all():
        break
      if not pending.any():  # the loop stopped on a full cache
        state = decode.ensure_room(state, 1, total)
        continue
      state = decode.ensure_room(state, 1 + span, total)
      state = draw_pending(
          params,
          state,
          jnp.asarray(uncond_prompt, jnp.int32),
          image_rng,
          objective,
          config=config,
          image_token=image_token,
          end_token=end_token,
          max_images=max_images,
          options=options,
      )
  return state
