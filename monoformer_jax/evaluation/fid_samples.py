"""Samples for FID: N class-conditional samples whose content depends only on their index.

    python -m monoformer_jax.evaluation.fid_samples --workdir RUN --num_samples 10000 \\
        --out_dir RUN/fid_samples [--chunk 500] [--seed 0]      # then score the shards

Sample i draws its class uniformly from its own key stream and its image through
`monoformer_jax.sampling.classes` with sample id i: the image `InferenceModel.sample_labels`
returns for that label, index and seed, the same on 1 device or 8, on one host or many. Work is
cut into chunks of `chunk` consecutive indices; chunk c is produced by process c mod
process_count, each chunk's batch is split over the local devices, and each finished chunk is
written to `out_dir/samples_<start>.npz` (images uint8, labels, indices). Chunks already on disk
are skipped, so an interrupted run resumes where it stopped. `out_dir/manifest.json` records the
seed, chunk size and checkpoint step (resuming with others would mix two sample sets) and the
number of samples, so `load_samples` can check that every chunk is there before anything is
scored.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils

from monoformer_jax import cli, paths
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.distributed import maybe_initialize_distributed
from monoformer_jax.evaluation import image_suites
from monoformer_jax.evaluation import sample_dirs
from monoformer_jax.evaluation.sample_dirs import load_samples  # noqa: F401  (the public name)
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.run import images as images_lib
from monoformer_jax.run import open as open_lib
from monoformer_jax.sampling import classes as classes_lib

# Labels come from fold_in(fold_in(key(seed), LABEL_STREAM), i), noise from fold_in(key(seed), i)
# (sample ids stay below LABEL_STREAM): two streams of one seed.
LABEL_STREAM = 0xFFFFFFFF


def sample_labels(seed: int, indices: np.ndarray, num_classes: int) -> np.ndarray:
  """Class of each sample index, uniform, from its own key stream of `seed`."""
  root = jax.random.fold_in(jax.random.key(seed), LABEL_STREAM)
  keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices, jnp.uint32))
  return np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(keys))


def generate(
    workdir: str,
    out_dir: str,
    num_samples: int,
    *,
    seed: int = 0,
    chunk: int = 256,
    devices=None,
    use_ema: bool = True,
    mesh: str = "",
    dtype=None,
) -> list[str]:
  """Writes the missing chunks of this process; returns the paths of all chunks of the run.

  Each process draws its chunks on its local devices (`devices`): by default each holds the
  whole model and takes a share of the batch; `mesh` ('fsdp=4,tensor=2') shards the weights
  over them instead, for a model one device cannot hold."""
  if num_samples < 1 or chunk < 1:
    raise ValueError(f"num_samples and chunk must be positive, got {num_samples} and {chunk}")
  devices = list(devices or jax.local_devices())
  mesh = open_lib.mesh_from_spec(mesh or "", devices)
  run = open_lib.open_run(workdir, use_ema=use_ema, dtype=dtype, mesh=mesh)
  if not run.class_names:
    raise ValueError(f"{workdir}: not a class-conditional run (no class names)")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  sample_dirs.check_and_write_manifest(
      out_dir,
      {
          "scheme": sample_dirs.SCHEME,
          "num_samples": int(num_samples),
          "chunk": int(chunk),
          "seed": int(seed),
          "use_ema": bool(use_ema),
          "step": run.step,
          **({"dtype": dtype} if dtype not in (None, "float32") else {}),
          "workdir": paths.absolute(workdir),
      },
  )

  def draw(idx, padded):
    labels = sample_labels(seed, padded, len(run.class_names))
    images = classes_lib.sample_classes(
        run.params,
        run.model_config,
        run.objective,
        run.tokenizer,
        run.class_names,
        labels,
        options=run.image_sampling,
        seed=seed,
        sample_ids=padded,
        batch_size=len(padded),
        mesh=mesh,
        rules=run.rules,
    )
    images = images_lib.to_uint8(images_lib.decode_images(images, run.config.vae.path, run.config.vae.scale))
    return images[: len(idx)], labels[: len(idx)]

  return sample_dirs.draw_missing_chunks(out_dir, num_samples, chunk, len(devices), draw)


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string("workdir", None, "Training run directory.", flag_values=fv)
  flags.DEFINE_string("out_dir", None, "Where the sample chunks go.", flag_values=fv)
  flags.DEFINE_integer("num_samples", 10000, "Samples to draw.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("chunk", 256, "Samples per chunk file.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the labels and the noise.", flag_values=fv)
  flags.DEFINE_string(
      "mesh", "", "Shard the weights over each process's devices, e.g. 'fsdp=4' (default: replicated).", flag_values=fv
  )
  flags.DEFINE_enum("dtype", None, list(open_lib.DTYPES), "Weights' dtype (default: float32).", flag_values=fv)
  flags.DEFINE_bool(
      "score_mnist", False, "Score with the project's digit classifier (the embedded default).", flag_values=fv
  )
  flags.DEFINE_string(
      "classifier_cache",
      "",
      "Where the digit classifier is cached (default: ~/.cache/monoformer_jax).",
      flag_values=fv,
  )
  flags.DEFINE_string("inception_weights", None, "FID Inception .pth (pt_inception-2015-12-05).", flag_values=fv)
  flags.DEFINE_string(
      "reference", None, "Reference statistics: ADM .npz (mu/sigma or arr_0) or an image folder.", flag_values=fv
  )
  flags.DEFINE_integer("inception_batch_size", 100, "Inception batch size.", lower_bound=1, flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out_dir"], flag_values=fv)


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  if fv.inception_weights and not fv.reference:
    raise cli.UsageError("--inception_weights needs --reference")
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later run loads what this one compiles (compilation_cache.py)
  logging.set_verbosity(logging.WARNING)
  maybe_initialize_distributed()
  generate(fv.workdir, fv.out_dir, fv.num_samples, seed=fv.seed, chunk=fv.chunk, mesh=fv.mesh, dtype=fv.dtype)
  if jax.process_count() > 1:
    # Chunks are dealt round-robin to the processes: process 0 may score only once every process
    # has written its share (load_samples would otherwise fail, or race a chunk's write).
    multihost_utils.sync_global_devices("fid_samples: every chunk written")
  if jax.process_index() != 0 or not (fv.inception_weights or fv.score_mnist):
    return 0
  images, labels = load_samples(fv.out_dir, fv.num_samples, fv.chunk)
  report = {}
  if fv.inception_weights:
    report["fid"] = image_suites.fid_suite(
        images, fv.inception_weights, fv.reference, batch_size=fv.inception_batch_size
    )
  if fv.score_mnist:
    report["mnist"] = image_suites.mnist_suite(images, labels, cache_dir=fv.classifier_cache)
  print(json.dumps(report, indent=2, sort_keys=True))
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
