"""Rows of conversations about images (LLaVA instruction data), for the `understand` steps.

    <s> {question with <|im_start|> [image tokens] <|im_end|> where it says <image>} {answer} </s>
    <s> {question} {answer} </s> ...                          (chat_format.py: the template)

One conversation a row, cut to `seq_len` tokens (the official `tokenizer_max_length`, 512); only
the answers (and their `</s>`) are trained. A conversation without an image is a text row of the
same batch: its input slot stays empty. The image arrives as `input_images` and is encoded
(vision/encoders.py: CLIP's penultimate layer, as the official main branch) before the step.
"""

from __future__ import annotations

import numpy as np

from monoformer_jax.data import chat_format, pipeline
from monoformer_jax.data import sequences as seq
from monoformer_jax.data.tokenizer import Tokenizer


def conversation_pieces(tok: Tokenizer, record: dict, template: str, input_tokens: int, seq_len: int) -> list:
  """A record's row pieces, cut to `seq_len` tokens (an image that does not fit ends the row)."""
  images = [pipeline.image_to_float(record["image"])] if "image" in record else []
  pieces = chat_format.dialogue_pieces(tok, record["turns"], template, images, train_prompt=False)
  return seq.cut_document(pieces, {"input": input_tokens, "image": 0}, seq_len, 0, 1, tok.im_start_id)


def _image_check(input_shape):
  def check(record):
    if "image" in record and tuple(np.shape(record["image"])) != tuple(input_shape):
      return f": an image of shape {tuple(np.shape(record['image']))}, expected {tuple(input_shape)}"
    return None

  return check


def make_conversation_iterator(
    source,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    input_shape,
    input_tokens: int,
    template: str = "none",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
) -> pipeline.BatchIterator:
  """Batches of one conversation per row from a source of {"turns", ["image"]} records; images
  of `input_shape`, `input_tokens` tokens each once encoded."""
  chat_format.check_template(template)
  if seq_len < input_tokens + 8:
    raise ValueError(
        f"seq_len {seq_len} leaves no room for a question and an answer beside a {input_tokens}-token image"
    )
  shard_index, shard_count = pipeline.resolve_shard(shard_index, shard_count)

  def make_sample(record, rng):
    del rng
    return {"pieces": conversation_pieces(tokenizer, record, template, input_tokens, seq_len), "num_images": 0}

  ds = pipeline.sample_dataset(
      source,
      make_sample,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_index=shard_index,
      shard_count=shard_count,
      block=batch_size,
      check=_image_check(input_shape),
  )
  return pipeline.BatchIterator(
      ds,
      batch_size=batch_size,
      seq_len=seq_len,
      num_image_slots=1,
      image_shape=(1, 1, 1),
      num_patches=1,
      t_token=False,
      packing=False,
      num_threads=num_threads,
      skipped_at_index=getattr(source, "num_skipped_at_index", 0),
      shard_index=shard_index,
      shard_count=shard_count,
      num_input_slots=1,
      input_shape=input_shape,
      input_tokens=input_tokens,
      bad_run_limit=2 * len(source) + 1,  # every record read twice and skipped: none is good
      source_name=repr(source),
  )
