"""Every data source on small files the test writes; malformed input names file:line."""

import json
import random
import string

import numpy as np
import pytest
from PIL import Image

from monoformer_jax.data import image_sources, sources


def _words(rng, n):
  return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 7))) for _ in range(n))


def test_mnist_source(rng):
  src = sources.MnistSource("train")
  hold = sources.MnistSource("holdout")
  assert len(src) + len(hold) == 5000
  r = src[int(rng.integers(len(src)))]
  assert r["image"].shape == (28, 28, 1) and r["image"].dtype == np.uint8
  assert r["class_name"] == sources.mnist.CLASS_NAMES[r["label"]]
  assert repr(src) == repr(sources.MnistSource("train"))


def test_pydoc_source():
  src = sources.PydocSource(max_chars=300)
  assert len(src) > 500
  lengths = [len(src[i]["text"]) for i in range(len(src))]
  assert max(lengths) <= 300 and min(lengths) > 0
  train, hold = sources.PydocSource(300, "train"), sources.PydocSource(300, "holdout")
  assert len(train) + len(hold) == len(src)
  # A partition of the passages (some passages repeat across topics: compare as multisets).
  assert sorted(train.passages + hold.passages) == sorted(src.passages)
  with pytest.raises(ValueError, match="unknown split"):
    sources.PydocSource(split="test")


@pytest.mark.parametrize("unit", ["line", "paragraph", "file"])
def test_text_file_source(tmp_path, unit, seed):
  rng = random.Random(seed)
  docs = []
  paths = []
  for f in range(2):
    paras = [[_words(rng, rng.randint(1, 9)) for _ in range(rng.randint(1, 3))] for _ in range(4)]
    path = tmp_path / f"t{f}.txt"
    path.write_text("\n\n\n".join("\n".join(p) for p in paras) + "\n")
    paths.append(str(path))
    if unit == "line":
      docs += [line for p in paras for line in p]
    elif unit == "paragraph":
      docs += ["\n".join(p) for p in paras]
    else:
      docs.append("\n\n\n".join("\n".join(p) for p in paras))
  src = sources.TextFileSource(paths, unit=unit)
  assert [src[i]["text"] for i in range(len(src))] == docs


def _chat_line(fmt, pairs):
  if fmt == "messages":
    msgs = [{"role": "system", "content": "be nice"}]
    for u, a in pairs:
      msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": msgs}
  if fmt == "data":
    return {"id": 3, "data": [t for p in pairs for t in p]}
  return {"conversations": [m for u, a in pairs for m in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]}


@pytest.mark.parametrize("fmt", ["messages", "data", "conversations"])
def test_chat_jsonl_source(tmp_path, fmt, seed):
  rng = random.Random(seed)
  dialogues = [[(_words(rng, 4), _words(rng, 6)) for _ in range(rng.randint(1, 4))] for _ in range(5)]
  path = tmp_path / "chat.jsonl"
  path.write_text("\n".join(json.dumps(_chat_line(fmt, d)) for d in dialogues) + "\n\n")
  last = sources.ChatJsonlSource(str(path))
  every = sources.ChatJsonlSource([str(path)], last_pair_only=False)
  assert len(last) == 5
  for i, d in enumerate(dialogues):
    assert last[i]["turns"] == [d[-1]]
    assert every[i]["turns"] == d


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "chat.jsonl"
  good = json.dumps({"data": ["hi", "hello"]})
  path.write_text(f"{good}\n\n{good}\n{{not json\n{json.dumps({'data': 3})}\n")
  src = sources.ChatJsonlSource(str(path))
  assert src[1]["turns"] == [("hi", "hello")]
  with pytest.raises(sources.BadRecordError, match=rf"{path}:4: malformed JSON"):
    src[2]  # blank line 2 is not a record, so record 2 is line 4
  with pytest.raises(sources.BadRecordError, match=rf'{path}:5: "data" is not a list'):
    src[3]
  skipping = sources.ChatJsonlSource(str(path), skip_bad_records=True)
  assert skipping[2] is None and skipping[3] is None


def test_missing_files():
  with pytest.raises(FileNotFoundError, match="no/such.jsonl"):
    sources.ChatJsonlSource("no/such.jsonl")
  with pytest.raises(FileNotFoundError, match="no/such.txt"):
    sources.TextFileSource(["no/such.txt"])
  with pytest.raises(FileNotFoundError, match="no/such_dir"):
    image_sources.ImageFolderSource("no/such_dir")


