"""grain pipelines: resume mid-epoch, per-process sharding, packing, CFG dropout, skip-and-count."""

import json
import random

import jax
import numpy as np
import pytest
from PIL import Image

from monoformer_jax.data import image_sources, pipeline, sources
from monoformer_jax.data import sequences as seq
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax import batch as batch_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [f"record {i} of {i * 7}" for i in range(300)] + sources.pydoc_passages()[:200]
  names = list(sources.mnist.CLASS_NAMES)
  texts += [t.format(c) for c in names for t in seq.MAIN_TEMPLATES]
  return tok_lib.train_sentencepiece(texts, 600, str(tmp_path_factory.mktemp("tok")))


class IdImages(sources.Source):
  """Record i: a 4x4x1 uint8 image holding i (< 256), label i % 3; logs what was read."""

  class_names = ("red", "green", "blue")

  def __init__(self, n):
    self.n, self.reads = n, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads.append(i)
    return {"image": np.full((4, 4, 1), i % 256, np.uint8), "label": i % 3, "class_name": self.class_names[i % 3]}

  def __repr__(self):
    return f"IdImages({self.n})"


class IdTexts(IdImages):

  def __getitem__(self, i):
    self.reads.append(i)
    return {"text": f"record {i}"}


def _image_ids(batch):
  ids = np.round((batch["images"][:, :, 0, 0, 0] + 1) * 127.5).astype(int)
  return ids[batch["image_mask"]].tolist()


def _text_ids(tok, batch):
  out = []
  for r in range(batch["tokens"].shape[0]):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      toks = batch["tokens"][r][batch["segment_ids"][r] == s]
      out.append(int(tok.decode(toks).split()[1]))
  return out


def _drain(it):
  return list(it)


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_text_resume_mid_epoch(tok, seed):
  draws = random.Random(seed)
  make = lambda: pipeline.make_text_iterator(
      IdTexts(37), tok, batch_size=3, seq_len=16, seed=seed, shard_index=0, shard_count=1
  )
  it = make()
  for _ in range(draws.randint(1, 4)):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  expected = [next(it) for _ in range(6)]  # crosses the epoch end (~5 records per batch)
  resumed = make()
  resumed.set_state(state)
  _same([next(resumed) for _ in range(6)], expected)
  fresh = make()
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip([next(fresh)], expected))


def test_image_resume_with_random_prompts(tok):
  make = lambda: pipeline.make_image_iterator(
      IdImages(25),
      tok,
      batch_size=4,
      patch_size=2,
      t_token=True,
      seed=3,
      text_dropout=0.3,
      shard_index=0,
      shard_count=1,
  )
  it = make()
  next(it), next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(8)]  # 32 samples: into the second epoch
  resumed = make()
  resumed.set_state(state)
  _same([next(resumed) for _ in range(8)], expected)


def test_process_batches_concatenate_to_the_single_process_batch(tok):
  """Block-wise dealing: the processes' k-th batches are the single-process k-th batch."""

  def batches(index, count, batch_size):
    it = pipeline.make_image_iterator(
        IdImages(40),
        tok,
        batch_size=batch_size,
        patch_size=2,
        t_token=False,
        seed=3,
        shard_index=index,
        shard_count=count,
    )
    return [next(it) for _ in range(4)]

  single = batches(0, 1, 8)
  parts = [batches(p, 2, 4) for p in range(2)]
  for k in range(4):
    for key in single[k]:
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), single[k][key])


@pytest.mark.parametrize("packing", [False, True])
def test_two_shards_disjoint_and_covering(tok, packing):
  n = 53
  seen = []
  for index in range(2):
    src = IdTexts(n)
    it = pipeline.make_text_iterator(
        src, tok, batch_size=4, seq_len=16, seed=1, packing=packing, num_epochs=1, shard_index=index, shard_count=2
    )
    ids = [i for b in _drain(it) for i in _text_ids(tok, b)]
    own = pipeline.shard_indices(n, index, 2, seed=1, block=4)
    assert sorted(ids) == sorted(own)  # each record of the shard once
    assert set(src.reads) <= set(own)  # the process reads only its part
    seen.append(set(ids))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))


