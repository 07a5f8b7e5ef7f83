"""LLaVA instruction data (`llava_v1_5_mix665k.json`) as a random-access source.

The file is a JSON list of records

    {"id": ..., "image": "coco/train2017/000000033471.jpg",        (relative to the image root)
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

(or the same records one per line, `.jsonl`). A record becomes {"turns": [(question, answer),
...], "image": uint8 (S, S, 3)} (the image centre-cropped as image files are, image_sources.py);
a record without "image" is a text-only dialogue: {"turns"}. The rows it makes
(data/conversations.py) read the image where the turn says `<image>`.

The list is indexed once (each record's byte span, found by parsing the file as bytes), then
records are read and parsed one at a time, so a process holds no parsed copy of the 665k
records. A file that is not a JSON list stops the run, naming the byte where it breaks. A bad
record (not a dialogue of human / gpt turns in turn, `<image>` that does not match the record's
image, an image file missing or unreadable) is named with its index (`BadRecordError`), or with
`skip_bad_records` skipped and counted like every source's (the official loader substitutes a
blank 224x224 image for a missing one and trains on it: we do not).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from etils import epath

from monoformer_jax.data import chat_format
from monoformer_jax.data.image_sources import load_image
from monoformer_jax.data.sources import BadRecordError, Source, _check_files

_SPACE = re.compile(r"[ \t\n\r]*")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def json_list_spans(path: str) -> np.ndarray:
  """(N, 2) byte spans of the elements of the JSON list in `path`. Parsed as Latin-1 text, in
  which every byte is one character, so the parser's offsets are byte offsets (UTF-8 is decoded
  per record when read). Raises BadRecordError naming the byte where the list breaks."""
  text = epath.Path(path).read_bytes().decode("latin-1")
  decoder = json.JSONDecoder()
  spans = []

  def fail(pos: int, what: str):
    return BadRecordError(f"{path}: not a JSON list of records: {what} at byte {pos} (after {len(spans)} records)")

  pos = _SPACE.match(text).end()
  if not text.startswith("[", pos):
    raise fail(pos, "no '['")
  pos = _SPACE.match(text, pos + 1).end()
  if text.startswith("]", pos):
    return np.zeros((0, 2), np.int64)
  while True:
    try:
      _, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise fail(e.pos, e.msg) from None
    except RecursionError:
      raise fail(pos, "a record nested too deeply") from None
    spans.append((pos, end))
    pos = _SPACE.match(text, end).end()
    if text.startswith("]", pos):
      break
    if not text.startswith(",", pos):
      raise fail(
          pos, "no ',' or ']' after a record" + ("; the file ends early: cut short?" if pos == len(text) else "")
      )
    pos = _SPACE.match(text, pos + 1).end()
  return np.asarray(spans, np.int64)


def parse_conversation(obj) -> tuple[list, str | None] | str:
  """A record -> ([(question, answer), ...], image path or None), or what is wrong with it."""
  if not isinstance(obj, dict):
    return "expected a JSON object"
  messages = obj.get("conversations")
  if not isinstance(messages, list) or not messages:
    return 'no "conversations" list'
  image = obj.get("image")
  if image is not None and not (isinstance(image, str) and image):
    return '"image" is not a path'
  turns, question = [], None
  for j, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in ROLES:
      return f'"conversations"[{j}] is not {{"from": "human" | "gpt", "value": text}}'
    role = ROLES[m["from"]]
    if (role == "user") != (question is None):
      return (
          f'"conversations"[{j}] is a {m["from"]!r} turn where a {"human" if question is None else "gpt"} turn belongs'
      )
    if role == "user":
      question = m["value"]
      continue
    if chat_format.placeholders(m["value"]):
      return f'"conversations"[{j}]: an answer with {chat_format.IMAGE_PLACEHOLDER}'
    turns.append((question, m["value"]))
    question = None
  if question is not None:
    return "the last question has no answer"
  count = sum(chat_format.placeholders(q) for q, _ in turns)
  if count != (1 if image else 0):
    has = f"an image ({image!r})" if image else "no image"
    return f"{count} {chat_format.IMAGE_PLACEHOLDER} in its questions, but it has {has}"
  return turns, image


class LlavaSource(Source):
  """LLaVA conversations: {"turns": [(question, answer), ...]} plus "image" (uint8 (S, S, C))
  when the record has one. `image_root` resolves the records' image paths (default: the
  file's folder); `image_size` S centre-crops them (None: as stored)."""

  def __init__(
      self, path: str, image_root: str = "", image_size: int | None = None, channels: int = 3, skip_bad_records=False
  ):
    self.paths = _check_files([path])
    self.path = self.paths[0]
    self.image_root = image_root or os.path.dirname(self.path)
    if not epath.Path(self.image_root).is_dir():
      raise FileNotFoundError(f"{self.image_root}: LLaVA image root not found")
    self.image_size, self.channels, self.skip_bad_records = image_size, channels, skip_bad_records
    if self.path.endswith(".jsonl"):
      self._lines = self._line_index("line", "records")
      self._spans = None
    else:
      self._lines, self._spans = None, json_list_spans(self.path)
    if len(self) == 0:
      raise BadRecordError(f"{self.path}: no records")

  def __len__(self) -> int:
    return len(self._lines) if self._lines is not None else len(self._spans)

  def record_name(self, i: int) -> str:
    where = f" ({self._lines.where(i)})" if self._lines is not None else ""
    return f"{self.path}: record {i}{where}"

  def _raw(self, i: int) -> bytes:
    if self._lines is not None:
      return self._lines.read(i)
    start, end = (int(v) for v in self._spans[i])
    with epath.Path(self.path).open("rb") as f:
      f.seek(start)
      return f.read(end - start)

  def __getitem__(self, i: int):
    try:
      obj = json.loads(self._raw(i).decode("utf-8"))
    except UnicodeDecodeError as e:
      return self._bad(f"{self.record_name(i)}: not UTF-8 text ({e.reason} at byte {e.start} of the record)")
    except (json.JSONDecodeError, RecursionError) as e:  # a .jsonl line
      return self._bad(f"{self.record_name(i)}: malformed JSON ({e})")
    parsed = parse_conversation(obj)
    if isinstance(parsed, str):
      return self._bad(f"{self.record_name(i)}: {parsed}")
    turns, image = parsed
    record = {"turns": turns}
    if image:
      try:
        record["image"] = load_image(os.path.join(self.image_root, image), self.image_size, self.channels)
      except BadRecordError as e:
        return self._bad(f"{self.record_name(i)}: {e}")
    return record

  def texts(self, limit: int | None = None) -> list[str]:
    """The questions and answers of the first `limit` good records (a tokenizer's corpus)."""
    out = []
    for i in range(min(len(self), limit or len(self))):
      try:
        obj = json.loads(self._raw(i).decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        continue
      parsed = parse_conversation(obj)
      if not isinstance(parsed, str):
        out += [t.replace(chat_format.IMAGE_PLACEHOLDER, "") for pair in parsed[0] for t in pair]
    return out

  def __repr__(self) -> str:
    return (
        f"LlavaSource(path={self.path!r}, image_root={self.image_root!r}, image_size={self.image_size}, n={len(self)})"
    )
