"""The whole CLIP (text tower, projections, tokenizer) against transformers' CLIPModel and
CLIPTokenizer on small random weights and a small trained BPE vocabulary."""

import collections
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from monoformer_jax.vision import clip, clip_model, clip_text
from monoformer_jax.vision.clip_tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode
from monoformer_jax.vision.convert import ConversionError
from tests.test_clip_vision import FP32_ATOL, TINY, _redraw, assert_close, make_tiny_clip, random_pixels

TEXTS = [
    "A photo of a cat.",
    "two  dogs\tplaying   in the SNOW!!",
    "don't stop: it's 42 o'clock; we'll see",
    "Café naïve résumé — déjà vu",
    "snake_case and CamelCase, 3.14159 and x², ½ ⅷ",
    "what?!'s up <|endoftext|>!<|endoftext|>ok <|ENDOFTEXT|>",
    "<|startoftext|>already marked<|endoftext|> text",
    "",
    "a photo of a dog " * 30,  # longer than 77 tokens: cut, the end-of-text kept
]


def _learn_merges(corpus, num_merges):
  """A small BPE vocabulary as CLIP's is built: byte characters, end-of-word forms, merges."""
  table = bytes_to_unicode()
  chars = list(table.values())
  words = collections.Counter()
  for text in corpus:
    for word in text.lower().split():
      mapped = "".join(table[b] for b in word.encode("utf-8"))
      words[tuple(mapped[:-1]) + (mapped[-1] + "</w>",)] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, n in words.items():
      for pair in zip(word[:-1], word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged = collections.Counter()
    for word, n in words.items():
      out, k = [], 0
      while k < len(word):
        if k + 1 < len(word) and (word[k], word[k + 1]) == best:
          out.append(word[k] + word[k + 1])
          k += 2
        else:
          out.append(word[k])
          k += 1
      merged[tuple(out)] += n
    words = merged
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
  return vocab, merges


@pytest.fixture(scope="module")
def bpe():
  corpus = [t for t in TEXTS if t] + ["a photo of a red bus", "the cat and the dog", "playing in the snow"] * 5
  return _learn_merges(corpus, 60)


def test_tokenizer_matches_transformers(bpe, tmp_path):
  vocab, merges = bpe
  reference = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  reference.save_pretrained(tmp_path / "json")  # transformers 5 writes tokenizer.json only
  (tmp_path / "files").mkdir()
  (tmp_path / "files" / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "files" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  for folder in ("json", "files"):
    ours = CLIPTokenizer.from_folder(tmp_path / folder)
    want = reference(TEXTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours.batch(TEXTS, 77), np.asarray(want), err_msg=folder)
  assert len(ours.encode(TEXTS[1])) > 5  # merges ran: fewer ids than characters, more than none
  assert len(ours.encode("playing")) < len("playing")
  with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
    CLIPTokenizer.from_folder(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, module_seed, bpe):
  """A random CLIPModel whose text tower reads `bpe`'s vocabulary, and that tokenizer, saved by
  transformers (safetensors, config.json, tokenizer.json); returns (folder, torch model)."""
  folder = tmp_path_factory.mktemp("clip_model")
  vocab, merges = bpe
  torch.manual_seed(module_seed("clip"))
  text = dict(
      vocab_size=max(vocab.values()) + 1,
      hidden_size=16,
      intermediate_size=24,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=77,
      bos_token_id=vocab[BOS],
      eos_token_id=vocab[EOS],
      pad_token_id=vocab[EOS],
  )
  config = transformers.CLIPConfig(vision_config=dict(TINY, hidden_act="gelu"), text_config=text, projection_dim=8)
  model = transformers.CLIPModel(config)
  _redraw(model)
  model.eval().save_pretrained(folder)
  transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
  return folder, model


def test_clip_model_matches_transformers(tiny, rng):
  """Texts through our tokenizer and text tower, images through the vision tower, against
  transformers' tokenizer and get_text_features / get_image_features; the pooled text output
  is taken at the first end-of-text, whatever padding follows it."""
  folder, torch_model = tiny
  model = clip_model.load_clip_model(folder)
  config = model.config
  assert config.projection_dim == 8 and config.vision == clip.CLIPVisionConfig(**TINY, hidden_act="gelu")
  assert config.text.eos_token_id == model.tokenizer.eos_id and config.text.num_hidden_layers == 2
  reference = transformers.CLIPTokenizer.from_pretrained(folder)
  ids = reference(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
  pixels = random_pixels(rng, batch=3)
  with torch.no_grad():
    want_text = torch_model.get_text_features(input_ids=ids).pooler_output.numpy()
    want_image = torch_model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    want_image = want_image.pooler_output.numpy()
    hidden = torch_model.text_model(input_ids=ids).last_hidden_state.numpy()
  got_text = clip_model.text_embeds(model, model.tokenizer.batch(TEXTS))
  got_image = clip_model.image_embeds(model, pixels)
  assert np.abs(want_text).max() > 0.5 and np.abs(want_image).max() > 0.5  # not trivially small
  assert_close(got_text, want_text)
  assert_close(got_image, want_image)
  assert_close(clip_text.clip_text_outputs(model.params["text"], config.text, ids.numpy())[0], hidden)
  # Padding after the end-of-text changes nothing (the mask is causal).
  short = model.tokenizer.batch(TEXTS[:2], 40)
  assert_close(clip_model.text_embeds(model, short), want_text[:2])
  cos = (
      want_image @ want_text[:3].T / np.outer(np.linalg.norm(want_image, axis=1), np.linalg.norm(want_text[:3], axis=1))
  )
  scores = clip_model.clip_scores(np.repeat(got_image, 3, 0), np.tile(got_text[:3], (3, 1))).reshape(3, 3)
  np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=0, atol=100 * FP32_ATOL)
  # Both sides of the clip at zero whatever the draw (a random model's nine cosines can all be
  # negative: seed index 6): an embedding against itself scores 100, against its negation 0.
  np.testing.assert_allclose(clip_model.clip_scores(got_image, got_image), 100, rtol=1e-6)
  np.testing.assert_array_equal(clip_model.clip_scores(got_image, -np.asarray(got_image)), 0)


def test_clip_model_errors(tiny, tmp_path):
  folder, _ = tiny
  make_tiny_clip(tmp_path / "vision_only", 0)
  with pytest.raises(ValueError, match="not a whole CLIPModel"):
    clip_model.load_clip_model(tmp_path / "vision_only")
  state = dict(clip_model.load_state_dict(folder))
  config = clip_model.load_clip_model(folder).config
  del state["text_projection.weight"], state["text_model.final_layer_norm.bias"]
  with pytest.raises(ConversionError) as err:
    clip_model.convert_clip_model(state, config)
  assert "missing text_projection.weight" in str(err.value)
  assert "missing text_model.final_layer_norm.bias" in str(err.value)
  params = clip_text.init_text_params(config.text, jax.random.key(0))
  with pytest.raises(ValueError, match=r"T in 1\.\.77"):
    clip_text.clip_text_outputs(params, config.text, np.zeros((1, 78), np.int32))
