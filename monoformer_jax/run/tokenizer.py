"""The run's tokenizer: a SentencePiece `.model` file, or one trained on the run's corpus and kept
in WORKDIR/tokenizer (a run's token ids never change once it has checkpoints)."""

from __future__ import annotations

import os

import jax
from etils import epath
from jax.experimental import multihost_utils

from monoformer_jax.data import captions, registry
from monoformer_jax.data import sequences as seq
from monoformer_jax.data import sources
from monoformer_jax import paths
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.run.checkpoints import step_dirs
from monoformer_jax.run.config import ConfigError


def tokenizer_corpus(config) -> list[str]:
  """Texts a tokenizer is trained on: the text corpus plus the image prompts it will see."""
  texts = []
  d = config.data
  if d.text_source == "pydoc":
    texts.extend(sources.pydoc_passages())
  elif d.text_path:
    source = registry.text_source(d, split="all")
    for i in range(min(len(source), 200_000)):
      rec = source[i]
      if rec is None:
        continue
      texts.extend([rec["text"]] if "text" in rec else [t for pair in rec["turns"] for t in pair])
  names = registry.class_names(d)
  if names:
    texts.extend(t.format(n) for n in names for t in seq.MAIN_TEMPLATES)
  if d.image_source == "mnist_captions":  # small and built in: every caption, as trained
    texts.extend(seq.T2I_PREFIX + c for c in captions.MnistCaptionSource("all").captions())
  if d.understand_source in registry.CONVERSATION_SOURCES and d.understand_path:
    texts.extend(registry.conversation_source(d, (1, 1, 3)).texts(200_000))
  return texts


def init_from_tokenizer(config) -> str:
  """The tokenizer.model inside an `init_from` hf:/official: folder (TinyLlama ships one), or
  "": a run initialised from an LLM speaks that LLM's tokens unless told otherwise."""
  kind, _, path = config.init_from.partition(":")
  if kind in ("hf", "official") and path:
    candidate = epath.Path(path) / "tokenizer.model"
    if candidate.is_file():
      return str(candidate)
  return ""


def build_tokenizer(config, workdir: str):
  """SentencePiece: `config.data.tokenizer` (a .model path; "": the init_from folder's), or
  "train": trained on the corpus. Either way the run keeps its copy in WORKDIR/tokenizer, and a
  run with checkpoints always loads that copy."""
  out_dir = os.path.join(workdir, "tokenizer")
  saved = os.path.join(out_dir, "tokenizer.model")
  if epath.Path(saved).is_file() and step_dirs(workdir):
    # A run's tokenizer is part of the run: resuming or sampling it must never retrain it (a
    # changed corpus or recipe would silently renumber the tokens its weights were trained on),
    # nor need the file it was copied from (a pod worker's TinyLlama folder, when sampling the
    # run's bucket from a laptop).
    return tok_lib.load_sentencepiece(saved)
  spec = config.data.tokenizer or init_from_tokenizer(config)
  if not spec:
    raise ConfigError(
        "config.data.tokenizer: give the path of a SentencePiece tokenizer.model "
        "(e.g. TinyLlama's), or 'train' to train one on the corpus (or init_from a "
        "hf:/official: folder that holds a tokenizer.model)"
    )
  if spec != "train":
    if not epath.Path(spec).is_file():
      raise ConfigError(f"config.data.tokenizer: no such file {spec!r}")
    tokenizer = tok_lib.load_sentencepiece(spec)
    if jax.process_index() == 0 and not step_dirs(workdir):  # a new run (a reader writes nothing)
      epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
      paths.write_bytes_atomic(saved, epath.Path(spec).read_bytes())
    return tokenizer
  if jax.process_count() > 1:
    # Process 0 trains (or finds) the cached model; the others load it after a barrier.
    if jax.process_index() == 0:
      tok_lib.train_sentencepiece(tokenizer_corpus(config), config.data.tokenizer_vocab_size, out_dir)
    multihost_utils.sync_global_devices("monoformer_tokenizer")
  return tok_lib.train_sentencepiece(tokenizer_corpus(config), config.data.tokenizer_vocab_size, out_dir)
