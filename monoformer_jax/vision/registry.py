"""The input-image encoders by the name a config gives them (vision/encoders.py: what each is)."""

from __future__ import annotations

from typing import Optional

from monoformer_jax.vision import clip_encoder
from monoformer_jax.vision.encoders import InputEncoder, patch_encoder

ENCODERS = ("none", "patch", "clip")


def input_feature_dim(kind: str, image_shape, patch_size: int = 4, clip_path: str = "") -> int:
  """The width of `kind`'s features (model.input_feature_dim), without loading any weights."""
  if kind == "patch":
    return patch_encoder(image_shape, patch_size).feature_dim
  if kind == "clip":
    return clip_encoder.clip_feature_dim(clip_path)
  raise ValueError(f"input image encoder {kind!r} has no features (one of {ENCODERS[1:]})")


def make_input_encoder(
    kind: str, image_shape, *, patch_size: int = 4, clip_path: str = "", clip_layer: int = -2
) -> Optional[InputEncoder]:
  """The encoder `kind` names (None for "none")."""
  if kind == "none":
    return None
  if kind == "patch":
    return patch_encoder(image_shape, patch_size)
  if kind == "clip":
    return clip_encoder.clip_input_encoder(clip_path, image_shape, clip_layer)
  raise ValueError(f"input image encoder {kind!r} is not one of {ENCODERS}")
