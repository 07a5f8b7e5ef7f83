"""Image understanding at inference: answers about images, written by the LM token by token
through the key/value cache (`decode.py`), from the same prompt the `understand` steps train on
(data/understanding.py): `<s><|im_start|>` [image] `<|im_end|>\\n{question}`."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from monoformer_jax import batch as batch_lib
from monoformer_jax.data import pipeline
from monoformer_jax.data.understanding import prefix_length, understanding_prefix
from monoformer_jax.sampling.decode import generate_tokens
from monoformer_jax.sampling.text import continuation
from monoformer_jax.sampling.tokens import TokenSampling


def prompt_rows(tokenizer, encoder, images: np.ndarray, question_ids) -> tuple[list, dict]:
  """(token-id prompts, their `prompt_inputs` for decode.prefill) of one prompt per image."""
  length = prefix_length(tokenizer, encoder.tokens, question_ids)
  batch = batch_lib.empty_batch(len(images), length, 1, (1, 1, 1), 1, encoder.image_shape)
  for r, image in enumerate(images):
    builder = batch_lib.RowBuilder(batch, r, 1, False, encoder.tokens)
    builder.add(understanding_prefix(tokenizer, image, question_ids))
  inputs = {
      "kinds": batch["kinds"],
      "patch_index": batch["patch_index"],
      "input_features": encoder(batch["input_images"]),
  }
  return batch["tokens"].tolist(), inputs


def describe_images(
    params,
    model_config,
    tokenizer,
    encoder,
    images: np.ndarray,
    question: str,
    *,
    max_new_tokens: int = 16,
    sampling: TokenSampling = TokenSampling(),
    seed: int = 0,
    mesh=None,
    rules=None,
) -> list[str]:
  """One answer per image of `images` (N, H, W, C): uint8 pixels, or floats in the model's space
  ([-1, 1] pixels or latents), of the encoder's image shape."""
  images = np.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(encoder.image_shape):
    raise ValueError(f"images must have shape (N, {', '.join(map(str, encoder.image_shape))}), got {images.shape}")
  if images.shape[0] == 0:
    raise ValueError("no images to describe")
  if not question.strip():
    raise ValueError("the question is empty")
  floats = np.stack([pipeline.image_to_float(image) for image in images])
  question_ids = tokenizer.encode(question)
  ids, inputs = prompt_rows(tokenizer, encoder, floats, question_ids)
  out = generate_tokens(
      params,
      model_config,
      ids,
      max_new_tokens=int(max_new_tokens),
      sampling=sampling,
      rng=jax.random.key(seed),
      stop_tokens=(tokenizer.eos_id,),
      mesh=mesh,
      rules=rules,
      prompt_inputs=inputs,
  )
  return [continuation(tokenizer, question_ids, [t for t in new if t != tokenizer.eos_id]).strip() for new in out]


def answer_names(answers: Sequence[str], class_names: Sequence[str]) -> list[int]:
  """The class each answer names, -1 where it names none or several (as a word or a numeral)."""
  out = []
  for answer in answers:
    words = set(answer.lower().replace(".", " ").replace(",", " ").split())
    named = {i for i, name in enumerate(class_names) if name.lower() in words or str(i) in words}
    out.append(named.pop() if len(named) == 1 else -1)
  return out
