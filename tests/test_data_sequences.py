"""Sequence layout: image / CFG / text / chat samples against hand-built expectations."""

import random

import numpy as np
import pytest

from monoformer_jax.data import chat_format
from monoformer_jax.data import sequences as seq
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax import batch as batch_lib

T, I, X = batch_lib.KIND_TEXT, batch_lib.KIND_IMAGE, batch_lib.KIND_T_TOKEN


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  corpus = [
      " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "image", "of", "zero", "one"]) for _ in range(12))
      for _ in range(200)
  ]
  return tok_lib.train_sentencepiece(corpus, 300, str(tmp_path_factory.mktemp("tok")))


def _batch(seq_len, slots=2, shape=(4, 4, 1)):
  return batch_lib.empty_batch(1, seq_len, slots, shape)


@pytest.mark.parametrize("t_token", [False, True])
@pytest.mark.parametrize("train_text", [False, True])
def test_image_sample_layout(tok, t_token, train_text, rng):
  a, b = (int(v) for v in rng.integers(3, tok.base_vocab_size, 2))
  image = rng.standard_normal((4, 4, 1)).astype(np.float32)
  pieces = seq.image_sample(tok, [a, b], image, 7, train_text)
  num_patches = 4  # 4x4 image, patch 2
  n = seq.sample_length(pieces, num_patches, t_token)
  assert n == seq.image_seq_len(2, num_patches, t_token, tok)
  batch = _batch(n + 3)
  batch_lib.RowBuilder(batch, 0, num_patches, t_token).add(pieces)
  S, E = tok.im_start_id, tok.im_end_id
  t = [0] if t_token else []
  tk = [X] if t_token else []
  pi = [0] if t_token else []
  L = n + 3
  pad = [0] * 3
  np.testing.assert_array_equal(batch["tokens"][0], [1, a, b, S, *t, 0, 0, 0, 0, E, 13, 2, *pad])
  np.testing.assert_array_equal(batch["kinds"][0], [T] * 4 + tk + [I] * 4 + [T] * 3 + pad)
  np.testing.assert_array_equal(batch["positions"][0], list(range(n)) + pad)
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * n + pad)
  np.testing.assert_array_equal(batch["patch_index"][0], [0] * 4 + pi + [0, 1, 2, 3] + [0] * 6)
  # <s> -> a -> b -> <|im_start|>, then the image breaks the chain; <|im_end|> -> \n -> </s>.
  img = [0] * (len(t) + 4)
  np.testing.assert_array_equal(batch["targets"][0], [a, b, S, 0, *img, 13, 2, 0, *pad])
  on = float(train_text)
  np.testing.assert_array_equal(batch["loss_mask"][0], [on, on, on, 0, *img, on, on, 0, *pad])
  np.testing.assert_array_equal(batch["images"][0, 0], image)
  assert batch["image_mask"][0].tolist() == [True, False]
  assert batch["labels"][0].tolist() == [7, 0]
  assert batch["images"].shape[1:] == (2, 4, 4, 1) and L == batch["tokens"].shape[1]


def test_cfg_dropout_form_and_sampling_prefix(tok):
  pieces = seq.image_sample(tok, [], np.zeros((4, 4, 1), np.float32), 10)
  assert pieces[0][1] == [1, tok.im_start_id]  # <s><|im_start|> [img] <|im_end|>\n</s>
  assert pieces[2][1] == [tok.im_end_id, 13, 2]
  assert seq.sampling_prefix(tok, None) == [1, tok.im_start_id]
  assert seq.sampling_prefix(tok, "one") == [1, *tok.encode("one"), tok.im_start_id]


def test_class_prompts_use_official_templates(tok, rng):
  got = {seq.class_prompt("dog", rng) for _ in range(200)}
  assert got == {"Please generate an image of dog.", "dog", "an image of dog.", "an photo of dog."}
  got = {seq.class_prompt("dog", rng, seq.OFFICIAL_TEMPLATES) for _ in range(100)}
  assert got == {"Please generate an image of dog.", "dog", "an image of dog."}
  longest = seq.max_class_prompt_tokens(tok, ["zero", "one"])
  assert longest == max(len(tok.encode(t.format(c))) for c in ("zero", "one") for t in seq.MAIN_TEMPLATES)


def test_chat_and_packing(tok, seed):
  """Dialogues in the official plain format (chat_format.py): `<s>{user}{answer}</s>` per pair,
  user turns untrained here; two samples packed into a row stay apart."""
  rng = random.Random(seed)
  words = ["alpha", "beta", "gamma", "delta"]
  turns = [
      (" ".join(rng.choices(words, k=rng.randint(1, 4))), " ".join(rng.choices(words, k=rng.randint(1, 4))))
      for _ in range(2)
  ]
  pieces = chat_format.dialogue_pieces(tok, turns, "none", train_prompt=False)
  ids = [i for _, v, _ in pieces for i in v]
  expected = [i for u, a in turns for i in [1, *tok.encode(u), *tok.encode(a), 2]]
  assert ids == expected
  other = seq.text_sample(tok, [(tok.encode("gamma delta"), True)], max_len=100)
  n1, n2 = len(ids), sum(len(v) for _, v, _ in other)
  batch = _batch(n1 + n2 + 2, slots=1)
  rb = batch_lib.RowBuilder(batch, 0, 4, False)
  rb.add(pieces)
  rb.add(other)
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * n1 + [2] * n2 + [0, 0])
  np.testing.assert_array_equal(batch["positions"][0], [*range(n1), *range(n2), 0, 0])
  # Targets never cross the segment boundary; only the answers and their </s> are trained.
  train = [t for _, v, t in pieces for _ in v]
  tgt = expected[1:] + [0]
  np.testing.assert_array_equal(batch["targets"][0, :n1], tgt)
  np.testing.assert_array_equal(batch["loss_mask"][0, :n1], [float(t) for t in train[1:]] + [0])
  assert batch["loss_mask"][0, n1 - 1] == 0 and batch["loss_mask"][0, -2:].sum() == 0
  assert sum(train) == sum(len(tok.encode(a)) + 1 for _, a in turns)


def test_text_truncation(tok):
  ids = tok.encode("alpha beta gamma delta " * 10)
  pieces = seq.text_sample(tok, [(ids, True)], max_len=9)
  flat = [i for _, v, _ in pieces for i in v]
  assert flat == [1] + ids[:8]  # cut tail, eos dropped (official truncation)
