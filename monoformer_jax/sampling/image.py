"""Image sampling with the prompt's key/value cache computed once.

The prompt `<s>{prompt}<|im_start|>` never attends to the image after it, so its keys/values are
the same at every denoising step: they are written into the cache once (prefill), and each step
runs only the image span (the t-token where the variant has one, then the patch tokens) attending
to the cached prefix and bidirectionally to each other. The LM head is never applied. This is the
same function as the official loop, which recomputes the whole sequence and a full vocabulary
projection of every token at every step (`sample_images_full_recompute`, kept for tests and
benchmarks).

Prompts of different lengths are right-padded (pad slots are invisible); every row's image span is
written at the same cache index while its RoPE positions continue from the row's own length.
Classifier-free guidance runs the conditional and the official unconditional prompt
`<s><|im_start|>` as one doubled batch [cond; uncond] over one cache.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import diffusion
from monoformer_jax.sampling import cache as cache_lib
from monoformer_jax.sampling.decode import mesh_context, pad_prompts, text_batch, to_host
from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.model.monoformer import MonoFormer


def span_length(config: ModelConfig) -> int:
  """Tokens of one generated image in the sequence: [t-token] + patches."""
  return config.num_patches + int(config.has_t_token)


def image_shape(config: ModelConfig) -> tuple:
  return (config.image_height, config.image_width, config.image_channels)


def span_batch(config: ModelConfig, start_positions, slots, live, labels=None) -> dict:
  """The image-span tokens of every row: (B, span) per-token arrays.

  start_positions (B,): RoPE position of the span's first token; slots (B,): the row's image slot
  (distinct images of one row need distinct slots, the mask keeps them apart); live (B,) bool:
  rows whose span is real (others get segment 0: written nowhere visible).
  """
  n, p = span_length(config), config.num_patches
  b = start_positions.shape[0]
  offsets = jnp.arange(n, dtype=jnp.int32)[None, :]
  kinds = jnp.full((1, n), batch_lib.KIND_IMAGE, jnp.int32)
  index = slots[:, None] * p + offsets
  if config.has_t_token:
    kinds = kinds.at[:, 0].set(batch_lib.KIND_T_TOKEN)
    index = jnp.concatenate([slots[:, None] * p, index[:, :-1]], axis=1)
  batch = text_batch(
      jnp.zeros((b, n), jnp.int32),
      jnp.broadcast_to(live.astype(jnp.int32)[:, None], (b, n)),
      start_positions[:, None] + offsets,
  )
  batch["kinds"] = jnp.broadcast_to(kinds, (b, n))
  batch["patch_index"] = index
  if labels is not None:
    batch["labels"] = labels
  return batch


def place_in_slots(x, slots, num_slots: int):
  """(B, H, W, C) -> (B, num_slots, H, W, C) with row r's image at slots[r]."""
  if num_slots == 1:
    return x[:, None]
  onehot = jax.nn.one_hot(slots, num_slots, dtype=x.dtype)
  return onehot[:, :, None, None, None] * x[:, None]


def cached_model_fn(
    params, config: ModelConfig, cache: dict, index, start_positions, slots, live, *, num_slots: int = 1, labels=None
):
  """model_fn(x_t (B,H,W,C), model_t (B,)) -> model output for the span, over a cached prefix."""
  model = MonoFormer(config)
  batch = span_batch(config, start_positions, slots, live, labels)
  rows = jnp.arange(start_positions.shape[0])

  def model_fn(x, t):
    images = place_in_slots(x, slots, num_slots)
    times = jnp.broadcast_to(t[:, None], (t.shape[0], num_slots))
    out = model.apply({"params": params}, batch, images, times, cache=cache, cache_index=index, return_logits=False)
    return out["image"][rows, slots]

  return model_fn


