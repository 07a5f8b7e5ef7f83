"""The trainer's view of the data: one stream per step kind, yielding global sharded batches.

Each process builds its own iterators over its part of the data (grain, per-process shards) with
the local batch size; `next_global` assembles the global array from the process-local rows.
"""

from __future__ import annotations

import numpy as np

from monoformer_jax.model import inputs as inputs_lib
from monoformer_jax.train import sharding as sharding_lib
from monoformer_jax.train.metrics import train_flops_per_step


class DataStream:
  """One iterator's batches for one step kind."""

  def __init__(self, iterator, global_batch_size: int, has_images: bool):
    self.iterator = iterator
    self.global_batch_size = global_batch_size
    self.has_images = has_images
    self._spec = None

  def _local(self) -> dict:
    return next(self.iterator)

  def next_global(self, mesh) -> dict:
    local = self._local()
    if self._spec is None:
      self._spec = {k: (v.shape, v.dtype) for k, v in local.items()}
    return sharding_lib.global_batch(local, mesh)

  def spec(self) -> dict:
    """Example host batch with the global shapes (peeks one batch, then rewinds)."""
    state = self.iterator.get_state()
    local = self._local()
    self.iterator.set_state(state)
    scale = self.global_batch_size // local["tokens"].shape[0]
    return {k: np.zeros((v.shape[0] * scale,) + v.shape[1:], v.dtype) for k, v in local.items()}

  def shapes(self):
    spec = self.spec()
    return spec["tokens"].shape, spec["image_mask"].shape[1]

  def counts(self) -> tuple[float, float]:
    """(tokens, images) processed per step (static upper bound: padded shapes)."""
    (b, l), m = self._shapes_cached()
    return float(b * l), float(b * m if self.has_images else 0)

  def _shapes_cached(self):
    if not hasattr(self, "_shape_cache"):
      self._shape_cache = self.shapes()
    return self._shape_cache

  def flops_per_step(self, model_config, kind: str) -> float:
    (b, l), m = self._shapes_cached()
    image_tokens = model_config.num_patches * m if self.has_images else 0
    return train_flops_per_step(model_config, b, l, image_tokens, lm_head=(kind != "diffusion"))

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)
    self.__dict__.pop("_shape_cache", None)

  def close(self) -> None:
    self.iterator.close()


def _pad_batch(batch: dict, seq_len: int, slots: int, image_shape) -> dict:
  """Pads a batch to `seq_len` positions and `slots` image slots of `image_shape`."""
  b, l = batch["tokens"].shape
  out = inputs_lib.empty_batch(b, seq_len, slots, image_shape)
  for key in inputs_lib.SEQUENCE_KEYS:
    out[key][:, :l] = batch[key]
  m = batch["image_mask"].shape[1]
  if tuple(batch["images"].shape[2:]) == tuple(image_shape):
    out["images"][:, :m] = batch["images"]
    out["image_mask"][:, :m] = batch["image_mask"]
    out["labels"][:, :m] = batch["labels"]
  elif batch["image_mask"].any():
    raise ValueError("cannot pad real images to another image shape")
  return out


class MixedIterator:
  """The official mixed batch: image-generation rows and text rows in one batch (same length)."""

  def __init__(self, image_it, text_it):
    self.image_it, self.text_it = image_it, text_it

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    img, txt = next(self.image_it), next(self.text_it)
    seq_len = max(img["tokens"].shape[1], txt["tokens"].shape[1])
    slots = img["image_mask"].shape[1]
    shape = img["images"].shape[2:]
    img, txt = _pad_batch(img, seq_len, slots, shape), _pad_batch(txt, seq_len, slots, shape)
    return {k: np.concatenate([img[k], txt[k]]) for k in img}

  def get_state(self) -> dict:
    return {"image": self.image_it.get_state(), "text": self.text_it.get_state()}

  def set_state(self, state: dict) -> None:
    self.image_it.set_state(state["image"])
    self.text_it.set_state(state["text"])

  def close(self) -> None:
    self.image_it.close()
    self.text_it.close()
