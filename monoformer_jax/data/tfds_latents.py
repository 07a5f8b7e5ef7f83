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

import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from monoformer_jax import paths

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


class LatentSource:
  """A TFDS ArrayRecord split as a grain source: {"mean", "logvar", "index", ["label"],
  ["prompt"] (str)}, in stored order; `class_names` for label-conditioned prompts."""

  def __init__(self, data_dir: str, split: str = "train", class_names=None):
    if not (epath.Path(data_dir) / NAME).is_dir():
      raise FileNotFoundError(f"{data_dir}: no {NAME} dataset (write it with write_latents)")
    self.data_dir, self.split = data_dir, split
    self.class_names = list(class_names) if class_names is not None else None
    self._source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
    self.num_skipped_at_index = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    ex = dict(self._source[i])
    if "prompt" in ex and isinstance(ex["prompt"], bytes):
      ex["prompt"] = ex["prompt"].decode("utf-8")
    if "label" in ex:
      ex["label"] = int(ex["label"])
    return ex

  def __repr__(self) -> str:
    return f"LatentSource(data_dir={self.data_dir!r}, split={self.split!r}, n={len(self)})"


def latent_source(data_dir: str, split: str = "train", class_names=None) -> LatentSource:
  """Reads a split written by `write_latents` through `tfds.data_source`."""
  return LatentSource(data_dir, split, class_names)
