"""Bad data records (issue 19): one row per kind of broken input, written beside good records and
read the way the trainer reads them: the source `config.data` names (data/registry.py), then the
pipeline iterator with the arguments `train/data_streams.build_data` gives it (here one epoch, so
every count is exact).

  strict                       one error whose message names the file and the record (file:line,
                               the image file, the latent shard and its record); never a bare
                               IndexError / KeyError / UnicodeDecodeError / PIL error from inside.
  data.skip_bad_records=True   every good record reaches the batches and every bad one is counted
                               in the iterator's stats["skipped_records"] (what metrics.jsonl logs).

Some inputs are errors even when skipping, because skipping them would not skip a *record*:
  - a text file that is empty or holds only blank lines, when it is all the text there is: there
    is nothing left to train on (an empty file among others is one skipped record);
  - a source whose every record is bad: read twice round, it is an error, not an endless loop;
  - a class_names_file with fewer names than the image folder has class folders: whole classes
    would be dropped, a configuration mistake to fix, not a record to skip.
The last test runs training on a text file with malformed records and checks the count in
metrics.jsonl.
"""

import io
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from configs import mnist_tiny
from monoformer_jax.data import pipeline, registry, tfds_latents
from monoformer_jax.data import sequences as seq
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.data.sources import BadRecordError
from monoformer_jax.data.understanding import make_understanding_iterator
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.train import data_streams
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["cat", "dog", "eel", "fox", "gnu"]
PIXELS = dict(image_height=28, image_width=28, image_channels=1, patch_size=7)  # mnist_tiny.py:test's
LATENTS = dict(image_height=4, image_width=4, image_channels=3, patch_size=2)
# What the strict path must never let out: errors raised deep inside a parser or a lookup.
RAW = (IndexError, KeyError, UnicodeDecodeError, OSError, SyntaxError, json.JSONDecodeError)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [f"record {i} of {i * 7}" for i in range(300)] + [f"an image of {n}." for n in NAMES]
  texts += [t.format(n) for n in ("zero", "one", *NAMES) for t in seq.MAIN_TEMPLATES]
  return tok_lib.train_sentencepiece(texts, 300, str(tmp_path_factory.mktemp("tok")))


# ----------------------------------------------------------------------------------------------
# Writing good and broken inputs.


def _png(rng, size=12) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(rng, size=32) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _image_folder(root, rng, bad_name: str, bad_bytes: bytes, per_class=3) -> str:
  """root/{zero,one}/<good>.png and one bad file in root/one."""
  for c in ("zero", "one"):
    os.makedirs(root / c)
    for j in range(per_class):
      (root / c / f"{j}.png").write_bytes(_png(rng))
  (root / "one" / bad_name).write_bytes(bad_bytes)
  return str(root)


def _lines(path, lines: list[bytes], tail: bytes = b"") -> str:
  path.write_bytes(b"".join(line + b"\n" for line in lines) + tail)
  return str(path)


def _chat(i: int) -> bytes:
  return json.dumps({"data": [f"record {i}", f"of {i * 7}"]}).encode()


def _image_text(root, rng, n: int) -> list[bytes]:
  for i in range(n):
    (root / f"{i}.png").write_bytes(_png(rng))
  return [json.dumps({"image": f"{i}.png", "prompt": f"record {i}"}).encode() for i in range(n)]


def _latent_arrays(rng, n, shape=(4, 4, 3), labels=None):
  return {
      "mean": rng.standard_normal((n, *shape)).astype(np.float32),
      "logvar": rng.uniform(-3, 0, (n, *shape)).astype(np.float32),
      "label": rng.integers(0, len(NAMES), n) if labels is None else np.asarray(labels),
  }


def _latents(root, rng, labels=None, n=10) -> str:
  tfds_latents.write_latents(str(root), {"train": _latent_arrays(rng, n, labels=labels)})
  (root / "class_names.json").write_text(json.dumps(NAMES))  # as extract_latents writes it
  return str(root)


