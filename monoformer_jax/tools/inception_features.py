"""Inception pool features and logits of a batch of images, with weights from a pytorch-fid `.pth`.

  python -m monoformer_jax.tools.inception_features \\
      --weights pt_inception-2015-12-05-6726825d.pth --images IN.npz --out OUT.npz

IN.npz holds uint8 images (N, H, W, 3) under `arr_0` (the ADM sample/reference-batch layout) or
under the only key, or under --key. OUT.npz gets `pool` (N, 2048) and `logits` (N, 1008), float32.
Running pytorch-fid on the same images and comparing checks the weight conversion.
"""

import sys

import numpy as np
from absl import flags
from etils import epath

from monoformer_jax import cli, paths
from monoformer_jax.evaluation import inception, inception_convert


def _select_images(path: str, key: str | None) -> np.ndarray:
  with paths.load_npz(path) as data:
    keys = sorted(data.files)
    if key is None:
      if "arr_0" in keys:
        key = "arr_0"
      elif len(keys) == 1:
        key = keys[0]
      else:
        raise ValueError(f"{path} holds {keys}; name the images' array with --key")
    if key not in keys:
      raise ValueError(f"{path} has no array {key!r} (it holds {keys})")
    images = data[key]
  if images.dtype != np.uint8:
    raise ValueError(f"{path}[{key!r}] must be uint8 images in [0, 255], got dtype {images.dtype}")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{path}[{key!r}] must have shape (N, H, W, 3), got {images.shape}")
  if len(images) == 0:
    raise ValueError(f"{path}[{key!r}] holds no images")
  return images


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string(
      "weights", None, "pytorch-fid FID Inception weights (pt_inception-2015-12-05-*.pth).", flag_values=fv
  )
  flags.DEFINE_string("images", None, ".npz with uint8 images (N, H, W, 3).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output .npz (pool, logits).", flag_values=fv)
  flags.DEFINE_string("key", None, "Array name in --images (default: arr_0 or the only array).", flag_values=fv)
  flags.DEFINE_integer("batch-size", 50, "Images per Inception batch.", lower_bound=1, flag_values=fv)
  flags.mark_flags_as_required(["weights", "images", "out"], flag_values=fv)


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  if not epath.Path(fv.weights).is_file():
    raise cli.UsageError(
        f"--weights: no such file: {fv.weights} (the FID Inception .pth must be "
        "supplied locally; nothing is downloaded)"
    )
  if not epath.Path(fv.images).is_file():
    raise cli.UsageError(f"--images: no such file: {fv.images}")
  images = _select_images(fv.images, fv.key)
  try:
    variables = inception_convert.load_fid_inception(fv.weights)
  except inception_convert.ConversionError as err:
    raise cli.UsageError(f"--weights {fv.weights}: {err}") from None
  features = inception.InceptionFeatures(variables, batch_size=fv["batch-size"].value)(images)
  paths.save_npz(fv.out, pool=features["pool"], logits=features["logits"])
  print(f"wrote {fv.out}: pool {features['pool'].shape}, logits {features['logits'].shape}", file=sys.stderr)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
