"""grain pipelines: source -> seeded global shuffle per epoch -> per-process stride -> rows.

    MapDataset.source(src)
      .shuffle(seed).repeat(epochs)    a fresh permutation every epoch, a pure function of the seed
      [index::count]                   this process's records: every count-th of the global stream
                                       (disjoint, covering), so the union of the processes' k-th
                                       batches is the single-process k-th batch
      .map_with_index(make_sample)     tokenize / decode; per-sample randomness (template, CFG
                                       dropout, latent noise) from rng(seed, global position), so a
                                       sample does not depend on the number of processes
      .to_iter_dataset(ReadOptions)    threads read ahead, in order
    BatchIterator                      lays samples into rows (RowBuilder): one per row, or packed

Everything before the `BatchIterator` is random access, so a position in the stream is one integer.
The iterator's state is the grain state of the first sample not yet placed in a returned batch
(a sample read but not fitting the last row is handed back), so `set_state(get_state())` resumes at
exactly the batches a run without the interruption would have seen. The state is a small JSON dict.

That state is one process's. A checkpoint holds `combine_states` of every process's: their
positions in the dealt-out global stream, which any number of processes can resume from
(`BatchIterator.set_state`): the same number takes its own positions back (exact, packing
included); another number starts at the first global position not yet read by every process,
rounded down to a whole global batch, each process at its own block of it. With one sample per
row the processes read in lockstep, so that is exactly where the saved run stood and the resumed
run sees the batches the saved one would have seen.
"""

from __future__ import annotations

import logging
from typing import Callable

import grain
import jax
import numpy as np

from monoformer_jax.data import chat_format
from monoformer_jax.data import sequences as seq
from monoformer_jax.data.sources import BadRecordError
from monoformer_jax import batch as batch_lib

log = logging.getLogger(__name__)

_STATE_VERSION = 1  # one process's position (what get_state returns)
_COMBINED_STATE_VERSION = 2  # every process's (combine_states): resumable on any process count


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """Explicit shard, or this JAX process's (process_index, process_count)."""
  if shard_index is None and shard_count is None:
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("give both shard_index and shard_count, or neither")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return shard_index, shard_count


def record_name(source, i: int) -> str:
  """Where record i of `source` is (its file, line or shard), for messages."""
  name = getattr(source, "record_name", None)
  return name(i) if name is not None else f"{source!r}: record {i}"


class _MarkBad:
  """A source whose skipped records (None) become {"bad": True}: grain drops None elements
  silently, and we want to count them. `check(record)` -> None, or what is wrong with a record
  the source read well but the pipeline cannot use (a class id without a name): raised naming the
  record, or (the source's `skip_bad_records`) skipped and counted like the source's own."""

  def __init__(self, source, check: Callable | None = None):
    self.source, self.check = source, check

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    record = self.source[i]
    if record is not None and self.check is not None:
      problem = self.check(record)
      if problem is not None:
        message = f"{record_name(self.source, i)}{problem}"
        if not getattr(self.source, "skip_bad_records", False):
          raise BadRecordError(message)
        log.warning("skipping bad record: %s", message)
        record = None
    return {"bad": True} if record is None else record

  def __repr__(self) -> str:
    return repr(self.source)


def sample_dataset(
    source,
    make_sample: Callable,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    block: int = 1,
    check: Callable | None = None,
) -> grain.MapDataset:
  """The random-access part of the pipeline. `make_sample(record, rng)` -> sample dict; records
  a source skipped (None), or that `check` found bad (`_MarkBad`), come through as {"bad": True}
  so the iterator can count them."""
  index, count = resolve_shard(shard_index, shard_count)
  ds = shard_stream(
      _MarkBad(source, check),
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_index=index,
      shard_count=count,
      block=block,
  )

  def to_sample(item):
    position, record = item
    if record.get("bad"):
      return record
    # Independent of thread timing and of the number of processes: keyed by the global position.
    return make_sample(record, np.random.default_rng([seed, position]))

  return ds.map(to_sample)


