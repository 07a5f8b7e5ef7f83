"""Image-understanding rows: an image the model reads, a question about it, and the answer.

    <s> <|im_start|> [Q input-image tokens] <|im_end|> \\n {question} {answer} </s>

Only the answer and its `</s>` are trained (the LM loss on the answer only, like a chat answer);
the image arrives as `input_images` and is encoded (vision/encoders.py) before the model reads it.
The answer to a labelled image is its class name ("seven" for an MNIST 7).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from monoformer_jax.data import augment, pipeline
from monoformer_jax.data.tokenizer import Tokenizer

DEFAULT_QUESTION = "Which digit is this?"


def understanding_prefix(tok: Tokenizer, image: np.ndarray, question_ids: Sequence[int]) -> list:
  """The pieces up to the answer: what `describe` feeds the model before it writes."""
  return [
      ("text", [tok.bos_id, tok.im_start_id], False),
      ("input", image, None),
      ("text", [tok.im_end_id, *tok.newline_ids, *question_ids], False),
  ]


def understanding_sample(tok: Tokenizer, image: np.ndarray, question_ids, answer_ids) -> list:
  return understanding_prefix(tok, image, question_ids) + [("text", [*answer_ids, tok.eos_id], True)]


def prefix_length(tok: Tokenizer, input_tokens: int, question_ids: Sequence[int]) -> int:
  """Tokens of `understanding_prefix`: <s> <|im_start|> [image] <|im_end|> \\n question."""
  return 2 + input_tokens + 1 + len(tok.newline_ids) + len(question_ids)


def understanding_seq_len(tok: Tokenizer, input_tokens: int, question: str, answers: Sequence[str]) -> int:
  """The longest sample's length (every answer tried, then </s>)."""
  longest = max(len(tok.encode(a)) for a in answers)
  return prefix_length(tok, input_tokens, tok.encode(question)) + longest + 1


def shifted(image: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """`image` (H, W, C) moved by a random (dy, dx) in [-max_shift, max_shift]^2, the edge value
  filling what moves in: the reading steps see each digit at a few positions, so the held-out
  digits are read more like the training ones (benchmarks/RESULTS.md, "Image understanding")."""
  if max_shift == 0:
    return image
  dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
  return augment.translate(image[None], [dy], [dx], max_shift, mode="edge")[0]


def make_understanding_iterator(
    source,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    input_shape,
    input_tokens: int,
    class_names: Sequence[str],
    question: str = DEFAULT_QUESTION,
    latent_scale: float = 1.0,
    max_shift: int = 0,
    **read,
) -> pipeline.BatchIterator:
  """Batches of one understanding sample per row from a labelled image source; `max_shift` > 0
  moves each read image by up to that many pixels along each axis (a fresh draw per epoch).
  `read`: the `pipeline.StreamOptions`."""
  tok = tokenizer
  if not question.strip():
    raise ValueError("the understanding question is empty")
  if not 0 <= max_shift < min(input_shape[:2]):
    raise ValueError(f"the read images' max_shift {max_shift} is not in 0..{min(input_shape[:2]) - 1}")
  stream = pipeline.StreamOptions(**read).resolved()
  question_ids = tok.encode(question)
  answers = [tok.encode(name) for name in class_names]
  seq_len = understanding_seq_len(tok, input_tokens, question, class_names)

  def make_sample(record, rng):
    image = shifted(pipeline.record_image(record, rng, latent_scale), rng, max_shift)
    answer = answers[int(record["label"])]
    return {"pieces": understanding_sample(tok, image, question_ids, answer), "num_images": 0}

  layout = pipeline.RowLayout(seq_len, num_input_slots=1, input_shape=input_shape, input_tokens=input_tokens)
  check = pipeline.record_check(input_shape, class_names, need_label=True)
  return pipeline.source_batches(source, make_sample, layout, stream, batch_size=batch_size, check=check)
