"""The Stable-Diffusion VAE (diffusers AutoencoderKL) in Flax: model, weight conversion, latents."""

from monoformer_jax.vae.autoencoder_kl import SD_VAE_FT_MSE, AutoencoderKL, VAEConfig, init_params
from monoformer_jax.vae.convert import (
    ConversionError,
    config_from_diffusers,
    convert_state_dict,
    load_diffusers_vae,
    params_to_state_dict,
)
from monoformer_jax.vae.latents import (decode_latents, encode_moments, encode_to_latents, sample_latents)
