"""The unified attention mask, built from per-token arrays with static shapes.

    allowed(q, k) = same_segment(q, k) and valid(k) and
                    (order(k) <= order(q)  or  (bidirectional and gen(q) and gen(k) and same_image(q, k)))

Text is causal; the tokens of one generated image see each other in both directions and see the
text before them causally; later text sees the whole image; packed samples (segments) never see
each other. The official code merges every generated span of a row into one bidirectional block
(it allows one generated image per sample); here each image is its own block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monoformer_jax.batch import KIND_IMAGE

Array = jax.Array


def token_meta(segment_ids: Array, kinds: Array, patch_index: Array, num_patches: int, order: Array) -> dict:
  """Per-token attributes the mask needs. `image_id` is -1 for non-image tokens."""
  is_image = kinds == KIND_IMAGE
  image_id = jnp.where(is_image, patch_index // num_patches, -1)
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
