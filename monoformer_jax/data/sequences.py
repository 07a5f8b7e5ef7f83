"""Samples in the official MonoFormer sequence formats, as `RowBuilder` pieces.

A sample is a list of pieces ("text", ids, train) / ("image", array, label) (model/inputs.py):

  image sample  <s> prompt <|im_start|>  [t-token] <P image tokens>  <|im_end|> \\n </s>
  CFG dropout   <s> <|im_start|> [t] <P> <|im_end|> \\n </s>          (the prompt is dropped)
  text sample   <s> text </s>   (dialogues: chat_format.py)
  document      <s> text <|im_start|> [image] <|im_end|> \\n text <|im_start|> [image] ... </s>
                (several images, generated or read, between text: `document_sample`)

The official LM loss covers only samples that do not generate an image, so an image sample's text
is untrained unless `train_text=True`. Class-conditional prompts come from the official templates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from monoformer_jax.data.tokenizer import Tokenizer

# single_image branch (the paper / ImageNet checkpoint) and main branch (adds one more).
OFFICIAL_TEMPLATES = ("Please generate an image of {}.", "{}", "an image of {}.")
MAIN_TEMPLATES = OFFICIAL_TEMPLATES + ("an photo of {}.",)
# Text-to-image prompts (JourneyDB) get this prefix in the official code.
T2I_PREFIX = "Please generate an image of "
# The prompt used for sampling and FID (`sample_ddp.py`).
SAMPLING_TEMPLATE = "Please generate an image of {}."


def class_prompt(class_name: str, rng: np.random.Generator, templates: Sequence[str] = MAIN_TEMPLATES) -> str:
  """A class name put into a template chosen at random (as the official ImageNet loader does)."""
  return templates[int(rng.integers(len(templates)))].format(class_name)


def image_sample(
    tok: Tokenizer,
    prompt_ids: Sequence[int],
    image: np.ndarray,
    label: int,
    train_text: bool = False,
    tail: bool = True,
) -> list:
  """`<s>{prompt}<|im_start|>` [image] `<|im_end|>\\n</s>`; an empty prompt is the CFG-dropout form.

  tail=False leaves out `<|im_end|>\\n</s>`. With untrained text that changes no loss: the tail
  carries no LM target and nothing before it attends to it (the mask is causal towards later
  text), so a pure image row is 3 tokens shorter at no cost in exactness.
  """
  head = [tok.bos_id, *prompt_ids, tok.im_start_id]
  pieces = [("text", head, train_text), ("image", image, label)]
  if tail:
    pieces.append(("text", [tok.im_end_id, *tok.newline_ids, tok.eos_id], train_text))
  return pieces


def sampling_prefix(tok: Tokenizer, prompt: str | None) -> list[int]:
  """Ids before the image when sampling: `<s>{prompt}<|im_start|>` (None/"" = unconditional)."""
  return [tok.bos_id, *(tok.encode(prompt) if prompt else []), tok.im_start_id]


def text_sample(tok: Tokenizer, segments: Sequence[tuple[Sequence[int], bool]], max_len: int) -> list:
  """`<s> seg1 seg2 ... </s>` cut to at most max_len tokens; each segment carries its train flag.

  bos is never a target; eos is trained with the last segment. Cutting drops the tail (and eos),
  as the official `tokenizer_max_length` truncation does.
  """
  pieces, n = [], 1
  pieces.append(("text", [tok.bos_id], False))
  for ids, train in segments:
    pieces.append(("text", list(ids), train))
    n += len(ids)
  last_train = segments[-1][1] if segments else True
  pieces.append(("text", [tok.eos_id], last_train))
  n += 1
  if n > max_len:
    pieces = _truncate_text(pieces, max_len)
  # RowBuilder links adjacent text pieces of a sample into one next-token chain.
  return [p for p in pieces if len(p[1])]


def _truncate_text(pieces: list, max_len: int) -> list:
  out, left = [], max_len
  for kind, ids, train in pieces:
    take = list(ids[:left])
    out.append((kind, take, train))
    left -= len(take)
  return out


def sample_length(pieces, num_patches: int, t_token: bool) -> int:
  return sum(len(v) if k == "text" else num_patches + int(t_token) for k, v, _ in pieces)


def image_seq_len(max_prompt_tokens: int, num_patches: int, t_token: bool, tok: Tokenizer, tail: bool = True) -> int:
  """Smallest static row length holding one image sample with a prompt of max_prompt_tokens."""
  return 1 + max_prompt_tokens + 1 + int(t_token) + num_patches + ((1 + len(tok.newline_ids) + 1) if tail else 0)


def max_class_prompt_tokens(
    tok: Tokenizer, class_names: Sequence[str], templates: Sequence[str] = MAIN_TEMPLATES
) -> int:
  """Longest tokenized class prompt over every class and template (exact, so no truncation)."""
  return max(len(tok.encode(t.format(c))) for c in class_names for t in templates)


def document_sample(tok: Tokenizer, parts: Sequence[tuple], train_text: bool = True) -> list:
  """`<s>` parts `</s>`, each image between `<|im_start|>` and `<|im_end|>\\n`: one sample holding
  several images (the official format allows one generated image per sample; here each image
  is its own block with its own noise level, model/mask.py).

  parts: ("text", ids) (trained when `train_text`), ("text", ids, train) (its own flag: e.g.
  what a read image shows), ("image", array, label) (an image to generate) or ("input", array)
  (an image to read). With `train_text`, the `<|im_start|>` before a generated image is trained
  with the text: a model that writes documents has to choose it to open an image itself. Before
  a read image it is not: the reader gets that image, it does not draw one there.
  """
  pieces = [("text", [tok.bos_id], False)]
  for part in parts:
    if part[0] == "text":
      pieces.append(("text", list(part[1]), part[2] if len(part) > 2 else train_text))
      continue
    generated = part[0] == "image"
    pieces.append(("text", [tok.im_start_id], train_text and generated))
    pieces.append(("image", part[1], part[2]) if generated else ("input", part[1], None))
    pieces.append(("text", [tok.im_end_id, *tok.newline_ids], train_text))
  pieces.append(("text", [tok.eos_id], train_text))
  return [p for p in pieces if p[0] != "text" or len(p[1])]


def cut_document(pieces: list, lengths: dict, max_len: int, max_images: int, max_inputs: int, open_id: int) -> list:
  """The head of a document's pieces that fits a row: at most `max_len` tokens, `max_images`
  generated and `max_inputs` read images. `lengths`: the tokens of an "image" and of an "input"
  piece. Text is cut anywhere (as `text_sample` cuts); an image that does not fit ends the
  sample, and the `<|im_start|>` (`open_id`) opening it goes too: nothing would follow it."""
  out, used = [], 0
  left = {"image": max_images, "input": max_inputs}
  for kind, value, extra in pieces:
    if kind == "text":
      take = list(value[: max_len - used])
      out.append((kind, take, extra))
      used += len(take)
      if len(take) < len(value):
        break
      continue
    if used + lengths[kind] > max_len or not left[kind]:
      if out and out[-1][0] == "text" and out[-1][1][-1:] == [open_id]:
        out[-1] = ("text", out[-1][1][:-1], out[-1][2])
      break
    out.append((kind, value, extra))
    used += lengths[kind]
    left[kind] -= 1
  return [p for p in out if p[0] != "text" or len(p[1])]
