"""What an input image (one the model reads) becomes before the transformer: features that the
model's `im_embedder` maps into the sequence, Q tokens of width D per image.

  patch   the image's own patches, flattened: pixels, or VAE latents (the official main
          branch's alternative to CLIP: a frozen VAE's patch tokens). No parameters.
  clip    a frozen CLIP vision tower's hidden states of one layer without the CLS token (the
          official main branch: ViT-L/14, the penultimate layer, 256 tokens of 1024).

An encoder runs as its own jitted call on the batch the data pipeline gives (`input_images` ->
`input_features`), outside the train step: a frozen tower's parameters are an argument of that
call, never constants baked into the step's program, and no gradient reaches them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from monoformer_jax.model.image import patchify


def patch_features(images: jax.Array, patch: int) -> jax.Array:
  """(B, K, H, W, C) -> (B, K, H/p * W/p, C * p * p): raster order, each patch flattened as the
  generated images are (model.patchify: channel, then row, then column), so a model that reads
  through its own x_embedder (model.input_embedder='x_embedder') sees the same vectors."""
  return patchify(images, patch)


@dataclasses.dataclass(frozen=True)
class InputEncoder:
  """Maps `input_images` (B, K, H, W, C) to `input_features` (B, K, tokens, feature_dim)."""

  kind: str
  image_shape: tuple
  tokens: int
  feature_dim: int
  fn: Callable  # (params, images) -> features; pure, traceable
  params: Any = None

  def __call__(self, images) -> jax.Array:
    return _jit(self.fn)(self.params, images)

  def encode_batch(self, batch: dict) -> dict:
    """The batch with `input_images` replaced by their `input_features`."""
    out = {k: v for k, v in batch.items() if k != "input_images"}
    out["input_features"] = self(batch["input_images"])
    return out

  def feature_spec(self, batch_size: int, slots: int):
    return jax.ShapeDtypeStruct((batch_size, slots, self.tokens, self.feature_dim), jnp.float32)


_jit = functools.cache(jax.jit)  # one jitted function (and its compile cache) per encoder fn


def _patch_fn(patch: int):
  def encode(params, images):
    del params
    return patch_features(images.astype(jnp.float32), patch)

  return encode


def patch_encoder(image_shape, patch: int) -> InputEncoder:
  h, w, c = image_shape
  if h % patch or w % patch:
    raise ValueError(f"input images of shape {tuple(image_shape)} do not split into {patch}x{patch} patches")
  return InputEncoder("patch", tuple(image_shape), (h // patch) * (w // patch), patch * patch * c, _patch_fn(patch))