def write_clean_image(
    params,
    config: ModelConfig,
    cache: dict,
    index,
    start_positions,
    slots,
    live,
    x0,
    *,
    clean_model_t,
    num_slots: int = 1,
    labels=None,
) -> dict:
  """The finished image into the cache as clean tokens (image input path at t = `clean_model_t`)."""
  batch = span_batch(config, start_positions, slots, live, labels)
  t = jnp.full((x0.shape[0], num_slots), clean_model_t, jnp.float32)
  out = MonoFormer(config).apply(
      {"params": params},
      batch,
      place_in_slots(x0, slots, num_slots),
      t,
      cache=cache,
      cache_index=index,
      return_logits=False,
      return_image=False,
  )
  return out["cache"]


def prompt_cache(params, config: ModelConfig, ids, lengths, cache_size: int) -> dict:
  """A cache holding every token of right-padded prompts (B, P) at slots 0..P-1."""
  b, p = ids.shape
  cache = cache_lib.constrain_cache(cache_lib.init_cache(config, b, cache_size))
  slots = jnp.arange(p, dtype=jnp.int32)[None, :]
  seg = (slots < lengths[:, None]).astype(jnp.int32)
  out = MonoFormer(config).apply(
      {"params": params},
      text_batch(ids, seg, jnp.broadcast_to(slots, (b, p))),
      cache=cache,
      cache_index=0,
      return_logits=False,
      return_image=False,
  )
  return cache_lib.constrain_cache(out["cache"])


def denoiser(model_fn, options: ImageSampling, learn_sigma: bool):
  """The sampler's denoise_fn: model_fn on [cond; uncond] rows with CFG, or as is."""
  if not options.guided:
    return model_fn
  return diffusion.cfg_denoise_fn(model_fn, options.guidance_scale, options.cfg_mode, learn_sigma)


def run_sampler(objective, denoise_fn, rng, sample_ids, shape, options: ImageSampling):
  """x_T from fold_in(rng, sample id), then the objective's compiled loop."""
  x_t = diffusion.sample_noise(rng, sample_ids, shape)
  kw = dict(sampler=options.sampler, num_steps=options.num_steps, sample_ids=sample_ids)
  if objective.kind == "gaussian":
    kw.update(eta=options.eta, clip_denoised=options.clip_denoised)
  return objective.sample(denoise_fn, x_t, rng, **kw)


@functools.partial(jax.jit, static_argnames=("config", "options"))
def _sample_cached(
    params, ids, lengths, labels, rng, sample_ids, objective, *, config: ModelConfig, options: ImageSampling
):
  rows, p = ids.shape
  cache = prompt_cache(params, config, ids, lengths, p + span_length(config))
  model_fn = cached_model_fn(
      params, config, cache, p, lengths, jnp.zeros((rows,), jnp.int32), jnp.ones((rows,), bool), labels=labels[:, None]
  )
  denoise = denoiser(model_fn, options, config.learn_sigma)
  return run_sampler(objective, denoise, rng, sample_ids, image_shape(config), options)


def cfg_rows(config, prompts, uncond_prompt, labels, options: ImageSampling, objective):
  """(rows, their labels): the prompts, then as many unconditional rows when guided."""
  options.check_objective(objective.kind)
  n = len(prompts)
  labels = np.full((n,), config.num_classes) if labels is None else np.asarray(labels)
  if options.guided:
    if uncond_prompt is None:
      raise ValueError(
          "guidance_scale > 1 needs the unconditional prompt (e.g. [<s>, <|im_start|>], see unconditional_prompt)"
      )
    # Unconditional rows get the null class of the optional label embedding, as in training.
    return list(prompts) + [uncond_prompt] * n, np.concatenate([labels, np.full((n,), config.num_classes)])
  return list(prompts), labels


