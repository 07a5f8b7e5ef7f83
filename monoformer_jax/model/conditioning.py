"""How an image's noise level (and class) conditions the decoder.

The timestep embedder (plus, with `num_classes`, a label embedding) makes one vector per image
slot, `cond` (B, M, hidden). `model.t_embed` says how it enters the sequence:
  adaln_before_decoder     the image's tokens are shifted and scaled by it (adaLN) before layer 0;
  add_before_image_tokens  it is projected into one extra token (the t-token) before the image.
The diffusion head (image.FinalLayer) reads the same vector.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.image import TimestepEmbedder, gather_tokens
from monoformer_jax.model.layers import normal_init, zeros_init

Array = jax.Array


def per_slot(values: Array, slot: Array) -> Array:
  """values (B, M, D) per image slot, slot (B, L) -> (B, L, D); a broadcast when M == 1."""
  if values.shape[1] == 1:
    return jnp.broadcast_to(values, (values.shape[0], slot.shape[1], values.shape[2]))
  return gather_tokens(values, slot)


class ImageConditioning(nn.Module):
  """t_embedder, label_embedder, adaln_module and t_projector_fc1/fc2 (the official names).

  MonoFormer shares its scope with this module (nn.share_scope), so these parameters and the
  intermediates sown here ("c_embeds") sit at the top level, where checkpoints and the official
  converter expect them. A layer creates its parameters on first use: a model of one `t_embed`
  variant has none of the other's.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.t_embedder = TimestepEmbedder(cfg)
    self.label_embedder = nn.Embed(
        cfg.num_classes + 1,  # the last index is the null class (classifier-free guidance)
        cfg.hidden_size,
        param_dtype=jnp.float32,
        embedding_init=normal_init(0.02, ("classes", "embed")),
    )
    self.adaln_module = _dense(2 * cfg.hidden_size, ("embed", "cond"), stddev=0.0)
    self.t_projector_fc1 = _dense(cfg.hidden_size, ("embed", "embed_out"), stddev=0.02)
    self.t_projector_fc2 = _dense(cfg.hidden_size, ("embed", "embed_out"), stddev=0.0)

  def __call__(self, timesteps: Array, labels: Array) -> Array:
    """cond (B, M, hidden), float32, for timesteps and labels (B, M)."""
    cond = self.t_embedder(timesteps)
    return cond + self.label_embedder(labels) if self.config.num_classes else cond

  def adaln_before_decoder(self, x: Array, is_image: Array, slot: Array, cond: Array) -> Array:
    """x with its image tokens (`is_image` (B, L, 1)) modulated by their slot's `cond`."""
    hidden = self.config.hidden_size
    c = self.adaln_module(nn.silu(cond))
    self.sow("intermediates", "c_embeds", c)
    c_tok = per_slot(c, slot)
    # The official code names the first chunk "scale" but adds it: port by position.
    modulated = x.astype(jnp.float32) * (1 + c_tok[..., hidden:]) + c_tok[..., :hidden]
    return jnp.where(is_image, modulated.astype(self.config.compute_dtype), x)

  def add_t_tokens(self, x: Array, kinds: Array, slot: Array, cond: Array) -> Array:
    """x with each t-token (KIND_T_TOKEN) replaced by its slot's projected `cond`."""
    t_tok = self.t_projector_fc2(nn.gelu(self.t_projector_fc1(cond), approximate=False))
    self.sow("intermediates", "c_embeds", t_tok)
    is_t = (kinds == batch_lib.KIND_T_TOKEN)[..., None]
    return jnp.where(is_t, per_slot(t_tok, slot).astype(self.config.compute_dtype), x)


def _dense(features: int, axes: tuple, stddev: float) -> nn.Dense:
  """A float32 Dense with zero bias; stddev 0 zero-initialises the kernel too (the official
  init of the adaLN and of the t-projector's output, so a fresh model ignores `cond`)."""
  kernel_init = zeros_init(axes) if stddev == 0.0 else normal_init(stddev, axes)
  return nn.Dense(features, param_dtype=jnp.float32, kernel_init=kernel_init, bias_init=zeros_init(axes[1:]))
