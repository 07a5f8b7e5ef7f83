"""Samples for FID: N class-conditional samples whose content depends only on their index.

    python -m monoformer_jax.evaluation.fid_samples --workdir RUN --num_samples 10000 \\
        --out_dir RUN/fid_samples [--chunk 500] [--seed 0]      # then score the shards

Sample i draws its class uniformly from fold_in(seed, i) and its noise from fold_in(seed', i), so
the set of images is the same on 1 device or 8, on one host or many. Work is cut into chunks of
`chunk` consecutive indices; chunk c is produced by process c mod process_count, each chunk's
batch is split over the local devices, and each finished chunk is written to
`out_dir/samples_<start>.npz` (images uint8, labels, indices). Chunks already on disk are skipped,
so an interrupted run resumes where it stopped. `out_dir/manifest.json` records the seed, chunk
size and checkpoint step (resuming with others would mix two sample sets) and the number of
samples, so `load_samples` can check that every chunk is there before anything is scored.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MANIFEST = "manifest.json"


def sample_labels(seed: int, indices: np.ndarray, num_classes: int) -> np.ndarray:
  """Class of each sample index, uniform, from fold_in(key(seed), index)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
      jnp.asarray(indices, jnp.uint32))
  return np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(keys))


def _chunk_path(out_dir: str, start: int) -> str:
  return os.path.join(out_dir, f"samples_{start:09d}.npz")


def _chunk_indices(start: int, chunk: int, num_samples: int) -> np.ndarray:
  return np.arange(start, min(start + chunk, num_samples))


def read_manifest(out_dir: str) -> dict | None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _checkpoint_step(workdir: str) -> int:
  from monoformer_jax.train.checkpointing import step_dirs  # pylint: disable=import-outside-toplevel
  return max(step_dirs(workdir), default=0)


# What makes two runs' samples different; num_samples may grow on resume, workdir may move.
_MUST_MATCH = ("seed", "chunk", "use_ema", "step")


def _check_and_write_manifest(out_dir: str, manifest: dict) -> None:
  """Refuses to resume a directory made with another seed / chunk / weights; records num_samples."""
  old = read_manifest(out_dir)
  if old is not None:
    changed = {k: (old.get(k), manifest[k]) for k in _MUST_MATCH if old.get(k) != manifest[k]}
    if changed:
      raise ValueError(f"{out_dir} holds samples made with other settings ("
                       + ", ".join(f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in
                                   sorted(changed.items()))
                       + "); use another --out_dir or the same settings")
  if jax.process_index() == 0:
    path = os.path.join(out_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _chunk_is_complete(path: str, expected: np.ndarray) -> bool:
  """Whether a chunk on disk holds exactly the expected indices (a run with a smaller
  num_samples leaves a short last chunk, which a larger one must redo)."""
  if not os.path.exists(path):
    return False
  with np.load(path) as z:
    return np.array_equal(z["indices"], expected)


def generate(workdir: str, out_dir: str, num_samples: int, *, seed: int = 0, chunk: int = 256,
             devices=None, use_ema: bool = True) -> list[str]:
  """Writes the missing chunks of this process; returns the paths of all chunks of the run."""
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.setup import build_objective, class_names  # pylint: disable=import-outside-toplevel
  if num_samples < 1 or chunk < 1:
    raise ValueError(f"num_samples and chunk must be positive, got {num_samples} and {chunk}")
  config, model_config, params, tok = load_for_inference(workdir, use_ema=use_ema)
  names = class_names(config)
  if not names:
    raise ValueError(f"{workdir}: not a class-conditional run (no class names)")
  os.makedirs(out_dir, exist_ok=True)
  _check_and_write_manifest(out_dir, {"num_samples": int(num_samples), "chunk": int(chunk),
                                      "seed": int(seed), "use_ema": bool(use_ema),
                                      "step": _checkpoint_step(workdir),
                                      "workdir": os.path.abspath(workdir)})
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.asarray(devices), ("batch",))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  objective = build_objective(config)
  starts = list(range(0, num_samples, chunk))
  for c, start in enumerate(starts):
    path = _chunk_path(out_dir, start)
    idx = _chunk_indices(start, chunk, num_samples)
    if c % jax.process_count() != jax.process_index() or _chunk_is_complete(path, idx):
      continue
    # Pad the batch to a multiple of the device count; padded samples are dropped afterwards.
    pad = (-len(idx)) % len(devices)
    padded = np.concatenate([idx, np.full((pad,), idx[-1])])
    labels = sample_labels(seed, padded, len(names))
    with mesh:
      images = ps.sample_class_images(
          params, model_config, objective, tok, labels, names,
          rng=jax.random.key(seed + 1), sample_ids=padded, **ps.image_sampling_options(config),
          batch_sharding=NamedSharding(mesh, PartitionSpec("batch")))
    images = ps.to_uint8(ps.decode_images(images, config))[:len(idx)]
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images, labels=labels[:len(idx)], indices=idx)
    os.replace(tmp, path)  # a chunk is either complete on disk or absent
  return [_chunk_path(out_dir, s0) for s0 in starts]


