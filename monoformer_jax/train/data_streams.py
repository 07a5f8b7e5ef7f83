"""The trainer's view of the data: one stream per step kind, yielding global sharded batches.

Each process builds its own iterators over its part of the data (grain, per-process shards) with
the local batch size; `next_global` assembles the global array from the process-local rows.
`get_state` gathers every process's position into one state (what the checkpoint stores: orbax
writes it from the first process alone), which resumes on any number of processes.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax import batch as batch_lib
from monoformer_jax.data import conversations, interleaved, pipeline, registry
from monoformer_jax.data import understanding
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run import config as config_lib
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run.input_encoder import build_input_encoder
from monoformer_jax.train.metrics import train_flops_per_step


class DataStream:
  """One iterator's batches for one step kind."""

  def __init__(self, iterator, global_batch_size: int, has_images: bool, encoder=None):
    """`encoder` (vision/encoders.InputEncoder): turns the batch's input images into the features
    the model reads, on the devices, before the step."""
    self.iterator = iterator
    self.global_batch_size = global_batch_size
    self.has_images = has_images
    self.encoder = encoder
    self._spec = None

  def _local(self) -> dict:
    return next(self.iterator)

  def next_global(self, mesh) -> dict:
    local = self._local()
    if self._spec is None:
      self._spec = {k: (v.shape, v.dtype) for k, v in local.items()}
    batch = sharding_lib.global_batch(local, mesh)
    return self.encoder.encode_batch(batch) if self.encoder is not None else batch

  def spec(self) -> dict:
    """Example host batch with the global shapes (peeks one batch, then rewinds)."""
    state = self.iterator.get_state()
    local = self._local()
    self.iterator.set_state(state)
    scale = self.global_batch_size // local["tokens"].shape[0]
    spec = {k: np.zeros((v.shape[0] * scale,) + v.shape[1:], v.dtype) for k, v in local.items()}
    if self.encoder is not None:
      b, k = spec.pop("input_images").shape[:2]
      spec["input_features"] = np.zeros(self.encoder.feature_spec(b, k).shape, np.float32)
    return spec

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
    return train_flops_per_step(model_config, b, l, image_tokens, lm_head=kind != "diffusion")

  def get_state(self) -> dict:
    """Every process's position (a collective: all processes call it at the same step)."""
    return _combined(_gather_json(self.iterator.get_state()))

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)
    self.__dict__.pop("_shape_cache", None)

  def skipped_records(self) -> int:
    """Bad records this process skipped so far (data.skip_bad_records), over the whole run."""
    return int(self.iterator.stats["skipped_records"])

  def close(self) -> None:
    self.iterator.close()


