"""Interleaved rows: several images in one sample, between text, up to a cap per row.

    <s> prompt <|im_start|> [image] <|im_end|> \\n prompt <|im_start|> [image] <|im_end|> \\n ... </s>

A document is made of `max_images` consecutive records of this process's (shuffled) stream, so
every epoch groups them afresh; it keeps the first n of them, n drawn in 1..max_images. Each
record becomes a generated image after its prompt (the class name in a template, or the
record's free-text prompt; dropped with probability `text_dropout`, its label then the null
class, as in one-image rows) or, with probability `input_fraction`, an image the model reads
followed by its class name (trained whatever `train_text` says, like an understanding answer).

Each generated image is its own bidirectional block and the diffusion step draws its own t
(train/steps.py): the images of a row are denoised at different noise levels, and what follows
an image (text, a later image) reads it at its own level. Sampling writes a finished image into
the cache at t = 0 (sampling/interleaved.py), one of the levels training draws.

Documents are dealt to the processes in blocks of `batch_size` documents (`batch_size *
max_images` records), so process p's k-th batch holds the documents a single process would put
in rows p * batch_size ... of its k-th batch, and the iterator's positions (in documents) resume
as `pipeline.BatchIterator` describes.
"""

from __future__ import annotations

from typing import Sequence

from monoformer_jax.data import pipeline
from monoformer_jax.data import sequences as seq
from monoformer_jax.data.tokenizer import Tokenizer


def document_seq_len(tok: Tokenizer, max_images: int, max_prompt_tokens: int, span: int, read_tokens: int = 0) -> int:
  """Smallest row holding a document of `max_images` images, each the longer of a generated
  image after its longest prompt (`span` tokens) or a read one (`read_tokens`, its name included)."""
  generated = max_prompt_tokens + 1 + span + 1 + len(tok.newline_ids)
  read = 1 + read_tokens + 1 + len(tok.newline_ids)
  return 1 + max_images * max(generated, read if read_tokens else 0) + 1


def make_interleaved_iterator(
    source,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_images: int,
    patch_size: int,
    t_token: bool,
    image_shape,
    class_names: Sequence[str] | None = None,
    templates=seq.MAIN_TEMPLATES,
    prompt_prefix: str = seq.T2I_PREFIX,
    max_prompt_tokens: int | None = None,
    text_dropout: float = 0.1,
    train_text: bool = False,
    null_label: int | None = None,
    input_fraction: float = 0.0,
    input_tokens: int = 0,
    latent_scale: float = 1.0,
    seq_len: int | None = None,
    packing: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
) -> pipeline.BatchIterator:
  """Batches of documents of 1..`max_images` images from an image source, one per row or packed
  while they fit: at most `max_images` images per row (its image slots), and as many read ones
  when `input_fraction` > 0 (images of `image_shape`, `input_tokens` tokens each once encoded).
  `seq_len` defaults to the smallest row that holds the longest document; a longer one is cut
  (`sequences.cut_document`). A document's bad records are left out of it (the skip count
  counts documents left with none). The other options are `pipeline.make_image_iterator`'s."""
  tok = tokenizer
  if max_images < 1:
    raise ValueError(f"max_images must be >= 1, got {max_images}")
  if not 0 <= input_fraction <= 1 or (input_fraction and not input_tokens):
    raise ValueError(f"input_fraction {input_fraction} must be in [0, 1], and > 0 needs input_tokens")
  index, count = pipeline.resolve_shard(shard_index, shard_count)
  h, w, _ = image_shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image shape {tuple(image_shape)} is not divisible by patch {patch_size}")
  span = (h // patch_size) * (w // patch_size) + int(t_token)
  names = class_names if class_names is not None else getattr(source, "class_names", None)
  model_classes = null_label
  if null_label is None:
    null_label = len(names) if names is not None else 0
  if max_prompt_tokens is None:
    if names is None:
      raise ValueError("max_prompt_tokens is needed for free-text prompts")
    max_prompt_tokens = seq.max_class_prompt_tokens(tok, names, templates)
  answers = [tok.encode(n) for n in names] if names is not None else []
  if input_fraction and not answers:
    raise ValueError("input_fraction > 0 needs class names (the text after a read image)")
  read_tokens = input_tokens + max(map(len, answers)) if input_fraction else 0
  seq_len = seq_len or document_seq_len(tok, max_images, max_prompt_tokens, span, read_tokens)
  lengths = {"image": span, "input": input_tokens}

  def make_part(record, rng):
    """One record's part of a document (decided with the record's own rng) and the document
    length drawn for a document it would start."""
    image = pipeline.record_image(record, rng, latent_scale)
    n = int(rng.integers(1, max_images + 1))
    if input_fraction and rng.random() < input_fraction:
      return {"parts": [("input", image), ("text", answers[int(record["label"])], True)], "n": n}
    label = int(record.get("label", null_label))
    ids = tok.encode(pipeline.record_prompt(record, rng, names, templates, prompt_prefix))[:max_prompt_tokens]
    if rng.random() < text_dropout:
      ids, label = [], null_label
    return {"parts": [("text", ids), ("image", image, label)], "n": n}

  def make_document(group):
    good = [g for g in group if not g.get("bad")]
    if not good:
      return {"bad": True}
    parts = [p for g in good[: good[0]["n"]] for p in g["parts"]]
    pieces = seq.document_sample(tok, parts, train_text)
    inputs = max_images if input_fraction else 0
    pieces = seq.cut_document(pieces, lengths, seq_len, max_images, inputs, tok.im_start_id)
    return {"pieces": pieces, "num_images": sum(1 for p in pieces if p[0] == "image")}

  records = pipeline.sample_dataset(
      source,
      make_part,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_index=index,
      shard_count=count,
      block=batch_size * max_images,
      check=pipeline.record_check(image_shape, names, model_classes, need_label=bool(input_fraction)),
  )
  documents = records.batch(max_images, batch_fn=list).map(make_document)
  return pipeline.BatchIterator(
      documents,
      batch_size=batch_size,
      seq_len=seq_len,
      num_image_slots=max_images,
      image_shape=image_shape,
      num_patches=span - int(t_token),
      t_token=t_token,
      packing=packing,
      num_threads=num_threads,
      skipped_at_index=getattr(source, "num_skipped_at_index", 0),
      shard_index=index,
      shard_count=count,
      num_input_slots=max_images if input_fraction else 0,
      input_shape=image_shape,
      input_tokens=input_tokens,
      bad_run_limit=2 * len(source) + 1,  # every record read twice and skipped: none is good
      source_name=repr(source),
  )
