"""MonoFormer: one LLaMA decoder for next-token prediction and for denoising image tokens.

`MonoFormer.apply({'params': params}, batch, images, timesteps, ...)` returns
  logits  (B, L, V) float32 next-token logits      (when return_logits)
  image   (B, M, H, W, C_out) denoiser output       (when images are given and return_image)
  cache   the updated key/value cache               (when a cache is passed)
The diffusion head runs on the image tokens only, and the LM head is skipped entirely for image-only
work (return_logits=False), which the official code cannot do.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.decoder import Decoder
from monoformer_jax.model.generated_images import GeneratedImageEmbedder
from monoformer_jax.model.image import FinalLayer, gather_tokens, image_token_positions, unpatchify
from monoformer_jax.model.input_images import InputImageEmbedder
from monoformer_jax.model.layers import Linear, constrain, normal_init
from monoformer_jax.model.mask import decoder_mask

__all__ = ["MonoFormer", "dummy_batch", "init_params"]

Array = jax.Array


class MonoFormer(nn.Module):
  """Token embedding -> (input images, generated images) -> decoder -> LM head / diffusion head.

  The parts that group several official parameters (the image paths, the decoder) share this
  module's scope (nn.share_scope): every parameter keeps the flat name of the official checkpoint
  (embed_tokens, x_embedder, t_embedder, layers_0, ..., final_layer), whatever part owns it.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        param_dtype=jnp.float32,
        dtype=cfg.compute_dtype,
        embedding_init=normal_init(cfg.initializer_range, ("vocab", "embed")),
    )
    self.generated_images = GeneratedImageEmbedder(cfg)
    self.input_images = InputImageEmbedder(cfg, self.generated_images)
    self.decoder = Decoder(cfg)
    for part in (self.generated_images, self.input_images, self.decoder):
      nn.share_scope(self, part)
    self.lm_head = Linear((cfg.vocab_size,), 1, ("embed", "vocab"), cfg.compute_dtype, cfg.initializer_range)
    self.final_layer = FinalLayer(cfg)

  def __call__(
      self,
      batch: dict,
      images: Optional[Array] = None,
      timesteps: Optional[Array] = None,
      *,
      cache: Optional[dict] = None,
      cache_index=0,
      return_logits: bool = True,
      return_image: bool = True,
  ) -> dict:
    x = self.embed_tokens(batch["tokens"])
    x, input_tokens = self.input_images(x, batch)  # input_tokens: tokens an input image has
    cond = None  # each generated image's conditioning, which the diffusion head reads too
    if images is not None:
      x, cond = self.generated_images(x, batch, images, timesteps)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    mask, cache_meta = decoder_mask(self.config, batch, input_tokens, cache, cache_index)
    layer_caches = None if cache is None else cache["layers"]
    x, layer_caches = self.decoder(x, batch["positions"], mask, layer_caches, cache_index)
    out = {}
    if cache is not None:
      out["cache"] = {"layers": layer_caches, "meta": cache_meta}
    if return_logits:
      out["logits"] = constrain(
          self.lm_head(x).astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
      )
    if images is not None and return_image:
      out["image"] = self.denoise(x, batch, cond, images.shape[1])
    return out

  def denoise(self, x: Array, batch: dict, cond: Array, num_slots: int) -> Array:
    """The diffusion head on the image tokens of the decoder's output x: (B, M, H, W, C_out)."""
    cfg = self.config
    b, n = x.shape[0], cfg.num_patches
    where = image_token_positions(batch["kinds"], batch["patch_index"], num_slots * n)
    h_img = gather_tokens(x, where).reshape(b, num_slots, n, cfg.hidden_size)
    # One modulation per image, broadcast over its patches (not one per token).
    y = self.final_layer(h_img, cond[:, :, None, :])
    self.sow("intermediates", "final_layer_out", y.reshape(b, num_slots * n, -1))
    return unpatchify(y, cfg.patch_size, cfg.image_height, cfg.image_width)


def dummy_batch(
    config: ModelConfig, batch_size: int = 1, seq_len: Optional[int] = None, num_image_slots: int = 1
) -> tuple[dict, np.ndarray, np.ndarray]:
  """A minimal well-formed batch (one image sample per row), for init and shape inference."""
  n = config.num_patches + int(config.has_t_token)
  seq_len = seq_len or n + 4
  shape = (config.image_height, config.image_width, config.image_channels)
  batch = batch_lib.empty_batch(batch_size, seq_len, num_image_slots, shape)
  for r in range(batch_size):
    rb = batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token)
    rb.add([("text", [1, 2], True), ("image", np.zeros(shape, np.float32), 0), ("text", [2], True)])
  if config.input_feature_dim and config.input_embedder == "im_embedder":  # creates its parameters
    batch["input_features"] = np.zeros((batch_size, 1, 1, config.input_feature_dim), np.float32)
  timesteps = np.zeros((batch_size, num_image_slots), np.float32)
  return batch, batch["images"], timesteps


def init_params(config: ModelConfig, rng: Array) -> dict:
  """Fresh parameters (boxed with their logical axis names; see nn.unbox / nn.get_partition_spec)."""
  batch, images, timesteps = dummy_batch(config)
  model = MonoFormer(config)
  return model.init(rng, batch, images, timesteps)["params"]
