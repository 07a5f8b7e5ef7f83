"""Input images: the images a sample reads (image understanding), as its KIND_INPUT_IMAGE tokens.

They arrive as features (B, K, Q, D) from an encoder outside the model (vision/): K image slots,
Q tokens an image. `model.input_embedder` picks what maps them to the hidden width:
  im_embedder  the official main branch's own MLP (Linear, GELU, Linear), any feature width;
  x_embedder   the generation path (generated_images.py) at t = 0: the model's own patches only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.image import place_input_tokens
from monoformer_jax.model.layers import normal_init, zeros_init

Array = jax.Array


def check_input_features(config: ModelConfig, features: Array) -> None:
  if not config.input_feature_dim:
    raise ValueError("the batch holds input_features but model.input_feature_dim is 0")
  width = features.shape[-1]
  if width != config.input_feature_dim:
    raise ValueError(f"input_features have width {width}, model.input_feature_dim is {config.input_feature_dim}")


class InputImageEmbedder(nn.Module):
  """im_embedder_fc1 / im_embedder_fc2 (the official names), or `generation`'s x_embedder path.

  MonoFormer shares its scope with this module (nn.share_scope): the MLP's parameters keep their
  top-level names. `generation` is MonoFormer's GeneratedImageEmbedder, passed in (and so shared,
  not copied) for input_embedder='x_embedder'.
  """

  config: ModelConfig
  generation: nn.Module

  def setup(self):
    self.im_embedder_fc1 = self._dense(("patch", "embed"))
    self.im_embedder_fc2 = self._dense(("embed", "embed_out"))

  def __call__(self, x: Array, batch: dict) -> tuple[Array, int]:
    """x with the batch's input images in place, and Q, their tokens an image (1 without any:
    the attention mask's default)."""
    if "input_features" not in batch:
      return x, 1
    features = batch["input_features"]
    check_input_features(self.config, features)
    b, k, q, d = features.shape
    if self.config.input_embedder == "x_embedder":
      return self.generation.embed_clean(x, batch, features), q
    h = self.im_embedder_fc2(nn.gelu(self.im_embedder_fc1(features.reshape(b, k * q, d)), approximate=False))
    return place_input_tokens(x, h, batch["kinds"], batch["patch_index"]), q

  def _dense(self, axes: tuple) -> nn.Dense:
    return nn.Dense(
        self.config.hidden_size,
        param_dtype=jnp.float32,
        dtype=self.config.compute_dtype,
        kernel_init=normal_init(0.02, axes),
        bias_init=zeros_init(axes[1:]),
    )
