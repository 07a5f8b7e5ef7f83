"""Encode and decode images with a diffusers AutoencoderKL folder converted to Flax.

  python -m monoformer_jax.tools.vae_roundtrip --vae sd-vae-ft-mse/ --images IN.npz --out OUT.npz

IN.npz holds `images`: float32 (N, H, W, 3) in [-1, 1], H and W multiples of 8 for SD-VAE (or
another name with --key). OUT.npz gets float32 `mean` and `logvar` (N, H/8, W/8, 4): the encoder's
diagonal Gaussian (logvar clipped to [-30, 20] as diffusers does), and `decoded` (N, H, W, 3): the
decoder applied to `mean` (unscaled; no 0.18215 round trip). Running diffusers' AutoencoderKL on
the same images and comparing (`latent_dist.mean`, `.logvar`, `decode(mean).sample`, moved to
NHWC) checks a conversion. The weights must be local; nothing is downloaded.
"""

import sys

import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from monoformer_jax import cli, paths
from monoformer_jax.vae import convert, latents


def _select_images(path: str, key: str | None) -> np.ndarray:
  with paths.load_npz(path) as data:
    keys = sorted(data.files)
    if key is None:
      key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
      if key is None:
        raise ValueError(f"{path} holds {keys} and no 'images'; name the array with --key")
    if key not in keys:
      raise ValueError(f"{path} has no array {key!r} (it holds {keys})")
    images = data[key]
  where = f"{path}[{key!r}]"
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(
        f"{where} must be floating-point images in [-1, 1], got dtype "
        f"{images.dtype} (for uint8 use images / 127.5 - 1)"
    )
  if images.ndim != 4:
    raise ValueError(f"{where} must have shape (N, H, W, C), got {images.shape}")
  if len(images) == 0:
    raise ValueError(f"{where} holds no images")
  if not np.all(np.isfinite(images)):
    raise ValueError(f"{where} holds NaN or infinite values")
  low, high = float(images.min()), float(images.max())
  if low < -1.001 or high > 1.001:  # a little slack for rounding in the caller's scaling
    raise ValueError(f"{where} must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]")
  return images.astype(np.float32)


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string(
      "vae",
      None,
      "diffusers AutoencoderKL folder (config.json + "
      "diffusion_pytorch_model.safetensors or .bin), or a pipeline folder with "
      "vae/.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "images", None, ".npz with float32 images (N, H, W, 3) in [-1, 1] under 'images'.", flag_values=fv
  )
  flags.DEFINE_string("out", None, "Output .npz (mean, logvar, decoded).", flag_values=fv)
  flags.DEFINE_string("key", None, "Array name in --images (default: images, or the only array).", flag_values=fv)
  flags.DEFINE_integer("batch-size", 8, "Images per batch.", lower_bound=1, flag_values=fv)
  flags.DEFINE_enum(
      "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).", flag_values=fv
  )
  flags.mark_flags_as_required(["vae", "images", "out"], flag_values=fv)


def _batched(fn, array: np.ndarray, batch_size: int):
  """fn over fixed-size batches (the last one padded by repetition) so one compilation serves."""
  outputs = []
  for start in range(0, len(array), batch_size):
    batch = array[start : start + batch_size]
    real = len(batch)
    if real < batch_size < len(array):
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    outputs.append([np.asarray(o)[:real] for o in fn(batch)])
  return [np.concatenate(parts) for parts in zip(*outputs)]


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  if not epath.Path(fv.vae).is_dir():
    raise cli.UsageError(
        f"--vae: no such directory: {fv.vae} (a local diffusers AutoencoderKL "
        "folder, e.g. a snapshot of stabilityai/sd-vae-ft-mse)"
    )
  if not epath.Path(fv.images).is_file():
    raise cli.UsageError(f"--images: no such file: {fv.images}")
  try:
    images = _select_images(fv.images, fv.key)
  except ValueError as err:
    raise cli.UsageError(f"--images: {err}") from None
  try:
    config, params = convert.load_diffusers_vae(fv.vae)
  except (FileNotFoundError, ValueError) as err:  # ConversionError is a ValueError
    raise cli.UsageError(f"--vae {fv.vae}: {err}") from None
  factor = config.downsample_factor
  if images.shape[-1] != config.in_channels or images.shape[1] % factor or images.shape[2] % factor:
    raise cli.UsageError(
        f"--images: shape {images.shape} does not fit this VAE: want (N, H, W, "
        f"{config.in_channels}) with H and W multiples of {factor}"
    )
  dtype = jnp.bfloat16 if fv.dtype == "bfloat16" else jnp.float32

  def roundtrip(batch):
    mean, logvar = latents.encode_moments(params, batch, config=config, dtype=dtype)
    decoded = latents.decode_latents(params, mean, scale=1.0, config=config, dtype=dtype)
    return mean, logvar, decoded

  mean, logvar, decoded = _batched(roundtrip, images, fv["batch-size"].value)
  arrays = dict(mean=mean, logvar=logvar, decoded=decoded)
  paths.save_npz(fv.out, **{k: v.astype(np.float32) for k, v in arrays.items()})
  print(f"wrote {fv.out}: mean/logvar {mean.shape}, decoded {decoded.shape}", file=sys.stderr)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
