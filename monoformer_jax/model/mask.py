"""The unified attention mask, built from per-token arrays with static shapes.

    allowed(q, k) = same_segment(q, k) and valid(k) and
                    (order(k) <= order(q)  or  (bidirectional and same_image(q, k)))

Text is causal; the tokens of one generated image see each other in both directions and see the
text before them causally; later text sees the whole image; packed samples (segments) never see
each other. The official code merges every generated span of a row into one bidirectional block
(it allows one generated image per sample); here each image is its own block. An input image (one
the model reads: image understanding) is a bidirectional block of its own too when
`model.bidirectional_input_image` (the official main branch keeps it causal).

`decoder_mask` builds it for one forward pass: with a key/value cache the keys are the cache's
slots, whose attributes the cache keeps (`cache["meta"]`) so that later steps can mask them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monoformer_jax.batch import KIND_IMAGE, KIND_INPUT_IMAGE
from monoformer_jax.model import attention
from monoformer_jax.model.config import ModelConfig

Array = jax.Array


# Input images (read, not generated) get image ids from here on, apart from the generated ones.
INPUT_IMAGE_ID_OFFSET = 1 << 20


def token_meta(
    segment_ids: Array,
    kinds: Array,
    patch_index: Array,
    num_patches: int,
    order: Array,
    *,
    input_tokens: int = 1,
    bidirectional_input: bool = False,
) -> dict:
  """Per-token attributes the mask needs. `image_id` is -1 for tokens that attend causally only:
  text, t-tokens, and input images unless `bidirectional_input` (each then its own block)."""
  image_id = jnp.where(kinds == KIND_IMAGE, patch_index // num_patches, -1)
  if bidirectional_input:
    input_id = INPUT_IMAGE_ID_OFFSET + patch_index // input_tokens
    image_id = jnp.where(kinds == KIND_INPUT_IMAGE, input_id, image_id)
  return {"segment_ids": segment_ids, "image_id": image_id, "order": order}


def attention_mask(q: dict, k: dict, bidirectional: bool) -> Array:
  """Boolean (B, Lq, Lk) mask from query-side and key-side token attributes."""
  same_segment = q["segment_ids"][:, :, None] == k["segment_ids"][:, None, :]
  valid_key = (k["segment_ids"] > 0)[:, None, :]
  causal = k["order"][:, None, :] <= q["order"][:, :, None]
  allowed = causal
  if bidirectional:
    same_image = (q["image_id"][:, :, None] == k["image_id"][:, None, :]) & (q["image_id"] >= 0)[:, :, None]
    allowed = allowed | same_image
  return same_segment & valid_key & allowed


def kernel_spans(q: dict, k: dict, bidirectional: bool) -> dict:
  """What the flash kernel (model/flash_attention.py) reads instead of the (Lq, Lk) mask: each
  query's segment and reach (the last key position it may see), each key's segment. Key `order`
  must be the key's index (as in the model: positions in the row, or cache slots). An image's
  tokens are contiguous, so a query of a bidirectional image reaches its block's last token."""
  order, image = q["order"], q["image_id"]
  reach = order
  if bidirectional:
    length = image.shape[1]
    after = jnp.concatenate([image[:, 1:], jnp.full_like(image[:, :1], -2)], axis=1)
    ends = jnp.where(image != after, jnp.arange(length, dtype=jnp.int32), length)
    block_end = jax.lax.cummin(ends, axis=1, reverse=True)
    reach = jnp.where(image >= 0, jnp.take_along_axis(order, block_end, axis=1), order)
  return {"q_segment": q["segment_ids"], "q_reach": reach, "k_segment": k["segment_ids"]}


def decoder_mask(config: ModelConfig, batch: dict, input_tokens: int, cache=None, cache_index=0) -> tuple:
  """What the decoder's attention reads for `batch` (B, L) and the updated cache metadata.

  The mask is (B, L, K) boolean, or the flash kernel's spans when the attention runs in it (the
  kernel builds its own tiles); K is L, or the cache's size with a cache. `input_tokens` is the
  number of tokens an input image has (each is a bidirectional block of that many). The cache
  metadata (None without a cache) is `cache["meta"]` with this batch's tokens written at
  `cache_index`.
  """
  b, length = batch["tokens"].shape
  order = jnp.broadcast_to(cache_index + jnp.arange(length, dtype=jnp.int32), (b, length))
  q = token_meta(
      batch["segment_ids"],
      batch["kinds"],
      batch["patch_index"],
      config.num_patches,
      order,
      input_tokens=input_tokens,
      bidirectional_input=config.bidirectional_input_image,
  )
  k, cache_meta = q, None
  if cache is not None:
    cache_meta = {
        key: jax.lax.dynamic_update_slice_in_dim(cache["meta"][key], q[key], cache_index, 1)
        for key in ("segment_ids", "image_id")
    }
    size = cache["meta"]["segment_ids"].shape[1]
    k = dict(cache_meta, order=jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (b, size)))
  impl = attention.resolve(config.attention, config.compute_dtype, config.dim_per_head, length, k["order"].shape[1])
  if impl == "pallas":
    return kernel_spans(q, k, config.bidirectional_image), cache_meta
  return attention_mask(q, k, config.bidirectional_image), cache_meta
