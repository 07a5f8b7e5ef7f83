"""Images a run writes and returns: model space -> pixels (the run's VAE, if it has one) -> uint8
-> class grids -> PNG files (local or bucket paths)."""

from __future__ import annotations

import functools
import io

import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from monoformer_jax import vae as vae_lib


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 (pixel-space models; latents are decoded before this)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images_uint8: np.ndarray, rows: int) -> np.ndarray:
  """(N, H, W, C) -> one (rows*H, cols*W, C) image, row-major."""
  n, h, w, c = images_uint8.shape
  cols = int(np.ceil(n / rows))
  out = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    out[r * h : (r + 1) * h, k * w : (k + 1) * w] = images_uint8[i]
  return out


def save_png(path, image_hwc: np.ndarray) -> None:
  """One (H, W, 1 or 3) uint8 image as a PNG at `path` (any etils.epath path)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  img = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  path.write_bytes(buf.getvalue())


@functools.lru_cache(maxsize=4)
def _load_vae(path: str):
  return vae_lib.load_diffusers_vae(path)


def decode_images(images, vae_path: str = "", vae_scale: float = 1.0) -> np.ndarray:
  """Model-space images -> pixels in [-1, 1]: latents through the VAE folder `vae_path` (with its
  scaling factor `vae_scale`); pixel-space images (no VAE) pass through."""
  if not vae_path:
    return np.asarray(images)
  vae_config, vae_params = _load_vae(str(vae_path))
  return np.asarray(vae_lib.decode_latents(vae_params, jnp.asarray(images), scale=vae_scale, config=vae_config))
