"""The unified attention mask, built from per-token arrays with static shapes.

    allowed(q, k) = same_segment(q, k) and valid(k) and
                    (order(k) <= order(q)  or  (bidirectional and same_image(q, k)))

Text is causal; the tokens of one generated image see each other in both directions and see the
text before them causally; later text sees the whole image; packed samples (segments) never see
each other. The official code merges every generated span of a row into one bidirectional block
(it allows one generated image per sample); here each image is its own block. An input image (one
the model reads: image understanding) is a bidirectional block of its own too when
`model.bidirectional_input_image` (the official main branch keeps it causal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monoformer_jax.batch import KIND_IMAGE, KIND_INPUT_IMAGE

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
