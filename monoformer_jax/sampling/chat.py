"""Chat and reading at inference: a dialogue's prompt written by data/chat_format.py (the layout
its training rows hold, in the run's template), answered by the LM through the key/value cache
until `</s>`; images read where a turn says `<image>`.

    answers = chat(params, config, tok, ["Can you briefly introduce Berlin?", "And Paris?"], template="none")
    answers = describe_images(params, config, tok, encoder, images, "What is in the image?", template="none")

A dialogue is a list of turns: a user turn alone (a string: the model answers it, and its answer
becomes part of what the next turn reads) or a (user, answer) pair given as history.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from monoformer_jax.data import chat_format
from monoformer_jax.sampling import describe as describe_lib
from monoformer_jax.sampling.decode import generate_tokens
from monoformer_jax.sampling.text import continuation, generate_ids
from monoformer_jax.sampling.tokens import TokenSampling


def _prompt(encoder, pieces) -> tuple[list, Optional[dict]]:
  """(token-id prompts, prompt_inputs) of one prompt's pieces."""
  if encoder is None or all(kind == "text" for kind, _, _ in pieces):
    return [chat_format.prompt_ids(pieces)], None
  return describe_lib.prompt_batch(encoder, [pieces])


def answer_text(tokenizer, prompt_pieces, new_ids) -> str:
  """The answer `new_ids` write after a prompt, cut at `</s>`, decoded against the prompt's last
  text (SentencePiece's leading space) and stripped."""
  new = list(new_ids)
  if tokenizer.eos_id in new:
    new = new[: new.index(tokenizer.eos_id)]
  return continuation(tokenizer, prompt_pieces[-1][1], new).strip()


def chat(
    params,
    model_config,
    tokenizer,
    turns: Sequence,
    *,
    template: str,
    images: Sequence = (),
    encoder=None,
    max_new_tokens: int = 64,
    sampling: TokenSampling = TokenSampling(),
    seed: int = 0,
    mesh=None,
    rules=None,
) -> list[str]:
  """The model's answer to each user turn given alone (in order), the dialogue so far in front
  of each: earlier turns with their given or written answers, and the images they read (uint8
  pixels or model-space floats of the encoder's shape, one per `<image>` over all turns)."""
  chat_format.check_template(template)
  turns = [(t, None) if isinstance(t, str) else tuple(t) for t in turns]
  if not turns or any(not isinstance(u, str) or not u.strip() for u, _ in turns):
    raise ValueError("chat: give user turns (non-empty strings, or (user, answer) pairs)")
  needed = sum(chat_format.placeholders(u) for u, _ in turns)
  if needed != len(images):
    raise ValueError(
        f"the dialogue reads {needed} {chat_format.IMAGE_PLACEHOLDER} but was given {len(images)} image(s)"
    )
  if needed and encoder is None:
    raise ValueError("this model does not read images")
  floats = list(describe_lib.model_space_images(np.asarray(images), encoder.image_shape)) if needed else []
  history, answers, used = [], [], 0
  for k, (user, given) in enumerate(turns):
    used += chat_format.placeholders(user)
    if given is None:
      pieces = chat_format.dialogue_pieces(tokenizer, [*history, (user, None)], template, floats[:used])
      ids, inputs = _prompt(encoder, pieces)
      (new,) = generate_tokens(
          params,
          model_config,
          ids,
          max_new_tokens=int(max_new_tokens),
          sampling=sampling,
          rng=jax.random.fold_in(jax.random.key(seed), k),
          stop_tokens=(tokenizer.eos_id,),
          mesh=mesh,
          rules=rules,
          prompt_inputs=inputs,
      )
      given = answer_text(tokenizer, pieces, new)
      answers.append(given)
    history.append((user, given))
  return answers


def describe_images(
    params,
    model_config,
    tokenizer,
    encoder,
    images,
    question: str,
    *,
    template: str,
    **options,
) -> list[str]:
  """One answer per image (N, H, W, C; uint8 pixels or model-space floats of the encoder's
  shape) to `<image>\\n{question}` in the template, all in one batch (the prompts share a
  length). Under the template "none" this is the understanding rows' prompt
  (data/understanding.py: `<s><|im_start|>` [image] `<|im_end|>\\n{question}`). `options`:
  `text.generate_ids`' (max_new_tokens, default 16, sampling, seed, mesh, rules)."""
  floats = describe_lib.images_to_describe(images, encoder, question)
  turn = f"{chat_format.IMAGE_PLACEHOLDER}\n{question}"
  prompts = [chat_format.dialogue_pieces(tokenizer, [(turn, None)], template, [image]) for image in floats]
  ids, inputs = describe_lib.prompt_batch(encoder, prompts)
  out = generate_ids(params, model_config, ids, stop_tokens=(tokenizer.eos_id,), prompt_inputs=inputs, **options)
  return [answer_text(tokenizer, pieces, new) for pieces, new in zip(prompts, out)]
