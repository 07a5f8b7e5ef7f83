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

import dataclasses
import logging
from typing import Callable, Sequence

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


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How one process reads a source: the shuffle `seed`, `shuffle`, `num_epochs` (None: forever),
  its shard (`shard_index` of `shard_count`; both None: this JAX process's) and grain's
  `num_threads` reading ahead. The `make_*_iterator` factories take these as keywords."""

  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  shard_index: int | None = None
  shard_count: int | None = None
  num_threads: int = 2

  def resolved(self) -> StreamOptions:
    """The same options with the shard made explicit (`resolve_shard`)."""
    index, count = resolve_shard(self.shard_index, self.shard_count)
    return dataclasses.replace(self, shard_index=index, shard_count=count)


def sample_dataset(
    source, make_sample: Callable, stream: StreamOptions, *, block: int = 1, check: Callable | None = None
) -> grain.MapDataset:
  """The random-access part of the pipeline. `make_sample(record, rng)` -> sample dict; records
  a source skipped (None), or that `check` found bad (`_MarkBad`), come through as {"bad": True}
  so the iterator can count them."""
  stream = stream.resolved()
  seed = stream.seed
  ds = shard_stream(
      _MarkBad(source, check),
      seed=seed,
      shuffle=stream.shuffle,
      num_epochs=stream.num_epochs,
      shard_index=stream.shard_index,
      shard_count=stream.shard_count,
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


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """What a batch row holds (batch.py): `seq_len` tokens; `num_image_slots` generated images of
  `image_shape`, `num_patches` tokens each (and a t token with `t_token`); `num_input_slots` read
  images of `input_shape`, `input_tokens` tokens each. `packing`: consecutive samples share a row
  while they fit (tokens and image slots), else one sample a row."""

  seq_len: int
  num_image_slots: int = 1
  image_shape: tuple = (1, 1, 1)
  num_patches: int = 1
  t_token: bool = False
  packing: bool = False
  num_input_slots: int = 0
  input_shape: tuple = ()
  input_tokens: int = 0

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(self.image_shape))
    object.__setattr__(self, "input_shape", tuple(self.input_shape))

  def empty_batch(self, batch_size: int) -> dict:
    return batch_lib.empty_batch(
        batch_size, self.seq_len, self.num_image_slots, self.image_shape, self.num_input_slots, self.input_shape
    )

  def row_builder(self, batch: dict, row: int) -> batch_lib.RowBuilder:
    return batch_lib.RowBuilder(batch, row, self.num_patches, self.t_token, self.input_tokens)


class BatchIterator:
  """Yields host-local NumPy batches in the model/inputs.py format; resumable via get/set_state.

  Samples are laid into rows as `layout` says (packed or one a row). The last batch of a finite
  run is padded with empty rows.
  """

  def __init__(
      self,
      dataset: grain.MapDataset,
      layout: RowLayout,
      *,
      batch_size: int,
      shard: tuple[int, int] = (0, 1),
      num_threads: int = 2,
      prefetch: int = 16,
      skipped_at_index: int = 0,
      bad_run_limit: int = 0,
      source_name: str = "the source",
  ):
    """`shard`: the (index, count) `dataset` reads (sample_dataset's, in blocks of `batch_size`):
    what a combined state's positions are translated with. `bad_run_limit` (0: none): that many
    skipped records in a row is an error, not a hang (a source whose every record is bad, read
    forever); `source_name` names the source then."""
    self.layout, self.batch_size = layout, batch_size
    self.shard_index, self.shard_count = shard
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
    batch = self.layout.empty_batch(self.batch_size)
    row, placed = 0, 0
    builder = self.layout.row_builder(batch, 0)
    while row < self.batch_size:
      try:
        sample, state = self._read_good()
      except StopIteration:
        if not placed:
          raise
        break
      pieces, num_images = sample["pieces"], sample["num_images"]
      if not builder.fits(pieces, num_images):
        if builder.cursor == 0:
          raise ValueError(
              f"a sample of {builder.sample_length(pieces)} tokens / {num_images} images does not "
              f"fit an empty row (seq_len {self.layout.seq_len}, {self.layout.num_image_slots} image slots)"
          )
        row += 1
        if row == self.batch_size:
          self._pending = (sample, state)
          break
        builder = self.layout.row_builder(batch, row)
      builder.add(pieces)
      placed += 1
      if not self.layout.packing:
        row += 1
        if row < self.batch_size:
          builder = self.layout.row_builder(batch, row)
    return batch

  def _read_good(self):
    """The next good (sample, state), counting the bad ones read on the way."""
    sample, state = self._read()
    while sample.get("bad"):
      self.num_skipped += 1
      self._bad_run += 1
      if self.bad_run_limit and self._bad_run >= self.bad_run_limit:
        raise BadRecordError(
            f"{self.source_name}: the last {self._bad_run} records read were all bad and skipped "
            "(data.skip_bad_records): no good record left to read? (the warnings above name them)"
        )
      sample, state = self._read()
    self._bad_run = 0
    return sample, state

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


def source_batches(
    source,
    make_sample: Callable,
    layout: RowLayout,
    stream: StreamOptions,
    *,
    batch_size: int,
    check: Callable | None = None,
    group: tuple[int, Callable] | None = None,
) -> BatchIterator:
  """The whole pipeline over `source`: this process's samples (`sample_dataset`, dealt out in
  blocks of `batch_size`) laid into rows of `layout`. `group` (n, make_document): every n
  consecutive samples make one (interleaved documents), dealt out in blocks of `batch_size` of them."""
  stream = stream.resolved()
  n, make_document = group or (1, None)
  ds = sample_dataset(source, make_sample, stream, block=batch_size * n, check=check)
  if make_document is not None:
    ds = ds.batch(n, batch_fn=list).map(make_document)
  return BatchIterator(
      ds,
      layout,
      batch_size=batch_size,
      shard=(stream.shard_index, stream.shard_count),
      num_threads=stream.num_threads,
      skipped_at_index=getattr(source, "num_skipped_at_index", 0),
      # Every record of the source read twice, each one skipped: none is good.
      bad_run_limit=2 * len(source) + 1,
      source_name=repr(source),
  )


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


@dataclasses.dataclass(frozen=True)
class ImagePrompts:
  """How an image record becomes prompt ids and a label (`image_prompts` builds it): its free text
  after `prefix` or its class name (from `names`) in one of `templates`, cut to `max_tokens`;
  dropped with probability `dropout`, the label then `null_label` (CFG). `model_classes`: the
  model's label count, where it has a label embedding; `train`: the prompt text is trained too
  (the LM loss), and a row goes on after its image."""

  names: Sequence[str] | None
  templates: Sequence[str]
  prefix: str
  max_tokens: int
  dropout: float
  null_label: int
  model_classes: int | None
  train: bool = False

  def draw(self, tok, record: dict, rng: np.random.Generator) -> tuple[list, int]:
    """(prompt ids, label) of `record`, the prompt and its dropout drawn with `rng`."""
    label = int(record.get("label", self.null_label))
    ids = tok.encode(record_prompt(record, rng, self.names, self.templates, self.prefix))[: self.max_tokens]
    if rng.random() < self.dropout:
      ids, label = [], self.null_label
    return ids, label


def image_prompts(
    source,
    tok,
    *,
    class_names=None,
    templates=seq.MAIN_TEMPLATES,
    prompt_prefix: str = seq.T2I_PREFIX,
    max_prompt_tokens: int | None = None,
    text_dropout: float = 0.1,
    null_label: int | None = None,
    train_text: bool = False,
    free_text: bool = False,
) -> ImagePrompts:
  """The `ImagePrompts` of an image source: class names `class_names`, else the source's; the
  null label `null_label` (the model's class count), else one past the names; `max_prompt_tokens`
  needed where the prompts are free text (`free_text`) or there are no names, else the longest
  class prompt."""
  names = class_names if class_names is not None else getattr(source, "class_names", None)
  model_classes = null_label  # given: the model's label embedding has that many classes
  if null_label is None:
    null_label = len(names) if names is not None else 0
  if max_prompt_tokens is None:
    if free_text or names is None:
      raise ValueError("max_prompt_tokens is needed for free-text prompts")
    max_prompt_tokens = seq.max_class_prompt_tokens(tok, names, templates)
  return ImagePrompts(
      names, templates, prompt_prefix, max_prompt_tokens, text_dropout, null_label, model_classes, train_text
  )


_PROMPT_OPTIONS = (
    "class_names",
    "templates",
    "prompt_prefix",
    "max_prompt_tokens",
    "text_dropout",
    "null_label",
    "train_text",
)


def split_image_options(options: dict) -> tuple[dict, StreamOptions]:
  """An image factory's `options`: the `image_prompts` keywords among them, and the others as
  this process's `StreamOptions`."""
  prompt = {k: options[k] for k in _PROMPT_OPTIONS if k in options}
  stream = StreamOptions(**{k: v for k, v in options.items() if k not in prompt})
  return prompt, stream.resolved()


def patch_count(image_shape, patch_size: int) -> int:
  """Patches of an (H, W, C) image cut into `patch_size` squares."""
  h, w, _ = image_shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image shape {tuple(image_shape)} is not divisible by patch {patch_size}")
  return (h // patch_size) * (w // patch_size)


def _first_record(source, stream: StreamOptions, batch_size: int) -> dict:
  """A good record of this process's own part (each process reads only its shard)."""
  own = shard_indices(
      len(source), stream.shard_index, stream.shard_count, seed=stream.seed, shuffle=stream.shuffle, block=batch_size
  )[:100]
  first = next((r for r in (source[i] for i in own) if r is not None), None)
  if first is None:
    raise ValueError(
        f"{source!r}: no good record among the first of shard {stream.shard_index}; cannot infer the image shape"
    )
  return first


def _source_image_shape(source, first: dict, image_shape, latent_scale: float) -> tuple:
  """The shape of the source's images (its `first` record's), checked against `image_shape`."""
  first_shape = record_image(first, np.random.default_rng(0), latent_scale).shape
  if image_shape is None:
    return first_shape
  if tuple(first_shape) != tuple(image_shape):
    # The whole source, not one record: images are cropped to the model's size, and a latent
    # dataset has one shape (tfds_latents checks every record against it).
    raise ValueError(
        f"{source!r}: images of shape {tuple(first_shape)}, but the model diffuses {tuple(image_shape)} "
        "(the model's image_height / image_width / image_channels, or the source's image size)"
    )
  return image_shape


def make_image_iterator(
    source,
    tokenizer,
    *,
    batch_size: int,
    patch_size: int,
    t_token: bool,
    image_shape=None,
    latent_scale: float = 1.0,
    seq_len: int | None = None,
    packing: bool = False,
    images_per_row: int = 1,
    **options,
) -> BatchIterator:
  """Image-generation batches from an image source (MNIST, image folder, image-text, latents).

  The prompt is the record's "prompt" (prefixed by `prompt_prefix`, cut to `max_prompt_tokens`) or
  its class name ("class_name", else `class_names[label]`) in a random template (`templates`).
  With probability `text_dropout` the prompt is dropped and the label set to `null_label` (CFG).
  Unless `train_text`, a sample ends with its image: the
  official `<|im_end|>\\n</s>` after it would carry no target and nothing attends to it
  (sequences.image_sample). `seq_len` defaults to the smallest length that holds one sample
  (exact for class prompts). With packing, up to `images_per_row` samples share a row of
  `seq_len` tokens. `options`: these prompt options (`image_prompts`' keywords), and the
  `StreamOptions` (seed, shuffle, num_epochs, shard_index, shard_count, num_threads).
  """
  prompt_options, stream = split_image_options(options)
  first = _first_record(source, stream, batch_size)
  image_shape = _source_image_shape(source, first, image_shape, latent_scale)
  num_patches = patch_count(image_shape, patch_size)
  prompts = image_prompts(source, tokenizer, free_text="prompt" in first, **prompt_options)
  # Untrained image text: the row ends with the image (sequences.image_sample: exact).
  one = seq.image_seq_len(prompts.max_tokens, num_patches, t_token, tokenizer, tail=prompts.train)
  seq_len = seq_len or one * (images_per_row if packing else 1)
  if seq_len < one:
    raise ValueError(f"seq_len {seq_len} cannot hold one image sample ({one} tokens)")

  def make_sample(record, rng):
    image = record_image(record, rng, latent_scale)
    ids, label = prompts.draw(tokenizer, record, rng)
    return {
        "pieces": seq.image_sample(tokenizer, ids, image, label, prompts.train, tail=prompts.train),
        "num_images": 1,
    }

  layout = RowLayout(seq_len, images_per_row if packing else 1, image_shape, num_patches, t_token, packing)
  return source_batches(
      source,
      make_sample,
      layout,
      stream,
      batch_size=batch_size,
      check=record_check(image_shape, prompts.names, prompts.model_classes),
  )


# ----------------------------------------------------------------------------------------------
# Text objective.


def make_text_iterator(
    source,
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    packing: bool = True,
    template: str = "none",
    train_on_prompt: bool | None = None,
    image_shape=(1, 1, 1),
    **read,
) -> BatchIterator:
  """Text batches `<s>...</s>` from {"text"} records, or dialogues from chat {"turns"} records
  in the chat `template` (data/chat_format.py), cut to seq_len tokens.

  `train_on_prompt` (default: the official choice for the template) trains the user turns too.
  packing=True packs several samples per row (segment ids keep them apart); False pads each
  sample to seq_len. Batches carry one dummy image slot of `image_shape` (never marked real) so
  both objectives share the batch keys. `read`: the `StreamOptions`.
  """
  tok = tokenizer
  stream = StreamOptions(**read).resolved()
  if train_on_prompt is None:
    train_on_prompt = chat_format.official_train_on_prompt(template)

  def make_sample(record, rng):
    del rng
    if "turns" in record:
      pieces = chat_format.dialogue_pieces(tok, record["turns"], template, train_prompt=train_on_prompt)
      return {"pieces": seq.cut_document(pieces, {}, seq_len, 0, 0, tok.im_start_id), "num_images": 0}
    return {"pieces": seq.text_sample(tok, [(tok.encode(record["text"]), True)], seq_len), "num_images": 0}

  layout = RowLayout(seq_len, image_shape=image_shape, packing=packing)
  return source_batches(source, make_sample, layout, stream, batch_size=batch_size)
