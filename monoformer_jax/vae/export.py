"""Our Flax VAE -> a diffusers AutoencoderKL folder (config.json + safetensors weights).

    save_diffusers_vae("runs/mnist_vae/vae", config, params, sample_size=28)
    config, params = load_diffusers_vae("runs/mnist_vae/vae")      # the same arrays back

The folder is what `AutoencoderKL.save_pretrained` writes, so diffusers loads it too; it is the
inverse of `convert.load_diffusers_vae`.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from monoformer_jax import paths
from monoformer_jax.vae.autoencoder_kl import VAEConfig
from monoformer_jax.vae.convert import params_to_state_dict

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def diffusers_config(config: VAEConfig, sample_size: int) -> dict:
  """diffusers' AutoencoderKL config.json fields for `config` (what config_from_diffusers reads)."""
  blocks = len(config.block_out_channels)
  return {
      "_class_name": "AutoencoderKL",
      "_diffusers_version": "0.42.1",
      "in_channels": config.in_channels,
      "out_channels": config.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * blocks,
      "up_block_types": ["UpDecoderBlock2D"] * blocks,
      "block_out_channels": list(config.block_out_channels),
      "layers_per_block": config.layers_per_block,
      "act_fn": "silu",
      "latent_channels": config.latent_channels,
      "norm_num_groups": config.norm_num_groups,
      "sample_size": int(sample_size),
      "scaling_factor": float(config.scaling_factor),
      "shift_factor": float(config.shift_factor) if config.shift_factor else None,
      "latents_mean": None,
      "latents_std": None,
      "force_upcast": True,
      "use_quant_conv": config.use_quant_conv,
      "use_post_quant_conv": config.use_post_quant_conv,
      "mid_block_add_attention": config.mid_block_add_attention,
  }


def save_diffusers_vae(path: str, config: VAEConfig, params, sample_size: int) -> str:
  """Writes path/config.json and path/diffusion_pytorch_model.safetensors; returns path.

  Each file is written atomically (`paths.write_bytes_atomic`), so an interrupted save leaves no
  half file. `path`: a local folder or any etils.epath path.
  """
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

  epath.Path(path).mkdir(parents=True, exist_ok=True)
  state = params_to_state_dict(jax.device_get(nn.unbox(params)))
  state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
  paths.write_bytes_atomic(os.path.join(path, WEIGHTS_NAME), save(state))
  config_text = json.dumps(diffusers_config(config, sample_size), indent=2)
  paths.write_text_atomic(os.path.join(path, "config.json"), config_text)
  return path
