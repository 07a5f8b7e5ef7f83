"""Precomputed image latents as a TFDS ArrayRecord dataset (no TensorFlow needed).

As the official `tools/extract_vae_features.py`, we store the VAE posterior (mean and logvar, NHWC)
rather than one sample, and draw a fresh latent at train time:

    latent = (mean + exp(0.5 * logvar) * N(0, 1)) * scale        (SD-VAE: scale = 0.18215)

Only `tfds.features.Tensor` features are used (Image / Text features need TensorFlow to write);
prompts are string Tensors. Each example also stores its `index` in the input arrays, because TFDS
shuffles examples by key when it writes.

    write_latents(data_dir, {"train": {"mean": m, "logvar": lv, "label": y}})
    src = latent_source(data_dir, "train")        # tfds.data_source -> grain-ready source
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from google.protobuf import message as protobuf_message

from monoformer_jax import paths
from monoformer_jax.data import sources

NAME = "monoformer_latents"


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """Our datasets are never on the TFDS bucket. TFDS's lookup there (with GCS disabled) runs
  after it has made a temporary directory, and left one empty /tmp/tmp*tfds behind per write."""

  def initialize_from_bucket(self) -> None:
    return None


class MonoformerLatents(tfds.core.GeneratorBasedBuilder):
  """Latent mean/logvar (float32, HWC) + index, and optionally a label (int64) and a prompt."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "mean, logvar, index, optional label / prompt."}

  # TFDS looks for a checksums file next to the builder's code through `importlib_resources`,
  # which tensorflow-datasets 4.9.10 uses without depending on it (ModuleNotFoundError when our
  # package is installed). We download nothing, so there is no code path to look in.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(
      self,
      *,
      splits: dict | None = None,
      latent_shape=None,
      with_label: bool = True,
      with_prompt: bool = False,
      **kwargs,
  ):
    # The arrays to write, and the feature layout; only needed when preparing.
    self._splits = splits
    self._latent_shape = tuple(latent_shape) if latent_shape is not None else None
    self._with_label, self._with_prompt = with_label, with_prompt
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    if self._latent_shape is None:  # reading: the stored dataset_info.json has the features
      return _LocalDatasetInfo(builder=self)
    features = {
        "mean": tfds.features.Tensor(shape=self._latent_shape, dtype=np.float32),
        "logvar": tfds.features.Tensor(shape=self._latent_shape, dtype=np.float32),
        "index": tfds.features.Tensor(shape=(), dtype=np.int64),
    }
    if self._with_label:
      features["label"] = tfds.features.Tensor(shape=(), dtype=np.int64)
    if self._with_prompt:
      features["prompt"] = tfds.features.Tensor(shape=(), dtype=np.str_)
    return _LocalDatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(arrays) for name, arrays in self._splits.items()}

  def _generate_examples(self, arrays):
    for i in range(len(arrays["mean"])):
      ex = {"mean": arrays["mean"][i], "logvar": arrays["logvar"][i], "index": i}
      if self._with_label:
        ex["label"] = int(arrays["label"][i])
      if self._with_prompt:
        ex["prompt"] = str(arrays["prompt"][i])
      yield i, ex


