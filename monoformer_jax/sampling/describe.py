"""Image understanding at inference: answers about images, written by the LM token by token
through the key/value cache (`decode.py`), from the same prompt the `understand` steps train on
(data/understanding.py): `<s><|im_start|>` [image] `<|im_end|>\\n{question}`; and the prompts of
`InferenceModel.generate(..., images=...)`, which read images where their text says `<image>`."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from monoformer_jax import batch as batch_lib
from monoformer_jax.data import pipeline
from monoformer_jax.data.understanding import understanding_prefix
from monoformer_jax.sampling.text import continuation, generate_ids

IMAGE_PLACEHOLDER = "<image>"  # where a prompt of `reading_pieces` reads one of its images


def prompt_length(encoder, pieces) -> int:
  """Tokens of a prompt given as RowBuilder pieces (text and read images)."""
  return sum(len(v) if kind == "text" else encoder.tokens for kind, v, _ in pieces)


def prompt_batch(encoder, prompts: Sequence[list]) -> tuple[list, dict]:
  """(token-id prompts, their `prompt_inputs` for decode.prefill) of prompts given as RowBuilder
  pieces, all of one length (the image tokens' places are fixed by `kinds`)."""
  lengths = {prompt_length(encoder, p) for p in prompts}
  if len(lengths) != 1:
    raise ValueError(f"prompts that read images must have one length, got {sorted(lengths)}")
  slots = max(sum(kind == "input" for kind, _, _ in p) for p in prompts)
  batch = batch_lib.empty_batch(len(prompts), lengths.pop(), 1, (1, 1, 1), max(slots, 1), encoder.image_shape)
  for r, pieces in enumerate(prompts):
    batch_lib.RowBuilder(batch, r, 1, False, encoder.tokens).add(pieces)
  inputs = {
      "kinds": batch["kinds"],
      "patch_index": batch["patch_index"],
      "input_features": encoder(batch["input_images"]),
  }
  return batch["tokens"].tolist(), inputs


def prompt_rows(tokenizer, encoder, images: np.ndarray, question_ids) -> tuple[list, dict]:
  """`prompt_batch` of one understanding prompt per image."""
  return prompt_batch(encoder, [understanding_prefix(tokenizer, image, question_ids) for image in images])


def reading_pieces(tokenizer, text: str, images: Sequence[np.ndarray]) -> list:
  """RowBuilder pieces of `<s>` + `text` with its k-th IMAGE_PLACEHOLDER replaced by
  `<|im_start|>` [images[k]] `<|im_end|>`, the layout understanding rows read images in (a
  newline right after an image is the tokenizer's newline piece, as there)."""
  parts = text.split(IMAGE_PLACEHOLDER)
  if len(parts) - 1 != len(images):
    raise ValueError(f"the prompt reads {len(parts) - 1} {IMAGE_PLACEHOLDER} but was given {len(images)} image(s)")
  pieces, ids = [], [tokenizer.bos_id]
  for k, part in enumerate(parts):
    if k and part.startswith("\n"):  # after an image, as the understanding rows write it
      ids += tokenizer.newline_ids
      part = part[1:]
    ids += tokenizer.encode(part)
    if k < len(images):
      pieces += [("text", ids + [tokenizer.im_start_id], False), ("input", images[k], None)]
      ids = [tokenizer.im_end_id]
  return pieces + [("text", ids, False)]


def model_space_images(images, shape) -> np.ndarray:
  """(N, *shape) uint8 pixels or model-space floats -> float32 in the model's space."""
  images = np.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
    raise ValueError(f"images must have shape (N, {', '.join(map(str, shape))}), got {images.shape}")
  return np.stack([pipeline.image_to_float(image) for image in images]) if len(images) else images


def describe_images(
    params, model_config, tokenizer, encoder, images: np.ndarray, question: str, **options
) -> list[str]:
  """One answer per image of `images` (N, H, W, C): uint8 pixels, or floats in the model's space
  ([-1, 1] pixels or latents), of the encoder's image shape. `options`: `text.generate_ids`'
  (max_new_tokens, default 16, sampling, seed, mesh, rules)."""
  floats = images_to_describe(images, encoder, question)
  question_ids = tokenizer.encode(question)
  ids, inputs = prompt_rows(tokenizer, encoder, floats, question_ids)
  out = generate_ids(params, model_config, ids, stop_tokens=(tokenizer.eos_id,), prompt_inputs=inputs, **options)
  return [continuation(tokenizer, question_ids, [t for t in new if t != tokenizer.eos_id]).strip() for new in out]


def images_to_describe(images, encoder, question: str) -> np.ndarray:
  """`images` in the model's space (`model_space_images`), refused when there are none or the
  question about them is empty."""
  floats = model_space_images(images, encoder.image_shape)
  if floats.shape[0] == 0:
    raise ValueError("no images to describe")
  if not question.strip():
    raise ValueError("the question is empty")
  return floats


def answer_names(answers: Sequence[str], class_names: Sequence[str]) -> list[int]:
  """The class each answer names, -1 where it names none or several (as a word or a numeral)."""
  out = []
  for answer in answers:
    words = set(answer.lower().replace(".", " ").replace(",", " ").split())
    named = {i for i, name in enumerate(class_names) if name.lower() in words or str(i) in words}
    out.append(named.pop() if len(named) == 1 else -1)
  return out
