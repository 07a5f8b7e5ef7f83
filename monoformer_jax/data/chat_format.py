"""Dialogues in the official formats: the one place where training rows and inference prompts
are written, so that what a row trains is what `chat` / `describe` prompt with.

Two templates (the official configs' `use_chat_template` off / on):

  none             <s>{user} {answer}</s> <s>{user} {answer}</s> ...
                   (`tokenize_conversation` without a template: each user turn is `<s>{content}`,
                   each answer `{content}</s>`, tokenized apart)
  human_assistant  <s>### Human: {user}### Assistant: {answer}</s> <s>### Human: ...
                   (the configs' `chat_template`: the official text demo's `### Human: ...
                   ### Assistant:` form, with eos after each answer)

A prompt at inference is the same pieces up to the open answer: for `human_assistant` the turn's
`### Assistant:` is given and the model writes the answer. An image a turn reads stands where its
text says `<image>`: `<|im_start|>` [image tokens] `<|im_end|>`, and a newline right after the
placeholder is the tokenizer's newline piece (the layout of the official multimodal inference,
`<|im_start|><image><|im_end|>\\n{question}`; its LLaVA training put the bare image tokens, and
a t-token, where `<image>` stood: one layout for both here).

Pieces are `batch.RowBuilder` pieces: ("text", ids, train) and ("input", image, None).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from monoformer_jax.data.tokenizer import Tokenizer

TEMPLATES = ("none", "human_assistant")
IMAGE_PLACEHOLDER = "<image>"
HUMAN = "### Human: "
ASSISTANT = "### Assistant:"


def check_template(template: str) -> str:
  """`template`, or a ValueError naming it and the known ones."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown chat template {template!r} (one of {', '.join(TEMPLATES)})")
  return template


def official_train_on_prompt(template: str) -> bool:
  """Whether the official code trains the user turns too (`train_on_source = not
  use_chat_template`): text dialogues follow it; image conversations train their answers only."""
  return check_template(template) == "none"


def placeholders(text: str) -> int:
  return text.count(IMAGE_PLACEHOLDER)


def user_pieces(tok: Tokenizer, text: str, images: Optional[Iterator], template: str, train: bool = False) -> list:
  """`<s>[### Human: ]{text}`, each `<image>` of `text` replaced by the next of `images`
  (None: a text dialogue, where `<image>` is only text)."""
  if check_template(template) == "human_assistant":
    text = HUMAN + text.strip()
  parts = text.split(IMAGE_PLACEHOLDER) if images is not None else [text]
  pieces, ids = [], [tok.bos_id]
  for k, part in enumerate(parts):
    if k:  # after an image
      ids = [tok.im_end_id]
      if part.startswith("\n"):
        ids += tok.newline_ids
        part = part[1:]
    ids += tok.encode(part)
    if k < len(parts) - 1:
      pieces += [("text", ids + [tok.im_start_id], train), ("input", next(images), None)]
  return pieces + [("text", ids, train)]


def answer_header(tok: Tokenizer, template: str) -> list[int]:
  """What opens an answer before the model writes it: `### Assistant:` or nothing."""
  return tok.encode(ASSISTANT) if check_template(template) == "human_assistant" else []


def answer_pieces(tok: Tokenizer, answer: str, template: str) -> list:
  """`[### Assistant:]` (untrained: the prompt gives it) then `{answer}</s>` (trained)."""
  header = answer_header(tok, template)
  return ([("text", header, False)] if header else []) + [("text", [*tok.encode(answer), tok.eos_id], True)]


def dialogue_pieces(
    tok: Tokenizer,
    turns: Sequence[tuple[str, Optional[str]]],
    template: str,
    images: Optional[Sequence] = None,
    train_prompt: bool = False,
) -> list:
  """Pieces of [(user, answer), ...] in `template`; `images` are read where the user turns say
  `<image>`, in order (None: a text dialogue, reading nothing). The last answer may be None:
  the pieces then end where the model writes it (a prompt). `train_prompt` trains the user
  turns too."""
  stream = None
  if images is not None:
    needed = sum(placeholders(u) for u, _ in turns)
    if needed != len(images):
      raise ValueError(f"the dialogue reads {needed} {IMAGE_PLACEHOLDER} but was given {len(images)} image(s)")
    stream = iter(images)
  pieces = []
  for k, (user, answer) in enumerate(turns):
    pieces += user_pieces(tok, user, stream, template, train_prompt)
    if answer is None:
      if k != len(turns) - 1:
        raise ValueError(f"turn {k} of {len(turns)} has no answer: only the last turn may be open")
      header = answer_header(tok, template)
      if header:
        pieces.append(("text", header, False))
      break
    pieces += answer_pieces(tok, answer, template)
  return [p for p in pieces if p[0] != "text" or len(p[1])]


def prompt_ids(pieces) -> list[int]:
  """The token ids of text-only pieces (a prompt that reads no image)."""
  if any(kind != "text" for kind, _, _ in pieces):
    raise ValueError("the prompt reads images: lay it out with batch.RowBuilder")
  return [i for _, ids, _ in pieces for i in ids]
