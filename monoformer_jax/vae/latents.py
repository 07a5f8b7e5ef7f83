"""Pipeline-facing VAE calls: images <-> scaled latents, jitted per (config, dtype).

    latents = encode_to_latents(params, images, rng)             # N x 32 x 32 x 4 for 256^2 images
    images = decode_latents(params, latents)                      # back to N x 256 x 256 x 3
    latents = sample_latents(mean, logvar, rng)                   # from cached moments

`config` defaults to SD-VAE (stabilityai/sd-vae-ft-mse); pass the one `load_diffusers_vae`
returned for anything else. Latents are scaled as diffusers does: (z - shift) * scale, and
decode_latents undoes it; MonoFormer uses scale 0.18215, shift 0.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from monoformer_jax.vae.autoencoder_kl import SD_VAE_FT_MSE, AutoencoderKL, VAEConfig


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def encode_moments(params, images, *, config: VAEConfig = SD_VAE_FT_MSE, dtype=jnp.float32):
  """Images N x H x W x C in [-1, 1] -> (mean, logvar), each float32 N x H/f x W/f x latent."""
  model = AutoencoderKL(config, dtype)
  return model.apply({"params": params}, images, method=model.encode)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _decode(params, z, *, config, dtype):
  model = AutoencoderKL(config, dtype)
  return model.apply({"params": params}, z, method=model.decode)


def sample_latents(mean, logvar, rng: jax.Array, scale: float = 0.18215, shift: float = 0.0):
  """(mean + exp(logvar / 2) * eps - shift) * scale: one draw from the encoder's Gaussian."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps - shift) * scale


def _check_images(images, config: VAEConfig):
  if images.ndim != 4 or images.shape[-1] != config.in_channels:
    raise ValueError(f"images must be N x H x W x {config.in_channels} (NHWC), got {images.shape}")
  factor = config.downsample_factor
  if images.shape[1] % factor or images.shape[2] % factor:
    raise ValueError(f"image height and width must be multiples of {factor}, got {images.shape[1:3]}")


def encode_to_latents(
    params,
    images,
    rng: Optional[jax.Array] = None,
    sample: bool = True,
    scale: float = 0.18215,
    *,
    shift: float = 0.0,
    config: VAEConfig = SD_VAE_FT_MSE,
    dtype=jnp.float32,
):
  """Images in [-1, 1] -> scaled latents: a sample (needs `rng`) or, with sample=False, the mean."""
  _check_images(images, config)
  mean, logvar = encode_moments(params, images, config=config, dtype=dtype)
  if not sample:
    return (mean - shift) * scale
  if rng is None:
    raise ValueError("sample=True needs an rng key (or pass sample=False for the mean)")
  return sample_latents(mean, logvar, rng, scale, shift)


def decode_latents(
    params, latents, scale: float = 0.18215, *, shift: float = 0.0, config: VAEConfig = SD_VAE_FT_MSE, dtype=jnp.float32
):
  """Scaled latents N x h x w x latent_channels -> float32 images (about [-1, 1]; not clipped)."""
  if latents.ndim != 4 or latents.shape[-1] != config.latent_channels:
    raise ValueError(f"latents must be N x h x w x {config.latent_channels}, got {latents.shape}")
  return _decode(params, latents / scale + shift, config=config, dtype=dtype)