def write_latents(data_dir: str, splits: dict[str, dict]) -> str:
  """Writes {split: {"mean", "logvar" (N, H, W, C) float32, ["label"] (N,), ["prompt"] (N,) str}}
  as ArrayRecord under data_dir/monoformer_latents/1.0.0 and returns that directory."""
  if not splits:
    raise ValueError("write_latents: no splits")
  shape, with_label, with_prompt = None, None, None
  for name, arrays in splits.items():
    mean, logvar = np.asarray(arrays["mean"]), np.asarray(arrays["logvar"])
    if mean.ndim != 4 or mean.shape != logvar.shape:
      raise ValueError(
          f"split {name!r}: mean {mean.shape} / logvar {logvar.shape}: expected the same (N, H, W, C) shape"
      )
    for key in ("label", "prompt"):
      if key in arrays and len(arrays[key]) != len(mean):
        raise ValueError(f"split {name!r}: {len(arrays[key])} {key}s for {len(mean)} latents")
    keys = ("label" in arrays, "prompt" in arrays)
    if shape is None:
      shape, (with_label, with_prompt) = mean.shape[1:], keys
    elif mean.shape[1:] != shape or keys != (with_label, with_prompt):
      raise ValueError(f"split {name!r}: latent shape or fields differ from the other splits")
  target = epath.Path(data_dir) / NAME / str(MonoformerLatents.VERSION)
  if target.exists():  # TFDS would silently keep the old data
    raise FileExistsError(f"{target}: a latents dataset is already there; use another data_dir")
  if not paths.is_local(data_dir):
    # ArrayRecord writes local files only (it reads gs:// itself): the dataset is built in a
    # temporary folder, copied up whole, and the temporary folder removed.
    with tempfile.TemporaryDirectory(prefix="monoformer_latents_") as tmp:
      paths.copy_tree(write_latents(tmp, splits), target)
    return str(target)
  builder = MonoformerLatents(
      splits=splits,
      latent_shape=shape,
      with_label=with_label,
      with_prompt=with_prompt,
      data_dir=data_dir,
      file_format="array_record",
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.data_dir


class CorruptShardError(OSError):
  """An ArrayRecord shard that does not read as one (truncated, overwritten, missing): a fault of
  the file, not of a record, so never skipped as a bad record (an OSError, as gzip's BadGzipFile)."""


class _CheckedShards:
  """The split's `tfds.data_source`, checking each shard file the first time a record of it is read.

  A truncated shard opens without complaint and reads as empty records; a damaged one fails with a
  bare RuntimeError from inside the reader, naming no file. So a shard must open as ArrayRecord and
  hold the records dataset_info.json promises, and read errors name the shard: CorruptShardError.
  Checked lazily, so that opening a split of many shards (on a bucket) reads none of them.
  """

  def __init__(self, source, split: str):
    self._source = source
    instructions = source.dataset_info.splits[split].file_instructions
    self._shards = [(os.fspath(f.filename), int(f.skip) + int(f.take)) for f in instructions]
    self._ends = np.cumsum([int(f.take) for f in instructions])
    self._checked: set[int] = set()

  def __len__(self) -> int:
    return len(self._source)

  def __getattr__(self, name: str):  # dataset_info & co.; never during unpickling (dunders, _source)
    if name.startswith("__") or name == "_source":
      raise AttributeError(name)
    return getattr(self._source, name)

  def __getitem__(self, i):
    k = int(np.searchsorted(self._ends, int(i), side="right"))
    if k >= len(self._shards):
      return self._source[i]  # out of range: the source's own IndexError
    if k not in self._checked:
      self._check(k)
    try:
      return self._source[i]
    except RuntimeError as e:  # the reader's: "Corrupted Riegeli/records file: ..."
      raise CorruptShardError(f"{self._shards[k][0]}: unreadable ArrayRecord data ({e})") from e

  def _check(self, k: int) -> None:
    filename, needed = self._shards[k]
    problem = None
    try:
      reader = array_record_module.ArrayRecordReader(filename, "readahead_buffer_size:0")
      ok, found = reader.ok(), reader.num_records()
      reader.close()  # a reader that failed to open raises its reason here
    except (RuntimeError, ValueError) as e:
      ok, found, problem = False, 0, str(e)
    if not ok or found < needed:
      raise CorruptShardError(
          f"{filename}: truncated or corrupt ArrayRecord shard: "
          + (problem or f"it holds {found} records, dataset_info.json says {needed}")
      )
    self._checked.add(k)


def _open_split(data_dir: str, split: str) -> _CheckedShards:
  """`tfds.data_source` with its failures named: TFDS raises JSON, protobuf or assertion errors
  for a dataset_info.json / features.json that is not what it wrote."""
  try:
    source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
  except OSError:
    raise
  except Exception as e:  # ParseError, JSONDecodeError, AssertionError, ValueError (unknown split)
    raise ValueError(f"{data_dir}/{NAME}: cannot open split {split!r} ({type(e).__name__}: {e})") from e
  return _CheckedShards(source, split)


class LatentSource(sources.Source):
  """A TFDS ArrayRecord split as a grain source: {"mean", "logvar", "index", ["label"],
  ["prompt"] (str)}, in stored order; `class_names` for label-conditioned prompts.

  A record that does not decode (a latent of another shape than the dataset's, bytes that are no
  example), a label outside `class_names` or a prompt that is not UTF-8 is a bad record
  (`sources.Source`): an error naming the shard file and the record, or skipped and counted with
  `skip_bad_records=True`.
  """

  def __init__(self, data_dir: str, split: str = "train", class_names=None, skip_bad_records: bool = False):
    if not (epath.Path(data_dir) / NAME).is_dir():
      raise FileNotFoundError(f"{data_dir}: no {NAME} dataset (write it with write_latents)")
    self.data_dir, self.split, self.skip_bad_records = data_dir, split, skip_bad_records
    self.class_names = list(class_names) if class_names is not None else None
    self._source = _open_split(data_dir, split)
    self.num_skipped_at_index = 0
    info = self._source.dataset_info
    self.latent_shape = tuple(info.features["mean"].shape)
    self.has_prompts = "prompt" in info.features  # captioned images (extract_latents of image-text JSONL)
    # Record i's shard file and place in it, for messages: the source reads the split's file
    # instructions in order, `take` records each from `skip` on.
    instructions = info.splits[split].file_instructions
    self._files = [(os.fspath(f.filename), int(f.skip)) for f in instructions]
    self._file_ends = np.cumsum([int(f.take) for f in instructions])

  def __len__(self) -> int:
    return len(self._source)

  def record_name(self, i: int) -> str:
    k = int(np.searchsorted(self._file_ends, i, side="right"))
    if k >= len(self._files):
      return f"{self.data_dir} split {self.split!r}: record {i}"
    path, skip = self._files[k]
    first = int(self._file_ends[k - 1]) if k else 0
    return f"{path}: record {skip + i - first} (split {self.split!r} record {i})"

  def __getitem__(self, i: int):
    try:
      ex = dict(self._source[i])
    except _UNDECODABLE as e:
      # TFDS's parser fails deep inside (a bare reshape ValueError for a latent of another size).
      return self._bad(f"{self.record_name(i)}: unreadable latent record ({type(e).__name__}: {e})")
    for key in ("mean", "logvar"):
      if np.shape(ex[key]) != self.latent_shape:
        return self._bad(
            f"{self.record_name(i)}: {key} of shape {np.shape(ex[key])}, expected the dataset's {self.latent_shape}"
        )
    if "prompt" in ex and isinstance(ex["prompt"], bytes):
      try:
        ex["prompt"] = ex["prompt"].decode("utf-8")
      except UnicodeDecodeError as e:
        return self._bad(f"{self.record_name(i)}: prompt is not UTF-8 text ({e.reason} at byte {e.start})")
    if "label" in ex:
      ex["label"] = int(ex["label"])
      names = self.class_names
      if names is not None and not 0 <= ex["label"] < len(names):
        return self._bad(
            f"{self.record_name(i)} (input record {int(ex['index'])}) has class id {ex['label']}, "
            f"outside 0..{len(names) - 1} (the {len(names)} class names of data.class_names_file or the dataset)"
        )
    return ex

  def __repr__(self) -> str:
    return f"LatentSource(data_dir={self.data_dir!r}, split={self.split!r}, n={len(self)})"


# What TFDS's example parser raises for a record that is not an example of the dataset's features;
# read errors (OSError) are not records' faults and are left to propagate.
_UNDECODABLE = (ValueError, TypeError, KeyError, protobuf_message.DecodeError)


def latent_source(
    data_dir: str, split: str = "train", class_names=None, skip_bad_records: bool = False
) -> LatentSource:
  """Reads a split written by `write_latents` through `tfds.data_source`."""
  return LatentSource(data_dir, split, class_names, skip_bad_records)
