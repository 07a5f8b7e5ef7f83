"""Tokenizer: official special ids, roundtrip, cache reuse, clear errors."""

import os
import random
import string

import ml_collections
import pytest

from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.run import tokenizer as setup


def _random_corpus(seed: int, n: int = 300) -> list[str]:
  rng = random.Random(seed)
  words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(150)]
  return [" ".join(rng.choices(words, k=rng.randint(5, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_seed):
  out = tmp_path_factory.mktemp("tok")
  corpus = _random_corpus(module_seed("corpus"))
  return tok_lib.train_sentencepiece(corpus, 500, str(out)), corpus, str(out)


def test_special_ids_follow_base_vocab(trained):
  tok, _, _ = trained
  n = tok.base_vocab_size
  assert n == tok.sp.get_piece_size()
  assert (tok.pad_id, tok.image_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2, n + 3)
  assert tok.vocab_size == n + 4
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # LLaMA's SentencePiece layout
  assert tok.newline_ids == [13]  # byte piece <0x0A>, as "\n" after <|im_end|> in the official ids


def test_roundtrip_and_specials(trained, seed):
  tok, corpus, _ = trained
  rng = random.Random(seed)
  for text in rng.sample(corpus, 5):
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert max(ids) < tok.base_vocab_size
    assert tok.decode(ids) == text
  # Characters never seen in training survive through byte fallback.
  assert tok.decode(tok.encode("Zürich\n€ 42")) == "Zürich\n€ 42"
  ids = tok.encode("ab<|im_start|><image><|im_end|>\n<PAD>")
  i = ids.index(tok.im_start_id)
  assert ids[i : i + 3] == [tok.im_start_id, tok.image_id, tok.im_end_id]
  assert tok.encode("ab") == ids[:i]
  assert ids[-1] == tok.pad_id
  assert tok.decode(ids, skip_special=False).endswith("<|im_start|><image><|im_end|>\n<PAD>")
  assert tok.decode([tok.bos_id, *tok.encode("hello"), tok.eos_id]) == "hello"


def test_cache_reuse_and_retrain(trained, tmp_path):
  tok, corpus, _ = trained
  out = str(tmp_path)
  tok = tok_lib.train_sentencepiece(corpus, 500, out)
  model = os.path.join(out, "tokenizer.model")
  mtime = os.stat(model).st_mtime_ns
  again = tok_lib.train_sentencepiece(corpus, 500, out)
  assert os.stat(model).st_mtime_ns == mtime  # reused, not rewritten
  assert again.encode(corpus[0]) == tok.encode(corpus[0])
  other = tok_lib.train_sentencepiece(corpus[:200], 400, out)  # settings differ: retrain
  assert os.stat(model).st_mtime_ns != mtime
  assert other.base_vocab_size <= 400


def test_vocab_too_small_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    tok_lib.train_sentencepiece(["some words here"] * 10, 100, str(tmp_path))


def test_load_errors(tmp_path, rng):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.load_sentencepiece(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(rng.bytes(64))
  with pytest.raises(ValueError, match="bad.model"):
    tok_lib.load_sentencepiece(str(bad))


def test_load_sentencepiece_file(trained):
  tok, corpus, out = trained
  loaded = tok_lib.load_sentencepiece(os.path.join(out, "tokenizer.model"))
  assert loaded.vocab_size == tok.vocab_size and loaded.im_end_id == tok.im_end_id
  assert loaded.encode(corpus[1]) == tok.encode(corpus[1])


def test_a_run_with_checkpoints_keeps_its_tokenizer(tmp_path, monkeypatch, seed):
  """Resuming or sampling a run never retrains its tokenizer, even if the corpus changed since."""
  config = ml_collections.ConfigDict({"data": {"tokenizer": "train", "tokenizer_vocab_size": 300}})
  first = _random_corpus(seed)
  monkeypatch.setattr(setup, "tokenizer_corpus", lambda c: first)
  tok = setup.build_tokenizer(config, str(tmp_path))
  text = first[0]
  # Before any checkpoint a changed corpus retrains (the cache is keyed by the corpus) ...
  second = _random_corpus(seed + 1)
  monkeypatch.setattr(setup, "tokenizer_corpus", lambda c: second)
  assert setup.build_tokenizer(config, str(tmp_path)).encode(text) != tok.encode(text)
  # ... once the run has a checkpoint, its saved tokenizer is what every later call gets.
  saved = setup.build_tokenizer(config, str(tmp_path))
  os.makedirs(tmp_path / "checkpoints" / "10")
  monkeypatch.setattr(setup, "tokenizer_corpus", lambda c: first)
  assert setup.build_tokenizer(config, str(tmp_path)).encode(second[0]) == saved.encode(second[0])
