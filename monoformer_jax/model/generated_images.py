"""Generated images (the ones being denoised) as decoder tokens: the generation path.

Each image is cut into patches, which x_embedder maps to the hidden width and which take the
places of its KIND_IMAGE tokens; they get the 2-D position embedding and the image's conditioning
(model/conditioning.py). With input_embedder='x_embedder' a read image takes the same path as a
clean image (t = 0, the null class), so it looks to the decoder as a finished generated one does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.conditioning import ImageConditioning
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.image import add_position_embedding, gather_tokens, patchify, place_input_tokens
from monoformer_jax.model.layers import zeros_init

Array = jax.Array


def check_images(config: ModelConfig, images: Array, timesteps) -> None:
  if timesteps is None:
    raise ValueError("images were given without timesteps")
  expected = (config.image_height, config.image_width, config.image_channels)
  if images.shape[2:] != expected:
    raise ValueError(f"images have shape {images.shape[2:]} per slot, the model expects {expected}")


class GeneratedImageEmbedder(nn.Module):
  """x_embedder plus ImageConditioning (t_embedder, label_embedder, adaln_module, t_projector).

  MonoFormer shares its scope with this module (nn.share_scope), and this module shares its own
  with the conditioning: every parameter and intermediate keeps its top-level name.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    # The official Conv2d patch embedding (kernel = stride = patch), zero-initialised.
    self.x_embedder = nn.Dense(
        cfg.hidden_size,
        param_dtype=jnp.float32,
        dtype=cfg.compute_dtype,
        kernel_init=zeros_init(("patch", "embed")),
        bias_init=zeros_init(("embed",)),
    )
    self.conditioning = ImageConditioning(cfg)
    nn.share_scope(self, self.conditioning)

  def __call__(self, x: Array, batch: dict, images: Array, timesteps: Array) -> tuple[Array, Array]:
    """x with the tokens of `images` (B, M, H, W, C) at `timesteps` (B, M) in place (and their
    t-tokens); returns x and cond (B, M, hidden), which the diffusion head reads too."""
    cfg = self.config
    check_images(cfg, images, timesteps)
    b, m = images.shape[:2]
    kinds, patch_index = batch["kinds"], batch["patch_index"]
    cond = self.conditioning(timesteps, batch["labels"])
    self.sow("intermediates", "t_emb", cond)
    patches = patchify(images.astype(jnp.float32), cfg.patch_size).reshape(b, m * cfg.num_patches, -1)
    is_image = (kinds == batch_lib.KIND_IMAGE)[..., None]
    x = jnp.where(is_image, gather_tokens(self.x_embedder(patches), patch_index).astype(cfg.compute_dtype), x)
    slot = patch_index // cfg.num_patches  # image slot of image tokens and t-tokens
    if cfg.has_t_token:
      x = self.conditioning.add_t_tokens(x, kinds, slot, cond)
    self.sow("intermediates", "merged_embeds", x)
    return self._position_and_condition(x, is_image, patch_index, slot, cond), cond

  def embed_clean(self, x: Array, batch: dict, features: Array) -> Array:
    """x with the KIND_INPUT_IMAGE tokens of `features` (B, K, num_patches, patch_dim), each
    image embedded as a clean generated one: t = 0, the null class."""
    cfg = self.config
    b, k, q, _ = features.shape
    if q != cfg.num_patches:
      raise ValueError(
          f"input_embedder='x_embedder' reads images of the model's own shape ({cfg.num_patches} patches), "
          f"got {q} patches an image"
      )
    kinds, patch_index = batch["kinds"], batch["patch_index"]
    x = place_input_tokens(x, self.x_embedder(features.reshape(b, k * q, -1).astype(jnp.float32)), kinds, patch_index)
    cond = self.conditioning(jnp.zeros((b, k), jnp.int32), jnp.full((b, k), cfg.num_classes, jnp.int32))
    is_input = (kinds == batch_lib.KIND_INPUT_IMAGE)[..., None]
    slot = jnp.where(is_input[..., 0], patch_index, 0) // cfg.num_patches
    return self._position_and_condition(x, is_input, patch_index, slot, cond)

  def _position_and_condition(self, x, is_image, patch_index, slot, cond):
    """The 2-D position embedding and, for adaln_before_decoder, the adaLN of the image tokens."""
    if self.config.use_pos_embed:
      x = add_position_embedding(x, is_image, patch_index, self.config)
    if self.config.t_embed == "adaln_before_decoder":
      x = self.conditioning.adaln_before_decoder(x, is_image, slot, cond)
    return x
