"""CLIP's byte-level BPE tokenizer, read from a transformers CLIP folder (vocab.json + merges.txt,
or tokenizer.json), without transformers or the tokenizers library.

    tok = CLIPTokenizer.from_folder("clip-vit-large-patch14/")
    ids = tok.batch(["a red bus", "two cats"])            # (2, 77) int32: <|startoftext|> ... <|endoftext|>, padded

transformers' CLIPTokenizer, step by step: NFC, runs of whitespace to one space, lowercase; split
into contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits and runs of other
non-space characters (spaces dropped); each piece's UTF-8 bytes mapped to printable characters
(GPT-2's byte-to-unicode table), the last one marked end-of-word (`</w>`), merged by BPE in the
order of merges.txt; a symbol the vocabulary lacks is the unknown token (<|endoftext|>). Letters
and numerals are Unicode's categories L* and N*, as the reference's \\p{L} / \\p{N}.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from typing import Sequence

import numpy as np
from etils import epath

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPECIAL = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_FIXED = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d")


def _kind(char: str) -> str:
  """'L' (a letter), 'N' (a numeral), ' ' (whitespace) or '' (anything else): the reference's
  \\p{L}, \\p{N} and \\s."""
  if char.isspace():
    return " "
  category = unicodedata.category(char)[0]
  return category if category in ("L", "N") else ""


def pieces(text: str) -> list[str]:
  """The reference's split: contractions, runs of letters, single numerals, runs of other
  non-space characters; spaces dropped. (Its pattern names the special tokens too, but they
  never reach it: they are split off first, and a lowercased "<|ENDOFTEXT|>" comes through in
  pieces, as here.)"""
  out, k = [], 0
  while k < len(text):
    fixed = _FIXED.match(text, k)
    if fixed:
      out.append(fixed.group())
      k = fixed.end()
      continue
    kind = _kind(text[k])
    end = k + 1
    if kind != "N":  # numerals stand alone; letters and other characters run on
      while end < len(text) and _kind(text[end]) == kind:
        end += 1
    if kind != " ":
      out.append(text[k:end])
    k = end
  return out


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's table: every byte -> a printable character (printable Latin-1 bytes map to
  themselves, the others to code points from 256 on)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class CLIPTokenizer:
  """Byte-level BPE with CLIP's end-of-word marker; `batch` adds <|startoftext|> / <|endoftext|>."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], source: str = "<memory>"):
    self.vocab, self.source = dict(vocab), source
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    missing = [t for t in (BOS, EOS) if t not in self.vocab]
    if missing:
      raise ValueError(f"{source}: the vocabulary has no {', '.join(missing)}")
    self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
    self.unk_id = self.pad_id = self.eos_id
    self.byte_chars = bytes_to_unicode()
    self._bpe = functools.lru_cache(maxsize=65536)(self._merge)

  @classmethod
  def from_folder(cls, path) -> "CLIPTokenizer":
    """vocab.json + merges.txt (openai/clip-vit-* folders), else tokenizer.json."""
    folder = os.fspath(path)
    vocab_path, merges_path = epath.Path(folder) / "vocab.json", epath.Path(folder) / "merges.txt"
    json_path = epath.Path(folder) / "tokenizer.json"
    try:
      if vocab_path.is_file() and merges_path.is_file():
        lines = [line for line in merges_path.read_text(encoding="utf-8").split("\n") if line]
        merges = [tuple(line.split(" ")) for line in lines if not line.startswith("#version")]
        return cls(json.loads(vocab_path.read_text(encoding="utf-8")), merges, str(vocab_path))
      if json_path.is_file():
        model = json.loads(json_path.read_text(encoding="utf-8"))["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        vocab = dict(model["vocab"])
        for token in json.loads(json_path.read_text(encoding="utf-8")).get("added_tokens", []):
          vocab.setdefault(token["content"], token["id"])
        return cls(vocab, merges, str(json_path))
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
      raise ValueError(f"{folder}: not a CLIP tokenizer ({type(e).__name__}: {e})") from e
    raise FileNotFoundError(f"{folder}: no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)")

  def _merge(self, piece: str) -> tuple[str, ...]:
    symbols = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(symbols) > 1:
      pairs = [(self.ranks.get((a, b), np.inf), k) for k, (a, b) in enumerate(zip(symbols[:-1], symbols[1:]))]
      rank, _ = min(pairs)
      if rank == np.inf:
        break
      pair = next(tuple(symbols[k : k + 2]) for r, k in pairs if r == rank)
      merged, k = [], 0
      while k < len(symbols):  # every occurrence of the pair, left to right
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
          merged.append(symbols[k] + symbols[k + 1])
          k += 2
        else:
          merged.append(symbols[k])
          k += 1
      symbols = merged
    return tuple(symbols)

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without the <|startoftext|> / <|endoftext|> around it (written in the
    text, they are those tokens: split off first, as the reference's added tokens are)."""
    ids = []
    for part in _SPECIAL.split(text):
      if part in (BOS, EOS):
        ids.append(self.vocab[part])
        continue
      for piece in pieces(re.sub(r"\s+", " ", unicodedata.normalize("NFC", part)).lower()):
        chars = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
        ids += [self.vocab.get(s, self.unk_id) for s in self._bpe(chars)]
    return ids

  def batch(self, texts: Sequence[str], length: int = 77) -> np.ndarray:
    """(N, length) int32: <|startoftext|> ids <|endoftext|>, cut to `length` (the end-of-text
    kept: the text tower pools there) and padded with the pad id after it."""
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self.encode(text)[: length - 2], self.eos_id]
      out[row, : len(ids)] = ids
    return out