def test_text_not_utf8_names_line(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(b"fine\nalso fine\n\nbad \xff byte\n")
  src = sources.TextFileSource([str(path)], unit="paragraph")
  assert src[0]["text"] == "fine\nalso fine"
  with pytest.raises(sources.BadRecordError, match=rf"{path}:4: not UTF-8"):
    src[1]


def _write_image(path, rng, size=(12, 10), mode="RGB", block=1):
  c = 3 if mode == "RGB" else 1
  arr = rng.integers(0, 256, (size[1] // block, size[0] // block, c), dtype=np.uint8)
  arr = arr.repeat(block, 0).repeat(block, 1)  # flat blocks survive JPEG well
  Image.fromarray(arr if mode == "RGB" else arr[..., 0], mode).save(path)
  return arr


def test_image_folder_source(tmp_path, rng):
  expected = {}
  for c, folder in enumerate(["n02", "n01", "n03"]):
    (tmp_path / folder).mkdir()
    for j in range(c + 1):
      expected[f"{folder}/{j}.png"] = _write_image(tmp_path / folder / f"{j}.png", rng)
  (tmp_path / "n01" / "notes.txt").write_text("not an image")
  src = image_sources.ImageFolderSource(str(tmp_path), class_names={"n01": "cat", "n02": "dog", "n03": "eel"})
  assert src.folders == ["n01", "n02", "n03"] and len(src) == 6
  seen = set()
  for i in range(len(src)):
    r = src[i]
    np.testing.assert_array_equal(r["image"], expected[src.paths[i]])
    assert src.folders[r["label"]] == src.paths[i].split("/")[0]
    assert r["class_name"] == {"n01": "cat", "n02": "dog", "n03": "eel"}[src.paths[i][:3]]
    seen.add(src.paths[i])
  assert seen == set(expected)
  # ADM centre crop to a square, and grey-scale decoding.
  cropped = image_sources.ImageFolderSource(str(tmp_path), image_size=8, channels=1)
  assert cropped[0]["image"].shape == (8, 8, 1)


def _adm_crop_reference(image, size):
  """ADM's preprocessing, written from its description (not from center_crop_arr):
  halve both sides with a box filter while the short side is at least twice the target, then one
  bicubic resize that makes the short side exactly `size` (the long side scaled in proportion,
  rounded), then the centred size x size window (the extra pixel of an odd margin to the
  right/bottom)."""
  width, height = image.size
  while min(width, height) >= 2 * size:
    width, height = width // 2, height // 2
    image = image.resize((width, height), resample=Image.BOX)
  if width <= height:
    target = (size, round(height * size / width))
  else:
    target = (round(width * size / height), size)
  pixels = np.asarray(image.resize(target, resample=Image.BICUBIC))
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top : top + size, left : left + size]


# (width, height, size): several halvings, none, upscaling, odd sides, both orientations, square.
CROP_CASES = [
    (101, 67, 16),
    (67, 101, 16),
    (97, 255, 12),
    (33, 31, 16),
    (9, 13, 12),
    (21, 8, 12),
    (129, 129, 32),
    (250, 63, 15),
    (17, 300, 16),
]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_center_crop_matches_an_independent_reference(tmp_path, mode, rng):
  for width, height, size in CROP_CASES:
    channels = (3,) if mode == "RGB" else ()
    pixels = rng.integers(0, 256, (height, width, *channels), dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    want = _adm_crop_reference(image, size)
    assert want.shape == (size, size, *channels)
    got = np.asarray(image_sources.center_crop_arr(image, size))
    np.testing.assert_array_equal(got, want, err_msg=f"{width}x{height} -> {size}")
    # ... and through the file loader (PNG is lossless, so the same pixels).
    Image.fromarray(pixels, mode).save(tmp_path / "im.png")
    loaded = image_sources.load_image(str(tmp_path / "im.png"), size, 3 if mode == "RGB" else 1)
    np.testing.assert_array_equal(loaded.reshape(want.shape), want)
  # The reference is not trivially met: a plain bicubic resize of the whole image differs.
  image = Image.fromarray(rng.integers(0, 256, (67, 101, 3), dtype=np.uint8))
  direct = np.asarray(image.resize((24, 16), resample=Image.BICUBIC))[:, 4:20]
  assert np.abs(direct.astype(int) - _adm_crop_reference(image, 16)).max() > 10


def test_image_folder_bad_layouts_and_images(tmp_path, rng):
  flat = tmp_path / "flat"
  flat.mkdir()
  _write_image(flat / "a.png", rng)
  with pytest.raises(ValueError, match=rf"{flat}: unknown class folder layout: images directly"):
    image_sources.ImageFolderSource(str(flat))
  deep = tmp_path / "deep"
  (deep / "cls" / "sub").mkdir(parents=True)
  _write_image(deep / "cls" / "sub" / "a.png", rng)
  with pytest.raises(ValueError, match=r"cls: unknown class folder layout.*too deep"):
    image_sources.ImageFolderSource(str(deep))
  good = tmp_path / "good"
  (good / "x").mkdir(parents=True)
  _write_image(good / "x" / "a.png", rng)
  (good / "x" / "b.png").write_bytes(b"\x89PNG garbage")
  src = image_sources.ImageFolderSource(str(good))
  with pytest.raises(sources.BadRecordError, match=r"x/b.png: unreadable image"):
    src[1]
  assert image_sources.ImageFolderSource(str(good), skip_bad_records=True)[1] is None


def test_image_text_jsonl_source(tmp_path, rng, seed):
  (tmp_path / "img").mkdir()
  words = random.Random(seed)
  prompts = [_words(words, 5) for _ in range(3)]
  arrays = [_write_image(tmp_path / "img" / f"{i}.jpg", rng, (16, 16), block=8) for i in range(3)]
  lines = [json.dumps({"image": f"img/{i}.jpg", "prompt": p}) for i, p in enumerate(prompts)]
  lines += [json.dumps({"image": "img/missing.jpg", "prompt": "x"}), json.dumps({"prompt": "x"})]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(lines) + "\n")
  src = image_sources.ImageTextJsonlSource(str(path))
  assert len(src) == 5
  for i in range(3):
    assert src[i]["prompt"] == prompts[i]
    # JPEG is lossy (random colours, chroma subsampling): a mean error of 8-14 over 400 seeds,
    # against ~85 between two different random images.
    errors = [np.abs(src[i]["image"].astype(int) - a).mean() for a in arrays]
    assert errors[i] < 20 and errors[i] < min(e for j, e in enumerate(errors) if j != i) / 3
  with pytest.raises(sources.BadRecordError, match=rf"{path}:4: .*missing.jpg: image file not found"):
    src[3]
  with pytest.raises(sources.BadRecordError, match=rf'{path}:5: needs string fields "image"'):
    src[4]
