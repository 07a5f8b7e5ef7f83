"""The run's input-image encoder (image understanding), built from `config.input_images`."""

from __future__ import annotations

from typing import Optional

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run.config import input_image_shape
from monoformer_jax.vision.encoders import InputEncoder
from monoformer_jax.vision import registry as vision_registry


def build_input_encoder(config, model_config: ModelConfig) -> Optional[InputEncoder]:
  """What turns the images a run reads into `input_features` (None when it reads none)."""
  enc = config.input_images
  return vision_registry.make_input_encoder(
      enc.encoder,
      input_image_shape(model_config, enc),
      patch_size=enc.patch_size,
      clip_path=enc.clip_path,
      clip_layer=enc.clip_layer,
  )
