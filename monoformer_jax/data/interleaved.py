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
    input_fraction: float = 0.0,
    input_tokens: int = 0,
    latent_scale: float = 1.0,
    seq_len: int | None = None,
    packing: bool = False,
    **options,
) -> pipeline.BatchIterator:
  """Batches of documents of 1..`max_images` images from an image source, one per row or packed
  while they fit: at most `max_images` images per row (its image slots), and as many read ones
  when `input_fraction` > 0 (images of `image_shape`, `input_tokens` tokens each once encoded).
  `seq_len` defaults to the smallest row that holds the longest document; a longer one is cut
  (`sequences.cut_document`). A document's bad records are left out of it (the skip count
  counts documents left with none). The other options are `pipeline.make_image_iterator`'s."""
  if max_images < 1:
    raise ValueError(f"max_images must be >= 1, got {max_images}")
  if not 0 <= input_fraction <= 1 or (input_fraction and not input_tokens):
    raise ValueError(f"input_fraction {input_fraction} must be in [0, 1], and > 0 needs input_tokens")
  prompt_options, stream = pipeline.split_image_options(options)
  num_patches = pipeline.patch_count(image_shape, patch_size)
  span = num_patches + int(t_token)
  prompts = pipeline.image_prompts(source, tokenizer, **prompt_options)
  answers = [tokenizer.encode(n) for n in prompts.names] if prompts.names is not None else []
  if input_fraction and not answers:
    raise ValueError("input_fraction > 0 needs class names (the text after a read image)")
  read_tokens = input_tokens + max(map(len, answers)) if input_fraction else 0
  seq_len = seq_len or document_seq_len(tokenizer, max_images, prompts.max_tokens, span, read_tokens)
  lengths = {"image": span, "input": input_tokens}
  inputs = max_images if input_fraction else 0  # read-image slots of a row

  def make_part(record, rng):
    """One record's part of a document (decided with the record's own rng) and the document
    length drawn for a document it would start."""
    image = pipeline.record_image(record, rng, latent_scale)
    n = int(rng.integers(1, max_images + 1))
    if input_fraction and rng.random() < input_fraction:
      return {"parts": [("input", image), ("text", answers[int(record["label"])], True)], "n": n}
    ids, label = prompts.draw(tokenizer, record, rng)
    return {"parts": [("text", ids), ("image", image, label)], "n": n}

  def make_document(group):
    good = [g for g in group if not g.get("bad")]
    if not good:
      return {"bad": True}
    parts = [p for g in good[: good[0]["n"]] for p in g["parts"]]
    pieces = seq.document_sample(tokenizer, parts, prompts.train)
    pieces = seq.cut_document(pieces, lengths, seq_len, max_images, inputs, tokenizer.im_start_id)
    return {"pieces": pieces, "num_images": sum(1 for p in pieces if p[0] == "image")}

  layout = pipeline.RowLayout(
      seq_len, max_images, image_shape, num_patches, t_token, packing, inputs, image_shape, input_tokens
  )
  return pipeline.source_batches(
      source,
      make_part,
      layout,
      stream,
      batch_size=batch_size,
      check=pipeline.record_check(image_shape, prompts.names, prompts.model_classes, need_label=bool(input_fraction)),
      group=(max_images, make_document),
  )
