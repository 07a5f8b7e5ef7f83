"""Encodes images with a VAE into a latents dataset (mean and logvar, as the official stores them).

  python -m monoformer_jax.tools.extract_latents --vae runs/mnist_vae/vae --source mnist \
      --out runs/mnist_vae/latents
  python -m monoformer_jax.tools.extract_latents --vae sd-vae-ft-mse/ --source image_folder \
      --input imagenet/train --image_size 256 --out data/imagenet256_latents

Sources: `mnist` (the embedded MNIST-5k; --input may name another mnist_5k.csv.gz; --split picks
train / holdout / all of the fixed 90/10 split), `image_folder` (root/<class>/<image>: labels),
`image_text_jsonl` (lines {"image": path, "prompt": str}, or other field names: --image_key
img_path reads JourneyDB's train_anno.jsonl; comma-separate several files).
Folder and JSONL images get the official ADM centre crop to --image_size (`center_crop_arr`).

Output: DATA_DIR/monoformer_latents/1.0.0 (TFDS ArrayRecord via `write_latents`; read it with
`latent_source(DATA_DIR, SPLIT)`, or train on it with data.image_source=latents /
mnist_latents and data.image_path=DATA_DIR), float32 NHWC mean and logvar (unscaled: the
pipeline draws (mean + exp(logvar / 2) N(0, 1)) * data.latent_scale each time), plus `label`
or `prompt`. Beside it: extraction.json (the VAE, its scaling_factor, counts), class_names.json
(labelled sources: {id: [folder, name]}; a run on these latents reads it unless
data.class_names_file says otherwise; --class_names LOC_synset_mapping.txt turns ImageNet's
WordNet-id folders into human names) and source_index.npy (record -> source position).

Scale: each batch is sharded over a 1-D mesh of the local devices (padded to a multiple of their
number). With several processes (MONOFORMER_DISTRIBUTED=1 and the other variables the trainer
reads, see monoformer_jax/main.py and launch/) chunk c is encoded by process c % process_count,
and process 0 assembles the dataset after a barrier: DATA_DIR must be a filesystem all hosts
share (each process reads its own chunks' images only).
Resume: chunks of --chunk_size records are saved to DATA_DIR/_partial/chunk_NNNNN.npz as they
finish; a rerun with the same arguments skips them (and refuses different arguments).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from monoformer_jax import cli, paths
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.data import image_sources, sources
from monoformer_jax.data.image_sources import center_crop_arr
from monoformer_jax.data.tfds_latents import NAME, write_latents
from monoformer_jax.distributed import maybe_initialize_distributed
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.vae import latents
from monoformer_jax.vae.convert import load_diffusers_vae

SOURCES = ("mnist", "image_folder", "image_text_jsonl")
PARTIAL = "_partial"


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder.", flag_values=fv)
  flags.DEFINE_enum("source", None, list(SOURCES), "What to encode.", flag_values=fv)
  flags.DEFINE_string(
      "input",
      "",
      "Image folder root, JSONL file(s) (comma-separated), or for mnist an optional mnist_5k.csv.gz.",
      flag_values=fv,
  )
  flags.DEFINE_string("out", None, "Output data_dir.", flag_values=fv)
  flags.DEFINE_string(
      "split",
      "train",
      "Split name written (mnist: train, holdout or all, which also selects the digits).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "image_size",
      0,
      "Centre-crop to this size (0: keep; all images must then agree).",
      lower_bound=0,
      flag_values=fv,
  )
  flags.DEFINE_string(
      "class_names",
      None,
      "image_folder: ImageNet's synset mapping (LOC_synset_mapping.txt, or JSON {wnid: name} / "
      "{id: [wnid, name]}), so that class_names.json and the prompts hold human names, not WordNet ids.",
      flag_values=fv,
  )
  flags.DEFINE_string("image_root", None, "image_text_jsonl: resolve relative image paths here.", flag_values=fv)
  flags.DEFINE_string(
      "image_key", "image", "image_text_jsonl: the field holding the image path (JourneyDB: img_path).", flag_values=fv
  )
  flags.DEFINE_string("prompt_key", "prompt", "image_text_jsonl: the field holding the caption.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "Images per encoder batch.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("chunk_size", 4096, "Records per resumable chunk.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("workers", 8, "Image decoding threads.", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("skip_bad_records", False, "Skip (and count) unreadable records.", flag_values=fv)
  flags.DEFINE_bool("keep_partial", False, "Keep DATA_DIR/_partial after assembling.", flag_values=fv)
  flags.DEFINE_enum(
      "dtype",
      "float32",
      ["float32", "bfloat16"],
      "VAE compute dtype (the stored moments are float32).",
      flag_values=fv,
  )
  flags.DEFINE_bool("no_progress", False, "No progress bar.", flag_values=fv)
  for name in (
      "image_size",
      "image_root",
      "batch_size",
      "chunk_size",
      "skip_bad_records",
      "keep_partial",
      "no_progress",
  ):
    flags.DEFINE_alias(name.replace("_", "-"), name, flag_values=fv)
  flags.mark_flags_as_required(["vae", "source", "out"], flag_values=fv)


def _options(fv) -> types.SimpleNamespace:
  """The parsed flags as a plain namespace, checked against each other and the file system."""
  args = types.SimpleNamespace(
      **{
          name: fv[name].value
          for name in (
              "vae",
              "source",
              "input",
              "out",
              "split",
              "image_size",
              "image_root",
              "image_key",
              "prompt_key",
              "class_names",
              "batch_size",
              "chunk_size",
              "workers",
              "skip_bad_records",
              "keep_partial",
              "dtype",
              "no_progress",
          )
      }
  )
  if not epath.Path(args.vae).is_dir():
    raise cli.UsageError(f"--vae: no such directory: {args.vae}")
  if args.source != "mnist" and not args.input:
    raise cli.UsageError(f"--input is required for --source {args.source}")
  for path in (args.input.split(",") if args.input else []):
    want_dir = args.source == "image_folder"
    if not (epath.Path(path).is_dir() if want_dir else epath.Path(path).is_file()):
      raise cli.UsageError(f"--input: no such {'directory' if want_dir else 'file'}: {path}")
  if args.source == "mnist" and args.split not in ("train", "holdout", "all"):
    raise cli.UsageError(f"--split {args.split!r}: mnist splits are train, holdout and all")
  return args


def open_source(args, channels: int):
  """The record source: {"image": uint8 HWC, "label"} or {"image", "prompt"}."""
  size = args.image_size or None
  if args.source == "mnist":
    return sources.MnistSource(split=args.split, path=args.input or None)
  if args.source == "image_folder":
    try:
      names = image_sources.read_synset_names(args.class_names) if args.class_names else None
    except (FileNotFoundError, ValueError) as err:
      raise cli.UsageError(f"--class_names: {err}") from None
    return image_sources.ImageFolderSource(
        args.input, image_size=size, channels=channels, class_names=names, skip_bad_records=args.skip_bad_records
    )
  return image_sources.ImageTextJsonlSource(
      args.input.split(","),
      image_root=args.image_root,
      image_size=size,
      channels=channels,
      image_key=args.image_key,
      prompt_key=args.prompt_key,
      skip_bad_records=args.skip_bad_records,
  )


def to_model_input(image: np.ndarray, image_size: int | None, channels: int) -> np.ndarray:
  """uint8 HWC -> float32 [-1, 1]; MNIST digits get the same centre crop when resized, and
  are repeated to RGB for a 3-channel VAE."""
  if image_size and image.shape[:2] != (image_size, image_size):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    image = np.asarray(center_crop_arr(pil, image_size)).reshape(image_size, image_size, -1)
  if image.shape[-1] == 1 and channels == 3:  # grey digits through an RGB VAE (e.g. SD-VAE)
    image = np.repeat(image, 3, axis=-1)
  if image.shape[-1] != channels:
    raise ValueError(f"image has {image.shape[-1]} channels, the VAE wants {channels}")
  return image.astype(np.float32) / 127.5 - 1.0


class Encoder:
  """Jitted encode_moments over batches sharded across a 1-D mesh of the local devices."""

  def __init__(self, vae_config, params, batch_size: int, dtype):
    devices = jax.local_devices()
    self.mesh = Mesh(np.array(devices), ("batch",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the devices
    self.data_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
    self.config, self.dtype = vae_config, dtype

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    means, logvars = [], []
    for start in range(0, len(images), self.batch_size):
      batch = images[start : start + self.batch_size]
      real = len(batch)
      if real < self.batch_size:  # pad by repetition: one compiled shape for every batch
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - real, axis=0)])
      batch = jax.device_put(batch, self.data_sharding)
      mean, logvar = latents.encode_moments(self.params, batch, config=self.config, dtype=self.dtype)
      means.append(np.asarray(mean, np.float32)[:real])
      logvars.append(np.asarray(logvar, np.float32)[:real])
    return np.concatenate(means), np.concatenate(logvars)


def _fingerprint(args, num_records: int) -> dict:
  """What a resumed run must share with the one that wrote the chunks."""
  vae_hash = hashlib.sha256(epath.Path(args.vae, "config.json").read_bytes()).hexdigest()[:16]
  inputs = [paths.absolute(p) for p in args.input.split(",")] if args.input else []
  return {
      "source": args.source,
      "input": inputs,
      "split": args.split,
      "image_size": args.image_size,
      "chunk_size": args.chunk_size,
      "num_records": num_records,
      "vae_config_sha256": vae_hash,
  }


def _check_manifest(partial: str, fingerprint: dict, is_main: bool) -> None:
  path = os.path.join(partial, "manifest.json")
  if epath.Path(path).exists():
    old = json.loads(epath.Path(path).read_text())
    if old != fingerprint:
      diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
      raise ValueError(
          f"{partial} holds chunks of a different extraction ({diff}, as "
          "(before, now)); rerun with the same arguments or delete it"
      )
  elif is_main:
    epath.Path(partial).mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(path, json.dumps(fingerprint, indent=2))


def chunk_path(partial: str, c: int) -> str:
  return os.path.join(partial, f"chunk_{c:05d}.npz")


def encode_chunk(source, start: int, stop: int, encoder, args, channels, pool) -> dict:
  records = list(pool.map(source.__getitem__, range(start, stop)))
  kept = [(i, r) for i, r in zip(range(start, stop), records) if r is not None]
  if not kept:
    return {"source_index": np.zeros((0,), np.int64)}
  images = [to_model_input(r["image"], args.image_size or None, channels) for _, r in kept]
  shapes = sorted({im.shape for im in images})
  if len(shapes) > 1:
    raise ValueError(
        f"images of several sizes {shapes[:4]} in records {start}..{stop}: pass "
        "--image_size to centre-crop them to one size"
    )
  factor = encoder.config.downsample_factor
  if shapes[0][0] % factor or shapes[0][1] % factor:
    raise ValueError(
        f"{shapes[0][:2]} images do not divide by the VAE's downsampling factor "
        f"{factor}: pass --image_size (a multiple of {factor})"
    )
  mean, logvar = encoder(np.stack(images))
  out = {"mean": mean, "logvar": logvar, "source_index": np.asarray([i for i, _ in kept], np.int64)}
  first = kept[0][1]
  if "label" in first:
    out["label"] = np.asarray([r["label"] for _, r in kept], np.int64)
  if "prompt" in first:
    out["prompt"] = np.asarray([r["prompt"] for _, r in kept], dtype=np.str_)
  return out


def save_chunk(path: str, arrays: dict) -> None:
  paths.save_npz(path, **arrays)  # atomic: a killed run never leaves a half-written chunk


def _write_class_names(args, class_names, folders) -> None:
  """class_names.json: {id: [folder, name]} for a class-folder tree (the run reads the name, the
  folder stays for reference), else a list of names."""
  if folders is not None:
    table = {str(i): [f, n] for i, (f, n) in enumerate(zip(folders, class_names))}
  else:
    table = list(class_names)
  epath.Path(args.out, "class_names.json").write_text(json.dumps(table, indent=0))
  if any(image_sources.WNID.match(n) for n in class_names):
    print(
        "WARNING: class_names.json holds WordNet ids as class names, so prompts will read "
        "'an image of n01440764'; pass --class_names LOC_synset_mapping.txt for human names",
        file=sys.stderr,
    )


def assemble(args, partial: str, num_chunks: int, class_names, vae_config, folders=None) -> str:
  """Concatenates the chunks in order and writes the TFDS dataset and its side files."""
  missing = [c for c in range(num_chunks) if not epath.Path(chunk_path(partial, c)).exists()]
  if missing:
    raise ValueError(
        f"chunks {missing[:5]} are missing from {partial} (with several hosts DATA_DIR must be a shared filesystem)"
    )
  parts = []
  for c in range(num_chunks):
    with paths.load_npz(chunk_path(partial, c)) as data:
      parts.append({k: data[k] for k in data.files})
  parts = [p for p in parts if len(p["source_index"])]
  if not parts:
    raise ValueError("no records could be read (all skipped as bad)")
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  source_index = arrays.pop("source_index")
  if "prompt" in arrays:
    arrays["prompt"] = [str(p) for p in arrays["prompt"]]
  target = write_latents(args.out, {args.split: arrays})
  paths.save_npy(os.path.join(args.out, "source_index.npy"), source_index)
  if class_names is not None:
    _write_class_names(args, class_names, folders)
  info = {
      "vae": paths.absolute(args.vae),
      "scaling_factor": vae_config.scaling_factor,
      "shift_factor": vae_config.shift_factor,
      "split": args.split,
      "num_records": int(len(source_index)),
      "latent_shape": list(arrays["mean"].shape[1:]),
      "source": args.source,
      "input": args.input,
      "image_size": args.image_size,
  }
  epath.Path(args.out, "extraction.json").write_text(json.dumps(info, indent=2))
  if not args.keep_partial:
    epath.Path(partial).rmtree()
  return target


def run(fv, positional) -> int:
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later run loads what this one compiles (compilation_cache.py)
  args = _options(fv)
  if epath.Path(args.out, NAME).exists():
    raise cli.UsageError(f"--out: {args.out} already holds a {NAME} dataset; use another directory")
  maybe_initialize_distributed()  # MONOFORMER_DISTRIBUTED=1: the same environment as training
  try:
    vae_config, params = load_diffusers_vae(args.vae)
  except (FileNotFoundError, ValueError) as err:
    raise cli.UsageError(f"--vae {args.vae}: {err}") from None
  if args.image_size and args.image_size % vae_config.downsample_factor:
    raise cli.UsageError(
        f"--image_size {args.image_size} is not a multiple of the VAE's "
        f"downsampling factor {vae_config.downsample_factor}"
    )
  channels = vae_config.in_channels
  try:
    source = open_source(args, channels)
  except cli.UsageError:
    raise
  except (FileNotFoundError, ValueError) as err:
    raise cli.UsageError(f"--input {args.input}: {err}") from None
  num_records = len(source)
  num_chunks = -(-num_records // args.chunk_size)
  proc, procs = jax.process_index(), jax.process_count()
  partial = os.path.join(args.out, PARTIAL)
  epath.Path(partial).mkdir(parents=True, exist_ok=True)
  _check_manifest(partial, _fingerprint(args, num_records), proc == 0)

  mine = [c for c in range(num_chunks) if c % procs == proc]
  todo = [c for c in mine if not epath.Path(chunk_path(partial, c)).exists()]
  size = lambda c: min(args.chunk_size, num_records - c * args.chunk_size)
  done = sum(size(c) for c in mine if c not in todo)
  if done:
    print(f"resuming: {len(mine) - len(todo)} of {len(mine)} chunks already in {partial}", file=sys.stderr)
  encoder = Encoder(vae_config, params, args.batch_size, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
  with (
      tqdm(
          total=sum(size(c) for c in mine),
          initial=done,
          unit="img",
          disable=args.no_progress or proc != 0,
          desc="encoding",
      ) as bar,
      concurrent.futures.ThreadPoolExecutor(args.workers) as pool,
  ):
    for c in todo:
      start = c * args.chunk_size
      chunk = encode_chunk(source, start, start + size(c), encoder, args, channels, pool)
      save_chunk(chunk_path(partial, c), chunk)
      bar.update(size(c))
  if procs > 1:
    multihost_utils.sync_global_devices("extract_latents_chunks")
  if proc == 0:
    class_names = getattr(source, "class_names", None)
    target = assemble(args, partial, num_chunks, class_names, vae_config, getattr(source, "folders", None))
    print(f"wrote {target}: {args.split} split, scaling_factor {vae_config.scaling_factor}", file=sys.stderr)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