def _gather_json(obj) -> list:
  """`obj` (JSON) of every process, in process order; a collective."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.int32(data.size))))
  size = -(-longest // 256) * 256  # few distinct sizes: each new one compiles the gather again
  rows = np.asarray(multihost_utils.process_allgather(np.pad(data, (0, size - data.size))))
  return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


def _combined(states: list) -> dict:
  """`pipeline.combine_states` at each iterator's place in the states (a MixedIterator's nest)."""
  if "version" in states[0]:
    return pipeline.combine_states(states)
  return {key: _combined([s[key] for s in states]) for key in states[0]}


def _pad_batch(batch: dict, seq_len: int, slots: int, image_shape, input_slots=None) -> dict:
  """Pads a batch to `seq_len` positions and `slots` image slots of `image_shape`; with
  `input_slots` (input_images, input_mask of another batch) it gets input slots of their shape,
  empty where it has none."""
  b, l = batch["tokens"].shape
  out = batch_lib.empty_batch(b, seq_len, slots, image_shape)
  for key in batch_lib.SEQUENCE_KEYS:
    out[key][:, :l] = batch[key]
  m = batch["image_mask"].shape[1]
  if tuple(batch["images"].shape[2:]) == tuple(image_shape):
    out["images"][:, :m] = batch["images"]
    out["image_mask"][:, :m] = batch["image_mask"]
    out["labels"][:, :m] = batch["labels"]
  elif batch["image_mask"].any():
    raise ValueError("cannot pad real images to another image shape")
  if input_slots is not None:  # rows that read images beside rows that do not
    images, mask = input_slots
    out["input_images"] = np.zeros((b,) + images.shape[1:], images.dtype)
    out["input_mask"] = np.zeros((b,) + mask.shape[1:], bool)
    if "input_images" in batch:
      out["input_images"][:], out["input_mask"][:] = batch["input_images"], batch["input_mask"]
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
    inputs = (img["input_images"], img["input_mask"]) if "input_images" in img else None
    img, txt = _pad_batch(img, seq_len, slots, shape, inputs), _pad_batch(txt, seq_len, slots, shape, inputs)
    return {k: np.concatenate([v, txt[k]]) for k, v in img.items()}

  def get_state(self) -> dict:
    return {"image": self.image_it.get_state(), "text": self.text_it.get_state()}

  def set_state(self, state: dict) -> None:
    self.image_it.set_state(state["image"])
    self.text_it.set_state(state["text"])

  @property
  def stats(self) -> dict:
    return {"skipped_records": self.image_it.stats["skipped_records"] + self.text_it.stats["skipped_records"]}

  def close(self) -> None:
    self.image_it.close()
    self.text_it.close()


def image_iterator(config, model_config: ModelConfig, tokenizer, batch_size: int, input_tokens: int = 0, **options):
  """The diffusion rows `config.data` describes, `batch_size` rows a batch (this process's);
  `input_tokens`: the tokens of a read image once encoded (data.read_fraction > 0); `options` go
  to the pipeline as they are (e.g. num_epochs, shard_index, shard_count)."""
  d = config.data
  image_shape = (model_config.image_height, model_config.image_width, model_config.image_channels)
  options = dict(
      batch_size=batch_size,
      patch_size=model_config.patch_size,
      t_token=model_config.has_t_token,
      seed=config.seed,
      image_shape=image_shape,
      text_dropout=d.prompt_dropout,
      train_text=d.lm_loss_on_image_prompts,
      latent_scale=d.latent_scale,
      seq_len=d.image_seq_len or None,
      class_names=registry.class_names(d),
      null_label=model_config.num_classes if model_config.num_classes else None,
      num_threads=max(d.worker_count, 1),
      **options,
  )
  source = registry.image_source(d, image_shape)
  options["max_prompt_tokens"] = d.max_prompt_tokens if registry.free_text_prompts(d, source) else None
  if d.max_images_per_row > 1:  # documents of 1..N images, each its own block and noise level
    if d.read_fraction:
      options.update(input_fraction=d.read_fraction, input_tokens=input_tokens)
    return interleaved.make_interleaved_iterator(source, tokenizer, max_images=d.max_images_per_row, **options)
  return pipeline.make_image_iterator(source, tokenizer, **options)


def text_iterator(config, model_config: ModelConfig, tokenizer, batch_size: int, **options):
  """The text rows `config.data` describes (as `image_iterator`)."""
  d = config.data
  return pipeline.make_text_iterator(
      registry.text_source(d),
      tokenizer,
      batch_size=batch_size,
      seq_len=d.text_seq_len,
      seed=config.seed + 1,
      packing=d.packing,
      template=d.chat_template,
      image_shape=(model_config.image_height, model_config.image_width, model_config.image_channels),
      num_threads=max(d.worker_count, 1),
      **options,
  )


def build_data(config, model_config: ModelConfig, tokenizer, step_kinds) -> dict:
  """{step kind: DataStream} for every kind in `step_kinds`."""
  d = config.data
  procs = jax.process_count()

  def image_it(batch):
    return image_iterator(config, model_config, tokenizer, batch // procs, reader.tokens if reader else 0)

  def text_it(batch):
    return text_iterator(config, model_config, tokenizer, batch // procs)

  def understand_it(batch, encoder):
    if d.understand_source in registry.CONVERSATION_SOURCES:
      return conversations.make_conversation_iterator(
          registry.conversation_source(d, input_shape),
          tokenizer,
          batch_size=batch // procs,
          seq_len=d.understand_seq_len,
          input_shape=input_shape,
          input_tokens=encoder.tokens,
          template=d.chat_template,
          seed=config.seed + 2,
          num_threads=max(d.worker_count, 1),
      )
    source, answers = registry.understand_source(d, input_shape)
    return understanding.make_understanding_iterator(
        source,
        tokenizer,
        batch_size=batch // procs,
        input_shape=input_shape,
        input_tokens=encoder.tokens,
        class_names=answers,
        question=d.understand_question,
        seed=config.seed + 2,
        latent_scale=d.latent_scale,
        max_shift=d.understand_max_shift,
        num_threads=max(d.worker_count, 1),
    )

  input_shape = config_lib.input_image_shape(model_config, config.input_images)
  reads = "understand" in step_kinds or d.read_fraction > 0
  encoder = build_input_encoder(config, model_config) if reads else None
  reader = encoder if d.read_fraction > 0 else None  # image rows that read images too
  streams = {}
  if "understand" in step_kinds:
    streams["understand"] = DataStream(
        understand_it(d.understand_batch_size, encoder), d.understand_batch_size, False, encoder
    )
  if "diffusion" in step_kinds:
    streams["diffusion"] = DataStream(image_it(d.image_batch_size), d.image_batch_size, True, reader)
  if "ar" in step_kinds:
    streams["ar"] = DataStream(text_it(d.text_batch_size), d.text_batch_size, False)
  if "mixed" in step_kinds:
    total = d.image_batch_size + d.text_batch_size
    mixed = MixedIterator(image_it(d.image_batch_size), text_it(d.text_batch_size))
    streams["mixed"] = DataStream(mixed, total, True, reader)
  return streams
