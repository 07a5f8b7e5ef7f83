"""LLaVA conversations (`llava_v1_5_mix665k.json`) as understanding rows: the source (its index,
its records, bad ones named by index or skipped and counted), the rows (the image where
`<image>` stands, several turns, only the answers trained, text-only records), the two chat
templates, and the loss the `understand` step takes on them (it reads the image, not the
question's tokens as targets)."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import mllm256
from monoformer_jax import batch as batch_lib
from monoformer_jax.data import chat_format, conversations, llava
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.data.sources import BadRecordError
from monoformer_jax.run import config as config_lib
from monoformer_jax.train.steps import batch_normalisers, make_loss_fn
from monoformer_jax.vision.encoders import patch_encoder
from tests.helpers import random_params, tiny_config

SIZE = 8  # images are centre-cropped to 8x8 RGB; patch 4: 4 tokens of 48 features
RECORDS = [
    {
        "id": "a",
        "image": "coco/one.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the bus?"},
            {"from": "gpt", "value": "The bus is red."},
            {"from": "human", "value": "How many wheels?"},
            {"from": "gpt", "value": "Four wheels."},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there."}]},
    {
        "id": "c",
        "image": "vg/two.jpg",
        "conversations": [
            {"from": "human", "value": "Describe it briefly.\n<image>"},
            {"from": "gpt", "value": "A small dog on grass."},
        ],
    },
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [m["value"] for r in RECORDS for m in r["conversations"]] * 20 + ["### Human: ### Assistant: is the a"] * 20
  return tok_lib.train_sentencepiece(texts, 300, str(tmp_path_factory.mktemp("tok")))


def write_llava(root, records, rng, sizes=((20, 30), (16, 12))):
  """The records as a JSON list (with non-ASCII text, so byte offsets are tested) and their images."""
  (root / "coco").mkdir(parents=True, exist_ok=True)
  (root / "vg").mkdir(exist_ok=True)
  for name, size in zip(("coco/one.png", "vg/two.jpg"), sizes):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
  path = root / "llava.json"
  path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
  return path


def test_the_list_is_indexed_by_byte_and_read_record_by_record(tmp_path, rng):
  records = [dict(RECORDS[1], id="é ü 中文")] + RECORDS
  path = write_llava(tmp_path, records, rng)
  spans = llava.json_list_spans(str(path))
  raw = path.read_bytes()
  assert [json.loads(raw[a:b]) for a, b in spans] == records
  source = llava.LlavaSource(str(path), image_size=SIZE)
  assert len(source) == 4
  first = source[1]
  assert first["turns"] == [
      ("<image>\nWhat color is the bus?", "The bus is red."),
      ("How many wheels?", "Four wheels."),
  ]
  assert first["image"].shape == (SIZE, SIZE, 3) and first["image"].dtype == np.uint8
  assert set(source[2]) == {"turns"}  # a text-only dialogue
  assert source[3]["turns"][0][0].endswith("<image>")
  assert "record 2" in source.record_name(2)
  # The same records one per line (.jsonl).
  lines = tmp_path / "llava.jsonl"
  lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  assert llava.LlavaSource(str(lines), image_root=str(tmp_path), image_size=SIZE)[1]["turns"] == first["turns"]


def _rows(tok, source, template="none", seq_len=128, batch_size=3):
  it = conversations.make_conversation_iterator(
      source,
      tok,
      batch_size=batch_size,
      seq_len=seq_len,
      input_shape=(SIZE, SIZE, 3),
      input_tokens=4,
      template=template,
      shuffle=False,
      num_epochs=1,
      shard_index=0,
      shard_count=1,
  )
  return next(it), it


@pytest.mark.parametrize("template", chat_format.TEMPLATES)
def test_rows_read_the_image_where_it_stands_and_train_the_answers_only(tmp_path, rng, tok, template):
  source = llava.LlavaSource(str(write_llava(tmp_path, RECORDS, rng)), image_size=SIZE)
  batch, _ = _rows(tok, source, template)
  # "### Human: <image>\n...": the text before the image is encoded alone, then each turn whole.
  human = tok.encode(chat_format.HUMAN) if template == "human_assistant" else []
  header = tok.encode(chat_format.ASSISTANT) if template == "human_assistant" else []
  q1, a1, a2 = (tok.encode(t) for t in ("What color is the bus?", "The bus is red.", "Four wheels."))
  second = tok.encode(("### Human: " if human else "") + "How many wheels?")
  bos, eos, start, end, nl = tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id, tok.newline_ids
  want = [bos, *human, start, *[0] * 4, end, *nl, *q1, *header, *a1, eos, bos, *second, *header, *a2, eos]
  n = len(want)
  np.testing.assert_array_equal(batch["tokens"][0, :n], want)
  assert not batch["tokens"][0, n:].any() and not batch["segment_ids"][0, n:].any()
  image_at = 1 + len(human) + 1
  assert list(batch["kinds"][0, image_at : image_at + 4]) == [batch_lib.KIND_INPUT_IMAGE] * 4
  assert batch["input_mask"][:, 0].tolist() == [True, False, True]
  np.testing.assert_allclose(batch["input_images"][0, 0], source[0]["image"] / 127.5 - 1, atol=1e-6)
  # Targets trained: exactly the answers and their </s>, predicted from the token before each.
  trained = np.flatnonzero(batch["loss_mask"][0])
  targets = batch["targets"][0, trained].tolist()
  assert targets == [*a1, eos, *a2, eos]
  # The text-only record is a row of its own, no image slot used; the third reads its image last.
  assert not batch["input_mask"][1].any() and batch["tokens"][1, 0] == bos
  row2 = batch["kinds"][2]
  assert (row2 == batch_lib.KIND_INPUT_IMAGE).sum() == 4


def test_rows_are_cut_to_their_length(tmp_path, rng, tok):
  """The official truncation: a row longer than seq_len loses its tail (and an image that does
  not fit ends it, its `<|im_start|>` with it)."""
  source = llava.LlavaSource(str(write_llava(tmp_path, RECORDS, rng)), image_size=SIZE)
  batch, _ = _rows(tok, source, seq_len=16, batch_size=1)
  assert batch["segment_ids"][0].all() and batch["input_mask"][0, 0]
  before = [tok.bos_id, *tok.encode("Describe it briefly.\n")]  # the text before its image
  tail = conversations.conversation_pieces(tok, source[2], "none", input_tokens=4, seq_len=len(before) + 3)
  assert tail == [("text", before, False)]  # the image did not fit: it and its <|im_start|> are gone


def test_the_answer_reads_the_image_and_the_question_is_not_trained(tmp_path, rng, tok, seed):
  """The understand step's loss on a LLaVA row: another image changes the answer's loss; the
  question's tokens are never targets (another question changes the loss only through what the
  answer reads)."""
  source = llava.LlavaSource(str(write_llava(tmp_path, RECORDS[:1], rng)), image_size=SIZE)
  config = tiny_config(vocab_size=tok.vocab_size, input_feature_dim=48)
  params = random_params(config, seed)
  loss_fn = jax.jit(make_loss_fn("understand", config, None, 1.0, 1.0))
  encoder = patch_encoder((SIZE, SIZE, 3), 4)
  record = source[0]

  def loss(record):
    pieces = conversations.conversation_pieces(tok, record, "none", encoder.tokens, 128)
    batch = batch_lib.empty_batch(1, 128, 1, (4, 6, 3), 1, (SIZE, SIZE, 3))
    batch_lib.RowBuilder(batch, 0, 6, False, encoder.tokens).add(pieces)
    batch = encoder.encode_batch(batch)
    value, aux = loss_fn(params, batch, jax.random.key(0), batch_normalisers(batch), np.arange(1))
    return float(value), aux, batch

  base, aux, batch = loss(record)
  answers = [t for _, a in record["turns"] for t in tok.encode(a)] + [tok.eos_id] * 2
  assert float(aux["answer_tokens"]) == len(answers)
  other = dict(record, image=255 - record["image"])
  assert abs(loss(other)[0] - base) > 1e-4
  # Position by position: a target is trained exactly when its token is an answer's (or </s>).
  pieces = conversations.conversation_pieces(tok, record, "none", encoder.tokens, 128)
  flags = [train for kind, value, train in pieces for _ in (value if kind == "text" else range(4))]
  is_text = [kind == "text" for kind, value, _ in pieces for _ in (value if kind == "text" else range(4))]
  want = [float(bool(flags[p + 1] and is_text[p] and is_text[p + 1])) for p in range(len(flags) - 1)]
  np.testing.assert_array_equal(batch["loss_mask"][0, : len(want)], want)
  assert want.count(0.0) > len(tok.encode("What color is the bus?")) and sum(want) == len(answers)
  reworded = dict(record, turns=[("<image>\nWhich color has the bus?", record["turns"][0][1])] + record["turns"][1:])
  assert abs(loss(reworded)[0] - base) > 1e-4  # read by the answer...
  assert float(loss(reworded)[1]["answer_tokens"]) == len(answers)  # ...never a target


def test_training_rows_hold_what_prompts_give(tok, rng):
  """The round trip: the row a dialogue trains on holds, up to each answer, exactly the prompt
  `dialogue_pieces` writes for that point of the dialogue (what chat / describe feed the model)."""
  image = rng.standard_normal((SIZE, SIZE, 3)).astype(np.float32)
  turns = [("<image>\nWhat color is the bus?", "The bus is red."), ("How many wheels?", "Four wheels.")]
  for template in chat_format.TEMPLATES:
    row = chat_format.dialogue_pieces(tok, turns, template, [image])
    flat = _flatten(row)
    for k in range(len(turns)):
      prompt = chat_format.dialogue_pieces(tok, turns[:k] + [(turns[k][0], None)], template, [image])
      head = _flatten(prompt)
      assert flat[: len(head)] == head, (template, k)
      answer = tok.encode(turns[k][1]) + [tok.eos_id]
      assert flat[len(head) : len(head) + len(answer)] == answer  # the answer follows at once
  text = chat_format.dialogue_pieces(tok, [("Say hi.", None)], "human_assistant")
  # Each turn and header tokenized alone (as the official code tokenizes each message): the
  # header's leading SentencePiece space decodes as a space.
  assert tok.decode(chat_format.prompt_ids(text)) == "### Human: Say hi. ### Assistant:"


def _flatten(pieces):
  out = []
  for kind, value, _ in pieces:
    out += list(value) if kind == "text" else ["image"]
  return out


def test_bad_records_are_named_by_index_or_skipped_and_counted(tmp_path, rng, tok):
  bad = [
      RECORDS[1],
      dict(RECORDS[0], image="coco/missing.png"),
      {"id": "x", "conversations": [{"from": "gpt", "value": "an answer first"}]},
      {"id": "y", "conversations": [{"from": "human", "value": "<image>\nno image"}, {"from": "gpt", "value": "ok"}]},
      RECORDS[2],
  ]
  path = write_llava(tmp_path, bad, rng)
  source = llava.LlavaSource(str(path), image_size=SIZE)
  with pytest.raises(BadRecordError, match=r"record 1: .*missing\.png: image file not found"):
    source[1]  # pylint: disable=pointless-statement
  with pytest.raises(BadRecordError, match=r"record 2: .*is a 'gpt' turn where a human turn belongs"):
    source[2]  # pylint: disable=pointless-statement
  with pytest.raises(BadRecordError, match=r"record 3: 1 <image> in its questions, but it has no image"):
    source[3]  # pylint: disable=pointless-statement
  skipping = llava.LlavaSource(str(path), image_size=SIZE, skip_bad_records=True)
  batch, it = _rows(tok, skipping, batch_size=2)
  assert batch["segment_ids"][:, 0].tolist() == [1, 1] and it.stats["skipped_records"] == 3
  # A list cut short (a killed copy) stops the run, naming the byte and the records before it.
  cut = tmp_path / "cut.json"
  cut.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(
      BadRecordError, match=r"cut\.json: not a JSON list of records: .* at byte \d+ \(after 4 records\)"
  ):
    llava.LlavaSource(str(cut))
  with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
    _rows(tok, source, template="chatml")


def test_config_names_a_bad_template_or_a_conversation_source_without_its_file():
  c = mllm256.get_config()
  c.data.chat_template = "chatml"
  c.input_images.encoder = "patch"  # no CLIP folder to find here
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.chat_template: unknown chat template 'chatml'"):
    config_lib.validate_config(c, ["diffusion"], num_devices=1)
  c = mllm256.get_config("smoke")
  c.input_images.encoder = "patch"  # no CLIP folder to find: the check of the LLaVA file comes next
  with pytest.raises(
      config_lib.ConfigError, match=r"config\.data\.understand_path: required for understand_source='llava'"
  ):
    config_lib.validate_config(c, ["understand"], num_devices=1)