def test_shard_from_jax_process(tok, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  src = IdImages(30)
  it = pipeline.make_image_iterator(src, tok, batch_size=4, patch_size=2, t_token=False, num_epochs=1)
  ids = [i for b in _drain(it) for i in _image_ids(b)]
  own = pipeline.shard_indices(30, 1, 2, seed=0, block=4)
  assert sorted(ids) == sorted(own) and set(src.reads) <= set(own)
  other = pipeline.shard_indices(30, 0, 2, seed=0, block=4)
  assert not set(own) & set(other) and sorted(own + other) == list(range(30))


def test_image_batches_padded_format(tok):
  src = IdImages(12)
  it = pipeline.make_image_iterator(
      src, tok, batch_size=5, patch_size=2, t_token=True, text_dropout=0.0, num_epochs=1, shard_index=0, shard_count=1
  )
  batches = _drain(it)
  assert len(batches) == 3 and batches[-1]["image_mask"].sum() == 2  # last batch padded
  longest = seq.max_class_prompt_tokens(tok, IdImages.class_names)
  # Untrained image text: each row ends with its image (no <|im_end|>\n</s> tail).
  assert batches[0]["tokens"].shape == (5, seq.image_seq_len(longest, 4, True, tok, tail=False))
  b = batches[0]
  n_valid = (b["segment_ids"] > 0).sum(axis=1)
  np.testing.assert_array_equal(b["kinds"][np.arange(5), n_valid - 1], 1)  # last token: image
  assert not np.isin(b["tokens"], [tok.im_end_id, tok.eos_id]).any()
  for r in range(5):
    i = _image_ids({k: v[r : r + 1] for k, v in b.items()})[0]
    assert b["labels"][r, 0] == i % 3
    prompt = tok.decode(b["tokens"][r][: list(b["tokens"][r]).index(tok.im_start_id)])
    assert IdImages.class_names[i % 3] in prompt
    assert set(b["segment_ids"][r]) <= {0, 1} and b["loss_mask"][r].sum() == 0
  np.testing.assert_allclose(b["images"][0, 0], b["images"][0, 0, 0, 0, 0])  # [-1, 1] scaling
  assert b["images"].min() >= -1 and b["images"].max() <= 1


def test_trained_image_text_keeps_the_official_tail(tok):
  it = pipeline.make_image_iterator(
      IdImages(6),
      tok,
      batch_size=3,
      patch_size=2,
      t_token=False,
      text_dropout=0.0,
      train_text=True,
      num_epochs=1,
      shard_index=0,
      shard_count=1,
  )
  b = next(it)
  longest = seq.max_class_prompt_tokens(tok, IdImages.class_names)
  assert b["tokens"].shape == (3, seq.image_seq_len(longest, 4, False, tok, tail=True))
  for r in range(3):
    n = int((b["segment_ids"][r] > 0).sum())
    assert b["tokens"][r, n - 3 : n].tolist() == [tok.im_end_id, *tok.newline_ids, tok.eos_id]
    assert b["loss_mask"][r].sum() > 0


def test_cfg_dropout_uses_null_label_and_empty_prompt(tok):
  it = pipeline.make_image_iterator(
      IdImages(10), tok, batch_size=10, patch_size=2, t_token=False, text_dropout=1.0, shard_index=0, shard_count=1
  )
  b = next(it)
  assert (b["labels"][:, 0] == 3).all()
  np.testing.assert_array_equal(b["tokens"][:, :2], [[1, tok.im_start_id]] * 10)
  it = pipeline.make_image_iterator(
      IdImages(400), tok, batch_size=200, patch_size=2, t_token=False, text_dropout=0.25, shard_index=0, shard_count=1
  )
  rate = np.mean(next(it)["labels"][:, 0] == 3)
  assert 0.12 < rate < 0.4


def test_image_packing_uses_slots(tok):
  it = pipeline.make_image_iterator(
      IdImages(20),
      tok,
      batch_size=2,
      patch_size=2,
      t_token=True,
      packing=True,
      images_per_row=3,
      num_epochs=1,
      shard_index=0,
      shard_count=1,
  )
  b = next(it)
  assert b["image_mask"].shape == (2, 3) and b["image_mask"].sum() >= 4
  for r in range(2):
    slots = np.flatnonzero(b["image_mask"][r])
    image_tokens = b["patch_index"][r][b["kinds"][r] == batch_lib.KIND_IMAGE]
    assert sorted(set(image_tokens // 4)) == slots.tolist()
    for s in range(1, b["segment_ids"][r].max() + 1):
      pos = b["positions"][r][b["segment_ids"][r] == s]
      np.testing.assert_array_equal(pos, np.arange(len(pos)))


def test_text_packing_keeps_segments_apart(tok, seed):
  seq_len = 96
  it = pipeline.make_text_iterator(
      sources.PydocSource(max_chars=100), tok, batch_size=4, seq_len=seq_len, seed=seed, shard_index=0, shard_count=1
  )
  batches = [next(it) for _ in range(5)]
  # Several samples per row: 60% of rows on average, at least 20% of these 20 rows on each of
  # 200 seeds (a single batch of 4 had none on 5% of them).
  assert np.mean([b["segment_ids"].max(axis=1) >= 2 for b in batches]) >= 0.1
  for b in batches:
    for r in range(4):
      seg, t, tg, lm = b["segment_ids"][r], b["tokens"][r], b["targets"][r], b["loss_mask"][r]
      for p in range(seq_len - 1):
        if lm[p]:
          assert seg[p] == seg[p + 1] > 0 and tg[p] == t[p + 1]
        if seg[p] != seg[p + 1]:
          assert lm[p] == 0  # the last token of a sample predicts nothing
      for s in range(1, seg.max() + 1):
        toks = t[seg == s]
        assert toks[0] == tok.bos_id and np.array_equal(b["positions"][r][seg == s], np.arange(len(toks)))


def test_skip_and_count_bad_images(tmp_path, tok, rng):
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for j in range(4):
      arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(arr).save(tmp_path / c / f"{j}.png")
  (tmp_path / "b" / "2.png").write_bytes(b"broken")
  kw = dict(batch_size=3, patch_size=4, t_token=False, num_epochs=1, shard_index=0, shard_count=1)
  strict = pipeline.make_image_iterator(image_sources.ImageFolderSource(str(tmp_path)), tok, **kw)
  with pytest.raises(sources.BadRecordError, match=r"b/2.png: unreadable image"):
    _drain(strict)
  lenient = pipeline.make_image_iterator(
      image_sources.ImageFolderSource(str(tmp_path), skip_bad_records=True), tok, **kw
  )
  batches = _drain(lenient)
  assert sum(int(b["image_mask"].sum()) for b in batches) == 7
  assert lenient.stats == {"skipped_records": 1}
  assert lenient.get_state()["num_skipped"] == 1


def test_skip_counts_malformed_chat_lines(tmp_path, tok):
  path = tmp_path / "c.jsonl"
  good = [json.dumps({"data": [f"record {i}", "ok"]}) for i in range(6)]
  path.write_text("\n".join(good[:3] + ["{oops", '{"data": []}'] + good[3:]) + "\n")
  src = sources.ChatJsonlSource(str(path), skip_bad_records=True)
  it = pipeline.make_text_iterator(src, tok, batch_size=2, seq_len=32, num_epochs=1, shard_index=0, shard_count=1)
  ids = [i for b in _drain(it) for i in _text_ids(tok, b)]
  assert sorted(ids) == list(range(6))
  assert it.stats["skipped_records"] == 2


class BadLabelImages(IdImages):
  """IdImages whose record 7 claims class 3 of 3 classes (no class_name, as in latents)."""

  def __getitem__(self, i):
    record = super().__getitem__(i)
    del record["class_name"]
    record["index"] = i
    if i == 7:
      record["label"] = 3
    return record


def test_an_out_of_range_class_id_is_named(tok):
  it = pipeline.make_image_iterator(
      BadLabelImages(12),
      tok,
      batch_size=4,
      patch_size=2,
      t_token=True,
      num_epochs=1,
      shard_index=0,
      shard_count=1,
      shuffle=False,
  )
  with pytest.raises(ValueError, match=r"record 7 has class id 3, outside 0\.\.2"):
    _drain(it)