def _span(indices: np.ndarray) -> str:
  return f"{indices[0]}..{indices[-1]}" if len(indices) else "none"


def load_samples(out_dir: str, num_samples: int | None = None,
                 chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """All samples 0..num_samples-1 of a sample directory, in index order: (images, labels).

  num_samples and chunk default to the directory's manifest. Every chunk of the run must be on
  disk and hold exactly its indices, so each index appears once; otherwise a ValueError names
  the missing chunks or the wrong ones (scoring an incomplete set would bias the FID silently).
  """
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"no such sample directory {out_dir}")
  manifest = read_manifest(out_dir) or {}
  num_samples = num_samples or manifest.get("num_samples")
  chunk = chunk or manifest.get("chunk")
  if not num_samples or not chunk:
    found = len(glob.glob(os.path.join(out_dir, "samples_*.npz")))
    raise ValueError(f"{out_dir}: no {MANIFEST} (found {found} samples_*.npz); pass num_samples "
                     "and chunk to check the chunks against")
  missing, wrong, parts = [], [], []
  for start in range(0, num_samples, chunk):
    path = _chunk_path(out_dir, start)
    expected = _chunk_indices(start, chunk, num_samples)
    if not os.path.exists(path):
      missing.append(f"{os.path.basename(path)} (samples {_span(expected)})")
      continue
    with np.load(path) as z:
      part = {k: z[k] for k in ("images", "labels", "indices")}
    if not np.array_equal(part["indices"], expected) or not (
        len(part["images"]) == len(part["labels"]) == len(expected)):
      wrong.append(f"{os.path.basename(path)} holds samples {_span(part['indices'])} "
                   f"({len(part['images'])} images), expected {_span(expected)}")
    parts.append(part)
  if missing or wrong:
    problems = ([f"{len(missing)} missing chunk(s): " + ", ".join(missing)] if missing else []) + (
        [f"{len(wrong)} wrong chunk(s): " + "; ".join(wrong)] if wrong else [])
    raise ValueError(f"{out_dir}: incomplete samples for num_samples={num_samples}, "
                     f"chunk={chunk}: " + ". ".join(problems))
  order = np.concatenate([p["indices"] for p in parts])
  assert np.array_equal(order, np.arange(num_samples))  # implied by the per-chunk check
  return (np.concatenate([p["images"] for p in parts]),
          np.concatenate([p["labels"] for p in parts]))


def main():
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  import argparse  # pylint: disable=import-outside-toplevel
  from monoformer_jax.distributed import maybe_initialize_distributed  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--num_samples", type=int, default=10000)
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--score_mnist", action="store_true",
                 help="score with the project's digit classifier (the embedded default)")
  p.add_argument("--classifier_cache", default="",
                 help="where the digit classifier is cached (default: ~/.cache/monoformer_jax)")
  p.add_argument("--inception_weights", help="FID Inception .pth (pt_inception-2015-12-05)")
  p.add_argument("--reference", help="reference statistics: ADM .npz (mu/sigma or arr_0) or an "
                 "image folder")
  p.add_argument("--inception_batch_size", type=int, default=100)
  args = p.parse_args()
  if args.inception_weights and not args.reference:
    p.error("--inception_weights needs --reference")
  maybe_initialize_distributed()
  generate(args.workdir, args.out_dir, args.num_samples, seed=args.seed, chunk=args.chunk)
  if jax.process_count() > 1:
    # Chunks are dealt round-robin to the processes: process 0 may score only once every process
    # has written its share (load_samples would otherwise fail, or worse race a chunk's write).
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("fid_samples: every chunk written")
  if jax.process_index() != 0 or not (args.inception_weights or args.score_mnist):
    return
  from monoformer_jax.evaluation import image_suites  # pylint: disable=import-outside-toplevel
  images, labels = load_samples(args.out_dir, args.num_samples, args.chunk)
  report = {}
  if args.inception_weights:
    report["fid"] = image_suites.fid_suite(images, args.inception_weights, args.reference,
                                           batch_size=args.inception_batch_size)
  if args.score_mnist:
    report["mnist"] = image_suites.mnist_suite(images, labels, cache_dir=args.classifier_cache)
  print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
  main()
