"""AutoencoderKL (the Stable-Diffusion VAE) in Flax Linen, with diffusers' architecture and numerics.

NHWC throughout. An image in [-1, 1] (N x H x W x in_channels) is encoded to a diagonal Gaussian
over N x H/f x W/f x latent_channels (f = 2**(len(block_out_channels) - 1), 8 for SD-VAE):

    model = AutoencoderKL(config)
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    images = model.apply({"params": params}, latents_unscaled, method=model.decode)

Parameters are float32 (`param_dtype`); `dtype` is the compute dtype. Group norms and the
attention softmax always run in float32, as diffusers upcasts them. Parameter logical axes:
  conv kernels            ('conv_height', 'conv_width', 'conv_in', 'conv_out')
  attention projections   ('conv_in', 'conv_out')     (a 1x1 convolution in all but name)
  biases                  ('conv_out',)
  group-norm scale / bias ('norm',)
The VAE is small (84M parameters for SD-VAE), so rules normally map all of these to None
(replicated); only the batch is sharded ('activation_batch').
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The diffusers AutoencoderKL config fields this port uses (see convert.config_from_diffusers)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  norm_eps: float = 1e-6  # diffusers hard-codes 1e-6 in the VAE's resnets, attention and out norms

  def __post_init__(self):
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(
            f"norm_num_groups={self.norm_num_groups} does not divide block channels "
            f"{channels} (block_out_channels={self.block_out_channels})"
        )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# stabilityai/sd-vae-ft-mse (the VAE MonoFormer uses): 256x256x3 -> 32x32x4, scale 0.18215.
SD_VAE_FT_MSE = VAEConfig()


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding="SAME"):
  if padding == "SAME":  # explicit, symmetric, as PyTorch's padding=k//2
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=padding,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
  )


def _dense(features: int, dtype, name: str):
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
  )


class GroupNorm(nn.Module):
  """PyTorch GroupNorm numerics (two-pass variance) in float32, output in the compute dtype.

  Written out rather than nn.GroupNorm so that the parameters sit directly under the norm's name
  ('norm1/scale'), one level like every other layer, which keeps the diffusers key mapping flat.
  """

  groups: int
  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (channels,), jnp.float32
    )
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (channels,), jnp.float32
    )
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, channels // self.groups)
    reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # all but batch and group
    mean = grouped.mean(axis=reduce_axes, keepdims=True)
    var = jnp.square(grouped - mean).mean(axis=reduce_axes, keepdims=True)
    y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    broadcast = (1,) * (x.ndim - 1) + (channels,)
    return (y * scale.reshape(broadcast) + bias.reshape(broadcast)).astype(self.dtype)


class ResnetBlock(nn.Module):
  """norm-SiLU-conv twice, plus a 1x1 shortcut when the channel count changes (no time input)."""

  out_channels: int
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    groups, eps = self.config.norm_num_groups, self.config.norm_eps
    h = nn.silu(GroupNorm(groups, eps, self.dtype, name="norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(GroupNorm(groups, eps, self.dtype, name="norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all H*W positions (head dim = channels), residual."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = GroupNorm(self.config.norm_num_groups, self.config.norm_eps, self.dtype, name="group_norm")(x).reshape(
        batch, height * width, channels
    )
    q = _dense(channels, self.dtype, "query")(h)
    k = _dense(channels, self.dtype, "key")(h)
    v = _dense(channels, self.dtype, "value")(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * channels**-0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v)
    out = _dense(channels, self.dtype, "out")(out)
    return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  """resnet, attention (optional), resnet, at the lowest resolution."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.config, self.dtype, name="resnets_0")(x)
    if self.config.mid_block_add_attention:
      x = SpatialSelfAttention(self.config, self.dtype, name="attention")(x)
    return ResnetBlock(channels, self.config, self.dtype, name="resnets_1")(x)


def _output_head(x, config: VAEConfig, features: int, dtype):
  """conv_norm_out -> SiLU -> conv_out, shared by the encoder and the decoder (called in compact)."""
  x = nn.silu(GroupNorm(config.norm_num_groups, config.norm_eps, dtype, name="conv_norm_out")(x))
  return _conv(features, 3, dtype, "conv_out")(x)


class Encoder(nn.Module):
  """Image -> 2 * latent_channels moments (before quant_conv)."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = _conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x)
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(channels, cfg, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(x)
      if i != last:
        # diffusers pads right/bottom by one, then a VALID stride-2 conv (not symmetric SAME).
        x = _conv(channels, 3, self.dtype, f"down_blocks_{i}_downsample", stride=2, padding=((0, 1), (0, 1)))(x)
    x = MidBlock(cfg, self.dtype, name="mid_block")(x)
    return _output_head(x, cfg, 2 * cfg.latent_channels, self.dtype)


class Decoder(nn.Module):
  """Unscaled latent (after post_quant_conv) -> image."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    channels_top_down = tuple(reversed(cfg.block_out_channels))
    x = _conv(channels_top_down[0], 3, self.dtype, "conv_in")(z)
    x = MidBlock(cfg, self.dtype, name="mid_block")(x)
    for i, channels in enumerate(channels_top_down):
      for j in range(cfg.layers_per_block + 1):  # one more resnet per level than the encoder
        x = ResnetBlock(channels, cfg, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(x)
      if i != len(channels_top_down) - 1:
        batch, height, width, c = x.shape
        x = jax.image.resize(x, (batch, 2 * height, 2 * width, c), method="nearest")
        x = _conv(channels, 3, self.dtype, f"up_blocks_{i}_upsample")(x)
    return _output_head(x, cfg, cfg.out_channels, self.dtype)


def _batch_constraint(x):
  return nn.with_logical_constraint(x, ("activation_batch", None, None, None))


class AutoencoderKL(nn.Module):
  """encode(images) -> (mean, logvar); decode(unscaled latents) -> images. See module docstring."""

  config: VAEConfig = SD_VAE_FT_MSE
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

  def encode(self, images):
    """N x H x W x C in [-1, 1] -> float32 (mean, logvar), logvar clipped to [-30, 20]."""
    moments = self.encoder(_batch_constraint(images.astype(self.dtype)))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = _batch_constraint(moments.astype(jnp.float32))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    """Unscaled latents (latents / scaling_factor + shift) -> images in float32."""
    z = _batch_constraint(latents.astype(self.dtype))
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return _batch_constraint(self.decoder(z).astype(jnp.float32))

  def __call__(self, images):
    """Encode then decode the mean (used by init so that every parameter is created)."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def init_params(config: VAEConfig, rng: jax.Array, image_size: Optional[int] = None) -> dict:
  """Fresh parameters, boxed with their logical axis names (nn.unbox for plain arrays)."""
  size = image_size or 2 * config.downsample_factor
  images = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  # Jitted: op-by-op init of ~100 convolutions takes seconds even on tiny configs.
  return jax.jit(AutoencoderKL(config).init)(rng, images)["params"]
