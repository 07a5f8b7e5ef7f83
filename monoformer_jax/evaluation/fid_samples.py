"""Samples for FID: N class-conditional samples whose content depends only on their index.

    python -m monoformer_jax.evaluation.fid_samples --workdir RUN --num_samples 10000 \\
        --out_dir RUN/fid_samples [--chunk 500] [--seed 0]      # then score the shards

Sample i draws its class uniformly from fold_in(seed, i) and its noise from fold_in(seed', i), so
the set of images is the same on 1 device or 8, on one host or many. Work is cut into chunks of
`chunk` consecutive indices; chunk c is produced by process c mod process_count, each chunk's
batch is split over the local devices, and each finished chunk is written to
`out_dir/samples_<start>.npz` (images uint8, labels, indices). Chunks already on disk are skipped,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def sample_labels(seed: int, indices: np.ndarray, num_classes: int) -> np.ndarray:
  """Class of each sample index, uniform, from fold_in(key(seed), index)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
      jnp.asarray(indices, jnp.uint32))
  return np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(keys))


def _chunk_path(out_dir: str, start: int) -> str:
  return os.path.join(out_dir, f"samples_{start:09d}.npz")


def generate(workdir: str, out_dir: str, num_samples: int, *, seed: int = 0, chunk: int = 256,
             devices=None, use_ema: bool = True) -> list[str]:
  """Writes the missing chunks of this process; returns the paths of all chunks of the run."""
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.setup import build_objective, class_names  # pylint: disable=import-outside-toplevel
  config, model_config, params, tok = load_for_inference(workdir, use_ema=use_ema)
  names = class_names(config)
  if not names:
    raise ValueError(f"{workdir}: not a class-conditional run (no class names)")
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.asarray(devices), ("batch",))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  objective = build_objective(config)
  s = config.sampling
  os.makedirs(out_dir, exist_ok=True)
  starts = list(range(0, num_samples, chunk))
  for c, start in enumerate(starts):
    path = _chunk_path(out_dir, start)
    if c % jax.process_count() != jax.process_index() or os.path.exists(path):
      continue
    idx = np.arange(start, min(start + chunk, num_samples))
    # Pad the batch to a multiple of the device count; padded samples are dropped afterwards.
    pad = (-len(idx)) % len(devices)
    padded = np.concatenate([idx, np.full((pad,), idx[-1])])
    labels = sample_labels(seed, padded, len(names))
    with mesh:
      images = ps.sample_class_images(
          params, model_config, objective, tok, labels, names,
          rng=jax.random.key(seed + 1), sample_ids=padded, sampler=s.sampler,
          num_steps=s.num_steps, guidance_scale=s.guidance_scale, cfg_mode=s.cfg_mode,
          eta=s.eta, batch_sharding=NamedSharding(mesh, PartitionSpec("batch")))
    images = ps.to_uint8(ps.decode_images(images, config))[:len(idx)]
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images, labels=labels[:len(idx)], indices=idx)
    os.replace(tmp, path)  # a chunk is either complete on disk or absent
  return [_chunk_path(out_dir, s0) for s0 in starts]


def load_samples(out_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """All chunks of a sample directory, in index order: (images, labels)."""
  paths = sorted(glob.glob(os.path.join(out_dir, "samples_*.npz")))
  paths = [p for p in paths if not p.endswith(".tmp.npz")]
  if not paths:
    raise FileNotFoundError(f"no samples_*.npz in {out_dir}")
  parts = [np.load(p) for p in paths]
  order = np.concatenate([z["indices"] for z in parts])
  if len(np.unique(order)) != len(order):
    raise ValueError(f"{out_dir}: overlapping sample chunks")
  images = np.concatenate([z["images"] for z in parts])
  labels = np.concatenate([z["labels"] for z in parts])
  perm = np.argsort(order)
  return images[perm], labels[perm]


def main():
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  from monoformer_jax.distributed import maybe_initialize_distributed  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--num_samples", type=int, default=10000)
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--score_mnist", action="store_true",
                 help="score with the project's digit classifier (the embedded default)")
  p.add_argument("--inception_weights", help="FID Inception .pth (pt_inception-2015-12-05)")
  p.add_argument("--reference", help="reference statistics: ADM .npz (mu/sigma or arr_0)")
  args = p.parse_args()
  maybe_initialize_distributed()
  generate(args.workdir, args.out_dir, args.num_samples, seed=args.seed, chunk=args.chunk)
  if args.inception_weights and jax.process_index() == 0:
    from monoformer_jax.evaluation import fid, inception, inception_convert  # pylint: disable=import-outside-toplevel
    if not args.reference:
      p.error("--inception_weights needs --reference")
    features = inception.InceptionFeatures(inception_convert.load_fid_inception(
        args.inception_weights), batch_size=100)
    images, _ = load_samples(args.out_dir)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    mu_ref, sigma_ref = fid.load_reference_statistics(args.reference, features)
    out = features(images)
    stats = fid.RunningStatistics().update(out["pool"])
    print(json.dumps({"fid": fid.frechet_distance(stats.mean, stats.covariance, mu_ref, sigma_ref),
                      "inception_score": fid.inception_score(logits=out["logits"])[0],
                      "num_samples": len(images)}))
  if args.score_mnist and jax.process_index() == 0:
    from monoformer_jax.data import mnist  # pylint: disable=import-outside-toplevel
    from monoformer_jax.evaluation import digit_classifier  # pylint: disable=import-outside-toplevel
    images, labels = load_samples(args.out_dir)
    real, _ = mnist.load_mnist5k()
    clf = digit_classifier.load_or_train()
    print(json.dumps({"digit_fid": digit_classifier.digit_fid(images, real, clf),
                      "class_accuracy": digit_classifier.conditional_accuracy(images, labels, clf),
                      "num_samples": len(images)}))


if __name__ == "__main__":
  main()
