"""Inception pool features and logits of a batch of images, with weights from a pytorch-fid `.pth`.

  python -m monoformer_jax.tools.inception_features \\
      --weights pt_inception-2015-12-05-6726825d.pth --images IN.npz --out OUT.npz

IN.npz holds uint8 images (N, H, W, 3) under `arr_0` (the ADM sample/reference-batch layout) or
under the only key, or under --key. OUT.npz gets `pool` (N, 2048) and `logits` (N, 1008), float32.
Running pytorch-fid on the same images and comparing checks the weight conversion.
"""
import argparse
import os
import sys

import numpy as np


def _select_images(path: str, key: str | None) -> np.ndarray:
  with np.load(path) as data:
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


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--weights", required=True,
                      help="pytorch-fid FID Inception weights (pt_inception-2015-12-05-*.pth)")
  parser.add_argument("--images", required=True, help=".npz with uint8 images (N, H, W, 3)")
  parser.add_argument("--out", required=True, help="output .npz (pool, logits)")
  parser.add_argument("--key", default=None, help="array name in --images (default: arr_0 or the "
                      "only array)")
  parser.add_argument("--batch-size", type=int, default=50)
  args = parser.parse_args(argv)
  if not os.path.isfile(args.weights):
    parser.error(f"--weights: no such file: {args.weights} (the FID Inception .pth must be "
                 "supplied locally; nothing is downloaded)")
  if not os.path.isfile(args.images):
    parser.error(f"--images: no such file: {args.images}")
  if args.batch_size < 1:
    parser.error(f"--batch-size must be positive, got {args.batch_size}")
  return args, parser


def main(argv=None) -> int:
  args, parser = parse_args(argv)
  try:
    images = _select_images(args.images, args.key)
  except ValueError as err:
    parser.error(str(err))
  # Imported after argument checks so that usage errors come back without loading JAX.
  from monoformer_jax.evaluation import inception, inception_convert
  try:
    variables = inception_convert.load_fid_inception(args.weights)
  except inception_convert.ConversionError as err:
    parser.error(f"--weights {args.weights}: {err}")
  features = inception.InceptionFeatures(variables, batch_size=args.batch_size)(images)
  np.savez(args.out, pool=features["pool"], logits=features["logits"])
  print(f"wrote {args.out}: pool {features['pool'].shape}, logits {features['logits'].shape}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
