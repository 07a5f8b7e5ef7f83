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
    **read,
) -> pipeline.BatchIterator:
  """Batches of one conversation per row from a source of {"turns", ["image"]} records; images
  of `input_shape`, `input_tokens` tokens each once encoded. `read`: the `pipeline.StreamOptions`."""
  chat_format.check_template(template)
  if seq_len < input_tokens + 8:
    raise ValueError(
        f"seq_len {seq_len} leaves no room for a question and an answer beside a {input_tokens}-token image"
    )
  stream = pipeline.StreamOptions(**read).resolved()

  def make_sample(record, rng):
    del rng
    return {"pieces": conversation_pieces(tokenizer, record, template, input_tokens, seq_len), "num_images": 0}

  layout = pipeline.RowLayout(seq_len, num_input_slots=1, input_shape=input_shape, input_tokens=input_tokens)
  return pipeline.source_batches(
      source, make_sample, layout, stream, batch_size=batch_size, check=_image_check(input_shape)
  )
