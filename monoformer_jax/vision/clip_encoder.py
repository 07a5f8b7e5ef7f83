"""The `clip` input encoder: a frozen CLIP vision tower (a local transformers folder) reading the
images of understanding rows, as the official main branch does with ViT-L/14 (its penultimate
layer without CLS: 256 tokens of 1024)."""

from __future__ import annotations

from monoformer_jax.vision import encoders
from monoformer_jax.vision.clip import clip_image_features, clip_preprocess
from monoformer_jax.vision.convert import load_clip_config, load_clip_vision


def clip_feature_dim(path: str) -> int:
  if not path:
    raise ValueError("clip_path: the clip encoder needs a transformers CLIPVisionModel / CLIPModel folder")
  return load_clip_config(path).hidden_size


def clip_input_encoder(path: str, image_shape, layer: int = -2) -> encoders.InputEncoder:
  """Images (B, K, H, W, C) in the model's pixel space ([-1, 1], 1 or 3 channels) -> CLIP's
  preprocessing (resize, centre crop, CLIP's mean / std) -> the tower's `layer`, CLS dropped."""
  if not path:
    raise ValueError("clip_path: the clip encoder needs a transformers CLIPVisionModel / CLIPModel folder")
  config, params = load_clip_vision(path)
  tokens, width = config.num_patches, config.hidden_size

  def encode(params, images):
    b, k = images.shape[:2]
    pixels = (images.reshape((b * k,) + images.shape[2:]) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    features = clip_image_features(params, config, clip_preprocess(pixels, config.image_size, max_value=1.0), layer)
    return features.reshape(b, k, tokens, width)

  return encoders.InputEncoder("clip", tuple(image_shape), tokens, width, encode, params)
