"""SentencePiece tokenizer with MonoFormer's special tokens.

The official code loads TinyLlama's LLaMA SentencePiece model (32000 pieces, `<unk>`=0, `<s>`=1,
`</s>`=2, byte fallback so "\\n" is the byte piece `<0x0A>` = 13) and appends four tokens after the
base vocabulary, in this order: `<PAD>`, `<image>`, `<|im_start|>`, `<|im_end|>` (32000..32003).
We keep those ids for any base model: a base vocabulary of n pieces gets the specials n..n+3.

The specials live outside the SentencePiece model (they are not in its proto), so `encode` splits
the text on their literal strings first, as the Hugging Face tokenizer does with added tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm
from etils import epath

from monoformer_jax import paths

SPECIAL_TOKENS = ("<PAD>", "<image>", "<|im_start|>", "<|im_end|>")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

# Bump when the training recipe below changes, so cached models are retrained.
_TRAIN_RECIPE_VERSION = 1


class Tokenizer:
  """A SentencePiece model plus the four MonoFormer special tokens appended after its pieces."""

  def __init__(self, model_proto: bytes, source: str = "<memory>"):
    self.source = source
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    n = self.sp.get_piece_size()
    if n == 0:  # an empty proto parses as a model of no pieces (e.g. an empty file)
      raise ValueError(f"{source}: not a SentencePiece model (no pieces)")
    self.base_vocab_size = n
    self.pad_id, self.image_id, self.im_start_id, self.im_end_id = n, n + 1, n + 2, n + 3
    self.vocab_size = n + len(SPECIAL_TOKENS)
    self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(
          f"{source}: the SentencePiece model has no <s>/</s> (bos {self.bos_id}, "
          f"eos {self.eos_id}); LLaMA-style models define them as 1 and 2"
      )
    self.special_ids = dict(zip(SPECIAL_TOKENS, range(n, n + len(SPECIAL_TOKENS))))
    # "\n" as LLaMA's tokenizer writes it after <|im_end|>: the byte piece alone (id 13), not the
    # "▁\n" a plain encode("\n") can give through the dummy-prefix space.
    nl = self.sp.piece_to_id("<0x0A>")
    self.newline_ids = [nl] if nl != self.unk_id else self.sp.encode("\n")

  def __repr__(self) -> str:
    return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Text -> ids. Literal special-token strings in `text` become their ids."""
    ids = [self.bos_id] if bos else []
    for part in _SPECIAL_RE.split(text):
      if not part:
        continue
      if part in self.special_ids:
        ids.append(self.special_ids[part])
      else:
        ids.extend(self.sp.encode(part))
    if eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Ids -> text. Special tokens (and bos/eos) are dropped, or written out when not skipped."""
    out, run = [], []
    for i in (int(i) for i in ids):
      if i >= self.base_vocab_size or i in (self.bos_id, self.eos_id):
        if run:
          out.append(self.sp.decode(run))
          run = []
        if not skip_special:
          out.append(SPECIAL_TOKENS[i - self.base_vocab_size] if i >= self.base_vocab_size else self.sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(self.sp.decode(run))
    return "".join(out)


def load_sentencepiece(path: str) -> Tokenizer:
  """Loads a SentencePiece `tokenizer.model` (e.g. TinyLlama's) and appends the special tokens."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"SentencePiece model not found: {path}")
  proto = epath.Path(path).read_bytes()
  try:
    return Tokenizer(proto, source=os.fspath(path))
  except RuntimeError as e:  # sentencepiece raises RuntimeError on a bad proto
    raise ValueError(f"{path}: not a SentencePiece model ({e})") from e


def _texts_digest(texts: Sequence[str]) -> str:
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()


def train_sentencepiece(
    texts: Sequence[str], vocab_size: int, out_dir: str, model_type: str = "bpe", name: str = "tokenizer"
) -> Tokenizer:
  """Trains a LLaMA-like SentencePiece model on `texts`, cached in `out_dir`.

  `vocab_size` is the base size (the four specials come on top). The model file is reused when a
  sidecar JSON records the same settings and the same texts (by hash); otherwise it is retrained.
  LLaMA's conventions: BPE, byte fallback, no text normalisation, unk/bos/eos = 0/1/2.
  """
  texts = [t for t in texts if t]
  settings = {
      "recipe": _TRAIN_RECIPE_VERSION,
      "vocab_size": int(vocab_size),
      "model_type": model_type,
      "texts_sha256": _texts_digest(texts),
      "num_texts": len(texts),
  }
  model_path = epath.Path(out_dir) / (name + ".model")
  meta_path = epath.Path(out_dir) / (name + ".json")
  if model_path.exists() and meta_path.exists():
    try:
      cached = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
      cached = None
    if cached == settings:
      return load_sentencepiece(model_path)
  if not texts:
    raise ValueError("train_sentencepiece: no texts to train on")
  buf = io.BytesIO()
  try:
    _train(texts, vocab_size, model_type, buf)
  except RuntimeError as e:  # e.g. a vocab_size below 256 byte pieces + the corpus characters
    raise ValueError(f"train_sentencepiece(vocab_size={vocab_size}) failed: {e}") from e
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  # Write model, then metadata, each atomically: a crash in between leaves a mismatch -> retrain.
  paths.write_bytes_atomic(model_path, buf.getvalue())
  paths.write_text_atomic(meta_path, json.dumps(settings, indent=1))
  return load_sentencepiece(model_path)


def _train(texts, vocab_size: int, model_type: str, buf) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=buf,
      vocab_size=int(vocab_size),
      model_type=model_type,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      max_sentence_length=1 << 16,
      num_threads=2,
      minloglevel=2,
      # Keep every character seen. hard_vocab_limit=False: a corpus too small for vocab_size
      # gives fewer pieces instead of failing (the specials then start at the smaller size).
      character_coverage=1.0,
      hard_vocab_limit=False,
  )