def _shard(root) -> str:
  (path,) = (root / tfds_latents.NAME / "1.0.0").glob("*-train.array_record-*")
  return str(path)


def _latents_one_of_another_shape(root, rng, at=3) -> str:
  """10 latents of 4x4x3 whose record `at` is a 4x4x4 latent: the bytes of an example of another
  dataset (another extraction's image size, say) written into this one's shard in its place."""
  data = _latents(root, rng)
  tfds_latents.write_latents(str(root / "other"), {"train": _latent_arrays(rng, 1, shape=(4, 4, 4))})
  reader = array_record_module.ArrayRecordReader(_shard(root / "other"))
  (foreign,) = reader.read_all()
  reader.close()
  reader = array_record_module.ArrayRecordReader(_shard(root))
  records = reader.read_all()
  reader.close()
  records[at] = foreign
  writer = array_record_module.ArrayRecordWriter(_shard(root), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  return data


# ----------------------------------------------------------------------------------------------
# The table. Each row: (name, objective, model, writer). writer(tmp_path, rng) -> (config.data
# overrides, good records, bad records, the strict error's pattern, the pattern when skipping or
# None: skipping reads the good records and counts the bad ones).


def _row_images(bad_name, make_bad, pattern):
  def write(tmp, rng):
    path = _image_folder(tmp / "images", rng, bad_name, make_bad(rng))
    return dict(image_source="image_folder", image_path=path), 6, 1, rf"{tmp}/images/one/{bad_name}: " + pattern, None

  return write


def _row_jsonl_truncated_chat(tmp, rng):
  del rng
  # A killed writer: the last line stops mid-string, with no newline.
  path = _lines(tmp / "chat.jsonl", [_chat(i) for i in range(6)], tail=_chat(6)[:17])
  return dict(text_source="chat_jsonl", text_path=path), 6, 1, rf"{path}:7: malformed JSON line .*cut short", None


def _row_jsonl_truncated_image_text(tmp, rng):
  lines = _image_text(tmp, rng, 6)
  path = _lines(tmp / "images.jsonl", lines[:5], tail=lines[5][:25])
  data = dict(image_source="image_text_jsonl", image_path=path)
  return data, 5, 1, rf"{path}:6: malformed JSON line .*cut short", None


def _row_text_not_utf8(tmp, rng):
  del rng
  paragraphs = [f"record {i} of {i * 7}".encode() for i in range(6)]
  paragraphs[3] = b"record 3 \xff\xfe of 21"  # UTF-16's byte order mark: never UTF-8
  path = _lines(tmp / "text.txt", [p + b"\n" for p in paragraphs])
  return dict(text_source="text_file", text_path=path), 5, 1, rf"{path}:7: not UTF-8 text", None


def _row_chat_not_utf8(tmp, rng):
  del rng
  lines = [_chat(i) for i in range(6)]
  lines[2] = '{"data": ["caf\u00e9", "record 2"]}'.encode("latin-1")  # Latin-1, not UTF-8
  path = _lines(tmp / "chat.jsonl", lines)
  return dict(text_source="chat_jsonl", text_path=path), 5, 1, rf"{path}:3: not UTF-8 text", None


def _row_image_text_not_utf8(tmp, rng):
  lines = _image_text(tmp, rng, 6)
  lines[1] = lines[1].replace(b"record 1", "r\u00e9cord 1".encode("cp1252"))
  path = _lines(tmp / "images.jsonl", lines)
  data = dict(image_source="image_text_jsonl", image_path=path)
  return data, 5, 1, rf"{path}:2: not UTF-8 text", None


def _row_latent_wrong_shape(tmp, rng):
  path = _latents_one_of_another_shape(tmp / "latents", rng, at=3)
  pattern = (
      rf"{_shard(tmp / 'latents')}: record 3 \(split 'train' record 3\): unreadable latent record "
      r"\(ValueError: .*cannot reshape array of size 64 into shape \(4,4,3\)"
  )
  return dict(image_source="latents", image_path=path), 9, 1, pattern, None


def _row_latent_class_out_of_range(tmp, rng):
  labels = [0, 1, 2, 3, 4, 7, 0, 1, 2, 3]  # input record 5: class 7 of 5
  path = _latents(tmp / "latents", rng, labels=labels)
  pattern = (
      rf"{_shard(tmp / 'latents')}: record \d+ \(split 'train' record \d+\) \(input record 5\) has class id 7, "
      r"outside 0\.\.4"
  )
  return dict(image_source="latents", image_path=path), 9, 1, pattern, None


def _row_latent_class_beyond_the_model(tmp, rng):
  # Five names, but a label embedding of four classes: class 4 has a name and no embedding row.
  labels = [0, 1, 2, 3, 4, 0, 1, 2, 4, 3]
  path = _latents(tmp / "latents", rng, labels=labels)
  pattern = (
      rf"{_shard(tmp / 'latents')}: record \d+ \(split 'train' record \d+\) has class id 4, outside the "
      r"model's 4 classes"
  )
  return dict(image_source="latents", image_path=path), 8, 2, pattern, None


def _row_image_folder_class_out_of_range(tmp, rng):
  path = _image_folder(tmp / "images", rng, "3.png", _png(rng))  # every image good: the names are short
  names = tmp / "names.json"
  names.write_text(json.dumps(["one"]))  # two class folders (one, zero: sorted), one name
  data = dict(image_source="image_folder", image_path=path, class_names_file=str(names))
  pattern = r"config\.data\.class_names_file: 1 class names for the 2 class folders of .*\(folder 'zero', class id 1,"
  return data, 0, 0, pattern, pattern


def _row_text_empty(tmp, rng):
  del rng
  path = tmp / "empty.txt"
  path.write_bytes(b"")
  pattern = rf"{path}: no text \(the file is empty or holds only blank lines\)"
  return dict(text_source="text_file", text_path=str(path)), 0, 0, pattern, rf"no text in \['{path}'\]"


def _row_text_blank_lines(tmp, rng):
  del rng
  path = _lines(tmp / "blank.txt", [b"", b"   ", b"\t", b""])
  pattern = rf"{path}: no text \(the file is empty or holds only blank lines\)"
  return dict(text_source="text_file", text_path=path), 0, 0, pattern, rf"no text in \['{path}'\]"


def _row_text_empty_among_others(tmp, rng):
  del rng
  good = _lines(tmp / "good.txt", [f"record {i}\n".encode() for i in range(5)])
  empty = tmp / "empty.txt"
  empty.write_bytes(b"")
  data = dict(text_source="text_file", text_path=f"{good},{empty}")
  return data, 5, 1, rf"{empty}: no text \(the file is empty", None


def _row_text_every_record_bad(tmp, rng):
  del rng
  path = _lines(tmp / "latin1.txt", [f"caf\u00e9 {i}\n".encode("latin-1") for i in range(4)])
  data = dict(text_source="text_file", text_path=path)
  # Skipping, the epoch yields nothing; an endless stream (the trainer's) stops with the same error.
  return data, 0, 4, rf"{path}:\d: not UTF-8 text", None


ROWS = [
    ("png_truncated", "image", PIXELS, _row_images("x.png", lambda r: _png(r)[:60], r"unreadable image \(OSError")),
    ("png_garbage", "image", PIXELS, _row_images("x.png", lambda r: r.bytes(300), r"unreadable image \(Unidentified")),
    ("png_empty", "image", PIXELS, _row_images("x.png", lambda r: b"", r"unreadable image \(Unidentified")),
    ("jpeg_truncated", "image", PIXELS, _row_images("x.jpg", lambda r: _jpeg(r)[:400], r"unreadable image \(OSError")),
    (
        "jpeg_garbage",
        "image",
        PIXELS,
        _row_images("x.jpeg", lambda r: _jpeg(r)[:20] + r.bytes(600), r"unreadable image \((Unidentified|OSError)"),
    ),
    ("chat_jsonl_truncated_line", "text", PIXELS, _row_jsonl_truncated_chat),
    ("image_text_jsonl_truncated_line", "image", PIXELS, _row_jsonl_truncated_image_text),
    ("text_not_utf8", "text", PIXELS, _row_text_not_utf8),
    ("chat_jsonl_not_utf8", "text", PIXELS, _row_chat_not_utf8),
    ("image_text_jsonl_not_utf8", "image", PIXELS, _row_image_text_not_utf8),
    ("latent_of_another_shape", "image", LATENTS, _row_latent_wrong_shape),
    ("latent_class_id_out_of_range", "image", LATENTS, _row_latent_class_out_of_range),
    ("latent_class_id_beyond_the_model", "image", dict(LATENTS, num_classes=4), _row_latent_class_beyond_the_model),
    ("image_folder_class_id_out_of_range", "image", PIXELS, _row_image_folder_class_out_of_range),
    ("text_file_empty", "text", PIXELS, _row_text_empty),
    ("text_file_blank_lines_only", "text", PIXELS, _row_text_blank_lines),
    ("text_file_empty_among_others", "text", PIXELS, _row_text_empty_among_others),
    ("text_file_every_record_bad", "text", PIXELS, _row_text_every_record_bad),
]


def _config(model: dict, data: dict, skip: bool):
  c = mnist_tiny.get_config("test")
  c.model.update(model)
  c.data.update(dict(data, skip_bad_records=skip))
  return c


def _iterator(config, tok, kind):
  """The trainer's iterator (train/data_streams.py) over one epoch."""
  mc = ModelConfig.from_mapping(config.model)
  make = data_streams.text_iterator if kind == "text" else data_streams.image_iterator
  return make(config, mc, tok, 4, num_epochs=1, shard_index=0, shard_count=1)


def _read_all(config, tok, kind) -> tuple[int, dict]:
  """(records in the batches, stats) of one epoch."""
  it = _iterator(config, tok, kind)
  n = 0
  for b in it:
    n += int(b["image_mask"].sum()) if kind == "image" else int(b["segment_ids"].max(axis=1).sum())
  return n, it.stats


@pytest.mark.parametrize("name,kind,model,write", ROWS, ids=[r[0] for r in ROWS])
def test_bad_record(tmp_path, tok, name, kind, model, write):
  rng = np.random.default_rng(0)
  data, good, bad, strict_pattern, skip_pattern = write(tmp_path, rng)
  # (a) strict: one error naming the file and the record.
  with pytest.raises(ValueError, match=strict_pattern) as err:
    _read_all(_config(model, data, skip=False), tok, kind)
  assert not isinstance(err.value, RAW), f"{name}: a raw {type(err.value).__name__}"
  assert type(err.value).__name__ in ("BadRecordError", "DataConfigError"), err.value
  # (b) skipping: the good records are read and the bad ones counted, or (see the module
  # docstring) an error even so.
  if skip_pattern is not None:
    with pytest.raises(ValueError, match=skip_pattern):
      _read_all(_config(model, data, skip=True), tok, kind)
    return
  config = _config(model, data, skip=True)
  if good == 0:
    # Every record bad: an epoch yields nothing and counts them all; the trainer's endless stream
    # stops with an error once it has read each record twice, instead of spinning forever.
    endless = pipeline.make_text_iterator(
        registry.text_source(config.data), tok, batch_size=4, seq_len=32, shard_index=0, shard_count=1
    )
    with pytest.raises(BadRecordError, match=rf"the last {2 * bad + 1} records read were all bad and skipped"):
      next(endless)
  n, stats = _read_all(config, tok, kind)
  assert (n, stats) == (good, {"skipped_records": bad})


def test_skipped_records_reach_metrics_jsonl(tmp_path):
  """Training on text with malformed records and --config.data.skip_bad_records=True: each row
  of metrics.jsonl carries skipped_records = the empty file skipped while indexing + the bad
  paragraphs among the stream positions the run had consumed by that step, counted here from the
  shuffled stream itself (and by the same pipeline replayed)."""
  paragraphs = [f"record {i} of {i * 7} and {i * 13}".encode() for i in range(24)]
  bad_lines = {3, 8, 11, 17, 20}  # Latin-1 bytes: not UTF-8
  for i in bad_lines:
    paragraphs[i] = f"caf\u00e9 number {i}".encode("latin-1")
  text = _lines(tmp_path / "corpus.txt", [p + b"\n" for p in paragraphs])
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  work = tmp_path / "run"
  overrides = [
      "--config.data.text_source=text_file",
      f"--config.data.text_path={text},{empty}",
      "--config.data.skip_bad_records=True",
      # Text steps only: one program to compile, a few seconds of training.
      "--config.schedule.diffusion=0",
      "--config.schedule.ar=1",
      "--config.num_train_steps=6",
      "--config.log_every_steps=2",
      "--config.checkpoint_every_steps=0",
  ]
  cmd = [sys.executable, "-m", "monoformer_jax.main", "--config=configs/mnist_tiny.py:test", f"--workdir={work}"]
  proc = subprocess.run(
      cmd + overrides, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r["skipped_records"] for r in rows if "skipped_records" in r}
  assert sorted(logged) == [2, 4, 6], rows

  # The run's own iterator, rebuilt from its saved config and tokenizer (data_streams.build_data).
  config = _config({}, dict(text_source="text_file", text_path=f"{text},{empty}"), skip=True)
  tok = tok_lib.load_sentencepiece(str(work / "tokenizer" / "tokenizer.model"))
  d = config.data
  source = registry.text_source(d)
  assert source.num_skipped_at_index == 1  # empty.txt
  bad = {i for i in range(len(source)) if source[i] is None}
  assert len(bad) == len(bad_lines)
  it = pipeline.make_text_iterator(
      source,
      tok,
      batch_size=d.text_batch_size,
      seq_len=d.text_seq_len,
      seed=config.seed + 1,
      packing=d.packing,
      image_shape=(28, 28, 1),
      shard_index=0,
      shard_count=1,
  )
  stream = pipeline.shard_stream(
      grain.MapDataset.range(len(source)),
      seed=config.seed + 1,
      shard_index=0,
      shard_count=1,
      block=d.text_batch_size,
  )
  for step in range(1, 7):
    next(it)
    if step in logged:
      consumed = it.get_state()["grain"]["next_index"]  # positions read into this step's batches
      expected = 1 + sum(int(stream[p][1]) in bad for p in range(consumed))
      assert logged[step] == it.stats["skipped_records"] == expected, (step, logged, consumed)
  assert logged[6] > 1  # bad paragraphs were read, not only the empty file


class _Digits:
  """Six 28x28 digits with labels 0..5; record 4 claims class 12 (of 10)."""

  skip_bad_records = False

  def __len__(self):
    return 6

  def __getitem__(self, i):
    image = np.full((28, 28, 1), 20 * i, np.uint8)
    return {"image": image, "label": 12 if i == 4 else i, "index": i}

  def __repr__(self):
    return "_Digits()"


@pytest.mark.parametrize("skip", [False, True])
def test_understanding_rows_name_or_skip_a_bad_label(tok, skip):
  source = _Digits()
  source.skip_bad_records = skip
  it = make_understanding_iterator(
      source,
      tok,
      batch_size=1,
      input_shape=(28, 28, 1),
      input_tokens=16,
      class_names=[str(i) for i in range(10)],
      num_epochs=1,
      shuffle=False,
      shard_index=0,
      shard_count=1,
  )
  if not skip:
    with pytest.raises(BadRecordError, match=r"record 4.* has class id 12, outside 0\.\.9"):
      list(it)
    return
  batches = list(it)
  assert len(batches) == 5 and it.stats["skipped_records"] == 1