def sample_images(
    params,
    config: ModelConfig,
    objective,
    prompts: Sequence[Sequence[int]],
    *,
    options: ImageSampling,
    uncond_prompt: Optional[Sequence[int]] = None,
    labels=None,
    rng=None,
    sample_ids=None,
    pad_to: int = 0,
    mesh=None,
    rules=None,
) -> np.ndarray:
  """Images (B, H, W, C) for token-id prompts that end with `<|im_start|>`, prefix cached.

  Sample n's noise comes from fold_in(rng, sample_ids[n]) (default 0..B-1): a sample does not
  depend on the batch it is drawn in (bit for bit when `pad_to` fixes the padded prompt length,
  e.g. to the longest prompt of a class list). `labels` feed the optional label embedding.
  """
  rows, row_labels = cfg_rows(config, prompts, uncond_prompt, labels, options, objective)
  ids, lengths = pad_prompts(rows)
  if pad_to > ids.shape[1]:
    ids = np.pad(ids, ((0, 0), (0, pad_to - ids.shape[1])))
  if int(lengths.max()) + span_length(config) > config.max_position_embeddings:
    raise ValueError(
        f"prompt of {int(lengths.max())} tokens + {span_length(config)} image tokens "
        f"exceed max_position_embeddings={config.max_position_embeddings}"
    )
  rng = jax.random.key(0) if rng is None else rng
  sample_ids = np.arange(len(prompts)) if sample_ids is None else np.asarray(sample_ids)
  with mesh_context(mesh, rules):
    out = _sample_cached(
        params,
        jnp.asarray(ids),
        jnp.asarray(lengths),
        jnp.asarray(row_labels, jnp.int32),
        rng,
        jnp.asarray(sample_ids, jnp.int32),
        objective,
        config=config,
        options=options,
    )
  return to_host(out)


# ----------------------------------------------------------------------------------------------
# The official way (for tests and benchmarks): the whole sequence at every step.


def full_sequence_batch(config: ModelConfig, prompts, labels, seq_len: Optional[int] = None):
  shape = image_shape(config)
  seq_len = seq_len or max(len(p) for p in prompts) + span_length(config)
  batch = batch_lib.empty_batch(len(prompts), seq_len, 1, shape)
  for r, ids in enumerate(prompts):
    batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token).add(
        [("text", list(ids), False), ("image", np.zeros(shape, np.float32), int(labels[r]))]
    )
  return {k: v for k, v in batch.items() if k not in ("images", "image_mask", "targets", "loss_mask")}


@functools.partial(jax.jit, static_argnames=("config", "options", "with_lm_head"))
def _sample_full(params, batch, rng, sample_ids, objective, *, config, options, with_lm_head):
  model = MonoFormer(config)

  def model_fn(x, t):
    out = model.apply({"params": params}, batch, x[:, None], t[:, None], return_logits=with_lm_head)
    image = out["image"][:, 0]
    if with_lm_head:  # the official forward also projects every token onto the vocabulary
      image = image + 0.0 * jnp.sum(out["logits"][:, :1, :1])
    return image

  denoise = denoiser(model_fn, options, config.learn_sigma)
  return run_sampler(objective, denoise, rng, sample_ids, image_shape(config), options)


def sample_images_full_recompute(
    params,
    config: ModelConfig,
    objective,
    prompts,
    *,
    options: ImageSampling,
    uncond_prompt=None,
    labels=None,
    rng=None,
    sample_ids=None,
    with_lm_head=False,
) -> np.ndarray:
  """The same samples as `sample_images`, recomputing prompt + image every step (official)."""
  rows, row_labels = cfg_rows(config, prompts, uncond_prompt, labels, options, objective)
  batch = jax.tree.map(jnp.asarray, full_sequence_batch(config, rows, row_labels))
  rng = jax.random.key(0) if rng is None else rng
  sample_ids = np.arange(len(prompts)) if sample_ids is None else np.asarray(sample_ids)
  return np.asarray(
      _sample_full(
          params,
          batch,
          rng,
          jnp.asarray(sample_ids, jnp.int32),
          objective,
          config=config,
          options=options,
          with_lm_head=with_lm_head,
      )
  )