def _global_position(j: int, shard_index: int, shard_count: int, block: int) -> int:
  return (j // block) * shard_count * block + shard_index * block + j % block


def shard_stream(
    source,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    block: int = 1,
) -> grain.MapDataset:
  """This process's (global position, record) pairs, in stream order.

  The global stream (shuffled per epoch, repeated) is dealt out in blocks of `block` records
  (the per-process batch size), round-robin over the processes: process p's k-th block is
  global block k * count + p. So the processes' k-th batches, concatenated in process order, are
  exactly the single-process k-th batch (one sample per row).
  """
  if len(source) < shard_count:
    raise ValueError(f"{source!r} has {len(source)} records, fewer than the {shard_count} processes reading it")
  stream = grain.MapDataset.source(source)
  if shuffle:
    stream = stream.shuffle(seed=seed)
  stream = stream.repeat(num_epochs)
  total = len(stream)
  if num_epochs is None:
    length = total // shard_count
  else:
    group = block * shard_count
    full, rest = divmod(total, group)
    length = full * block + min(max(rest - shard_index * block, 0), block)

  def fetch(j):
    g = _global_position(int(j), shard_index, shard_count, block)
    return g, stream[g]

  return grain.MapDataset.range(length).map(fetch)


def shard_indices(
    n: int, shard_index: int, shard_count: int, *, seed: int, shuffle: bool = True, block: int = 1
) -> list[int]:
  """The source indices a shard reads in the first epoch, in order."""
  ds = shard_stream(
      grain.MapDataset.range(n),
      seed=seed,
      shuffle=shuffle,
      num_epochs=1,
      shard_index=shard_index,
      shard_count=shard_count,
      block=block,
  )
  return [int(ds[i][1]) for i in range(len(ds))]


class BatchIterator:
  """Yields host-local NumPy batches in the model/inputs.py format; resumable via get/set_state.

  packing=True puts consecutive samples into a row while they fit (tokens and image slots);
  packing=False puts one sample per row. The last batch of a finite run is padded with empty rows.
  """

  def __init__(
      self,
      dataset: grain.MapDataset,
      *,
      batch_size: int,
      seq_len: int,
      num_image_slots: int,
      image_shape,
      num_patches: int,
      t_token: bool,
      packing: bool,
      num_threads: int = 2,
      prefetch: int = 16,
      skipped_at_index: int = 0,
      shard_index: int = 0,
      shard_count: int = 1,
      num_input_slots: int = 0,
      input_shape=(),
      input_tokens: int = 0,
      bad_run_limit: int = 0,
      source_name: str = "the source",
  ):
    """`shard_index` / `shard_count`: the shard `dataset` reads (sample_dataset's, in blocks of
    `batch_size`): what a combined state's positions are translated with. `num_input_slots`
    input images of `input_shape` per row, `input_tokens` tokens each: rows that read images.
    `bad_run_limit` (0: none): that many skipped records in a row is an error, not a hang (a
    source whose every record is bad, read forever); `source_name` names the source then."""
    self.num_input_slots, self.input_shape, self.input_tokens = num_input_slots, tuple(input_shape), input_tokens
    self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
    self.shard_index, self.shard_count = shard_index, shard_count
    self.num_image_slots, self.image_shape = num_image_slots, tuple(image_shape)
    self.num_patches, self.t_token = num_patches, t_token
    self.skipped_at_index = skipped_at_index
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._it = iter(dataset.to_iter_dataset(options))
    self._pending = None  # (sample, grain state before it): read, but did not fit the last row
    self.num_skipped = 0
    self.bad_run_limit, self._bad_run, self.source_name = bad_run_limit, 0, source_name

  def __iter__(self):
    return self

  def _read(self):
    if self._pending is not None:
      item, self._pending = self._pending, None
      return item
    state = self._it.get_state()
    return next(self._it), state

  def __next__(self) -> dict:
    batch = batch_lib.empty_batch(
        self.batch_size, self.seq_len, self.num_image_slots, self.image_shape, self.num_input_slots, self.input_shape
    )
    row, placed = 0, 0
    builder = self._builder(batch, 0)
    while row < self.batch_size:
      try:
        sample, state = self._read()
      except StopIteration:
        if not placed:
          raise
        break
      if sample.get("bad"):
        self.num_skipped += 1
        self._bad_run += 1
        if self.bad_run_limit and self._bad_run >= self.bad_run_limit:
          raise BadRecordError(
              f"{self.source_name}: the last {self._bad_run} records read were all bad and skipped "
              "(data.skip_bad_records): no good record left to read? (the warnings above name them)"
          )
        continue
      self._bad_run = 0
      pieces, num_images = sample["pieces"], sample["num_images"]
      if not builder.fits(pieces, num_images):
        if builder.cursor == 0:
          raise ValueError(
              f"a sample of {builder.sample_length(pieces)} tokens / {num_images} images does not "
              f"fit an empty row (seq_len {self.seq_len}, {self.num_image_slots} image slots)"
          )
        row += 1
        if row == self.batch_size:
          self._pending = (sample, state)
          break
        builder = self._builder(batch, row)
      builder.add(pieces)
      placed += 1
      if not self.packing:
        row += 1
        if row < self.batch_size:
          builder = self._builder(batch, row)
    return batch

  def _builder(self, batch, row):
    return batch_lib.RowBuilder(batch, row, self.num_patches, self.t_token, self.input_tokens)

  @property
  def stats(self) -> dict:
    return {"skipped_records": self.num_skipped + self.skipped_at_index}

  def get_state(self) -> dict:
    """This process's position (JSON); `combine_states` of every process's is what resumes on
    another number of processes."""
    grain_state = self._pending[1] if self._pending is not None else self._it.get_state()
    return {
        "version": _STATE_VERSION,
        "grain": grain_state,
        "num_skipped": self.num_skipped,
        "shard": [self.shard_index, self.shard_count],
        "block": self.batch_size,
    }

  def set_state(self, state: dict) -> None:
    """Resumes from `get_state()` (this process's own) or from `combine_states(...)` (saved on
    any number of processes)."""
    version = state.get("version")
    if version == _STATE_VERSION:
      self._it.set_state(state["grain"])
      self.num_skipped = int(state.get("num_skipped", 0))
    elif version == _COMBINED_STATE_VERSION:
      index, self.num_skipped = self._resume_position(state)
      self._it.set_state({"next_index": index})
    else:
      raise ValueError(
          f"data iterator state of version {version}, expected {_STATE_VERSION} or {_COMBINED_STATE_VERSION}"
      )
    self._pending = None

  def _resume_position(self, state: dict) -> tuple[int, int]:
    """(this process's next local index, its skipped count) in a combined state."""
    count, block, positions = state["shard_count"], state["block"], state["next_index"]
    skipped = state["num_skipped"]
    if count == self.shard_count and block == self.batch_size:
      return int(positions[self.shard_index]), int(skipped[self.shard_index])
    # Every global position before the first one some process had not read yet was read.
    first = min(_global_position(int(j), p, count, block) for p, j in enumerate(positions))
    group = self.batch_size * self.shard_count  # one global batch of the new layout
    start = first // group * group
    read = sum(int(j) for j in positions)
    if read > start:
      log.warning(
          "data saved by %d processes resumes on %d at global sample %d: %d samples read before "
          "the interruption are read again (the processes had not read the same amounts)",
          count,
          self.shard_count,
          start,
          read - start,
      )
    # The skipped count is the run's total: kept once, by the first process.
    return start // self.shard_count, sum(skipped) if self.shard_index == 0 else 0

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def combine_states(states: list[dict]) -> dict:
  """One state for every process's `get_state()` (in process order): what a checkpoint holds.
  `BatchIterator.set_state` resumes from it on any number of processes."""
  count, block = states[0]["shard"][1], states[0]["block"]
  for p, state in enumerate(states):
    if state.get("version") != _STATE_VERSION or state["shard"] != [p, count] or state["block"] != block:
      raise ValueError(f"state {p} of {len(states)} is not process {p} of {count} with block {block}: {state}")
  if len(states) != count:
    raise ValueError(f"{len(states)} states for {count} processes")
  return {
      "version": _COMBINED_STATE_VERSION,
      "shard_count": count,
      "block": block,
      "next_index": [int(s["grain"]["next_index"]) for s in states],
      "num_skipped": [int(s["num_skipped"]) for s in states],
  }


# ----------------------------------------------------------------------------------------------
# Image objective.


def image_to_float(image: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]; float arrays (latents) pass through as float32."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) * (2.0 / 255.0) - 1.0
  return np.asarray(image, np.float32)


def sample_latent(record: dict, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
  """One draw from a stored VAE posterior (`mean`, `logvar`), times the VAE scale factor."""
  mean = np.asarray(record["mean"], np.float32)
  std = np.exp(0.5 * np.asarray(record["logvar"], np.float32))
  eps = rng.standard_normal(mean.shape, dtype=np.float32)
  return (mean + std * eps) * np.float32(scale)


def record_image(record: dict, rng, latent_scale: float) -> np.ndarray:
  if "mean" in record:  # precomputed VAE posterior: sample it afresh every time (official)
    return sample_latent(record, rng, latent_scale)
  return image_to_float(record["image"])


def record_check(image_shape, names=None, model_classes: int | None = None, need_label: bool = False) -> Callable:
  """A `sample_dataset` check (`_MarkBad` names the record, or skips it): the record's image
  shape, and its class id against the class names and the model's label embedding."""

  def check(record):
    shape = np.shape(record["mean"] if "mean" in record else record["image"])
    if tuple(shape) != tuple(image_shape):
      return f": an image of shape {tuple(shape)}, expected {tuple(image_shape)}"
    if "label" not in record:
      return " has no class label" if need_label else None
    # Caught here, by name: the label embedding would clamp it silently, names[label] would
    # raise a bare IndexError from a grain worker thread.
    label = int(record["label"])
    if names is not None and not 0 <= label < len(names):
      return (
          f" has class id {label}, outside 0..{len(names) - 1} "
          f"(the {len(names)} class names of data.class_names_file or the source)"
      )
    if model_classes is not None and not 0 <= label < model_classes:
      return f" has class id {label}, outside the model's {model_classes} classes (model.num_classes)"
    return None

  return check


def record_prompt(record: dict, rng, names, templates, prompt_prefix: str) -> str:
  """An image record's prompt: its free text after `prompt_prefix`, or its class name (the
  record's "class_name", else names[label]) in a template drawn with `rng`."""
  if "prompt" in record:
    prompt = record["prompt"]
    return prompt_prefix + (prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt))
  return seq.class_prompt(record.get("class_name") or names[int(record["label"])], rng, templates)


def make_image_iterator(
    source,
    tokenizer,
    *,
    batch_size: int,
    patch_size: int,
    t_token: bool,
    seed: int = 0,
    image_shape=None,
    class_names=None,
    templates=seq.MAIN_TEMPLATES,
    prompt_prefix: str = seq.T2I_PREFIX,
    max_prompt_tokens: int | None = None,
    text_dropout: float = 0.1,
    train_text: bool = False,
    null_label: int | None = None,
    latent_scale: float = 1.0,
    seq_len: int | None = None,
    packing: bool = False,
    images_per_row: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
) -> BatchIterator:
  """Image-generation batches from an image source (MNIST, image folder, image-text, latents).

  The prompt is the record's "prompt" (prefixed by `prompt_prefix`, cut to `max_prompt_tokens`) or
  its class name ("class_name", else `class_names[label]`) in a random template. With probability
  `text_dropout` the prompt is dropped and the label set to `null_label` (CFG). Unless
  `train_text`, a sample ends with its image: the official `<|im_end|>\\n</s>` after it would carry
  no target and nothing attends to it (sequences.image_sample). `seq_len` defaults to the smallest
  length that holds one sample (exact for class prompts). With packing, up to `images_per_row`
  samples share a row of `seq_len` tokens.
  """
  tok = tokenizer
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  # Inspect a record of this process's own part (each process reads only its shard).
  own = shard_indices(len(source), shard_index, shard_count, seed=seed, shuffle=shuffle, block=batch_size)[:100]
  first = next((r for r in (source[i] for i in own) if r is not None), None)
  if first is None:
    raise ValueError(f"{source!r}: no good record among the first of shard {shard_index}; cannot infer the image shape")
  first_shape = record_image(first, np.random.default_rng(0), latent_scale).shape
  if image_shape is None:
    image_shape = first_shape
  elif tuple(first_shape) != tuple(image_shape):
    # The whole source, not one record: images are cropped to the model's size, and a latent
    # dataset has one shape (tfds_latents checks every record against it).
    raise ValueError(
        f"{source!r}: images of shape {tuple(first_shape)}, but the model diffuses {tuple(image_shape)} "
        "(the model's image_height / image_width / image_channels, or the source's image size)"
    )
  h, w, _ = image_shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image shape {tuple(image_shape)} is not divisible by patch {patch_size}")
  num_patches = (h // patch_size) * (w // patch_size)
  names = class_names if class_names is not None else getattr(source, "class_names", None)
  model_classes = null_label  # given: the model's label embedding has that many classes
  if null_label is None:
    null_label = len(names) if names is not None else 0
  has_prompt = "prompt" in first
  if max_prompt_tokens is None:
    if has_prompt or names is None:
      raise ValueError("max_prompt_tokens is needed for free-text prompts")
    max_prompt_tokens = seq.max_class_prompt_tokens(tok, names, templates)
  # Untrained image text: the row ends with the image (sequences.image_sample: exact).
  one = seq.image_seq_len(max_prompt_tokens, num_patches, t_token, tok, tail=train_text)
  seq_len = seq_len or one * (images_per_row if packing else 1)
  if seq_len < one:
    raise ValueError(f"seq_len {seq_len} cannot hold one image sample ({one} tokens)")

  check = record_check(image_shape, names, model_classes)

  def make_sample(record, rng):
    image = record_image(record, rng, latent_scale)
    label = int(record.get("label", null_label))
    ids = tok.encode(record_prompt(record, rng, names, templates, prompt_prefix))[:max_prompt_tokens]
    if rng.random() < text_dropout:
      ids, label = [], null_label
    return {"pieces": seq.image_sample(tok, ids, image, label, train_text, tail=train_text), "num_images": 1}

  ds = sample_dataset(
      source,
      make_sample,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_index=shard_index,
      shard_count=shard_count,
      block=batch_size,
      check=check,
  )
  return BatchIterator(
      ds,
      batch_size=batch_size,
      seq_len=seq_len,
      num_image_slots=images_per_row if packing else 1,
      image_shape=image_shape,
      num_patches=num_patches,
      t_token=t_token,
      packing=packing,
      num_threads=num_threads,
      skipped_at_index=getattr(source, "num_skipped_at_index", 0),
      shard_index=shard_index,
      shard_count=shard_count,
      # Every record of the source read twice, each one skipped: none is good.
      bad_run_limit=2 * len(source) + 1,
      source_name=repr(source),
  )


# ----------------------------------------------------------------------------------------------
# Text objective.


def make_text_iterator(
    source,
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    packing: bool = True,
    template: str = "none",
    train_on_prompt: bool | None = None,
    image_shape=(1, 1, 1),
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
) -> BatchIterator:
  """Text batches `<s>...</s>` from {"text"} records, or dialogues from chat {"turns"} records
  in the chat `template` (data/chat_format.py), cut to seq_len tokens.

  `train_on_prompt` (default: the official choice for the template) trains the user turns too.
  packing=True packs several samples per row (segment ids keep them apart); False pads each
  sample to seq_len. Batches carry one dummy image slot of `image_shape` (never marked real) so
  both objectives share the batch keys.
  """
  tok = tokenizer
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  if train_on_prompt is None:
    train_on_prompt = chat_format.official_train_on_prompt(template)

  def make_sample(record, rng):
    del rng
    if "turns" in record:
      pieces = chat_format.dialogue_pieces(tok, record["turns"], template, train_prompt=train_on_prompt)
      return {"pieces": seq.cut_document(pieces, {}, seq_len, 0, 0, tok.im_start_id), "num_images": 0}
    return {"pieces": seq.text_sample(tok, [(tok.encode(record["text"]), True)], seq_len), "num_images": 0}

  ds = sample_dataset(
      source,
      make_sample,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_index=shard_index,
      shard_count=shard_count,
      block=batch_size,
  )
  return BatchIterator(
      ds,
      batch_size=batch_size,
      seq_len=seq_len,
      num_image_slots=1,
      image_shape=image_shape,
      num_patches=1,
      t_token=False,
      packing=packing,
      num_threads=num_threads,
      skipped_at_index=getattr(source, "num_skipped_at_index", 0),
      shard_index=shard_index,
      shard_count=shard_count,
      # Every record of the source read twice, each one skipped: none is good.
      bad_run_limit=2 * len(source) + 1,
      source_name=repr(source),
  )
