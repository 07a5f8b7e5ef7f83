"""The paper's other three recipes end to end at toy size, by the commands of their docstrings:
`configs/t2i256.py` (captions), `configs/t2i_chat256.py` (captions and dialogues, 9:1) and
`configs/mllm256.py` (LLaVA conversations read through CLIP beside captions), each as its
`:smoke` variant on stand-ins written here (JourneyDB-style captioned images, UltraChat-style
dialogues, LLaVA records and their images, a tiny VAE, and a tiny random LLaMA and CLIP written
by transformers itself): extraction, training, sampling, chat, reading, CLIP score and FID.

Every command of the recipes' docstrings (and docs/recipes.md) is parsed by its entry point; the
ones a recipe runs are run with the stand-ins' paths in place of /path/to/..."""

import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from monoformer_jax import evaluate as evaluate_main
from monoformer_jax import main as train_main
from monoformer_jax import sample as sample_main
from monoformer_jax import cli
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.data.image_sources import load_image
from monoformer_jax.data.pipeline import make_text_iterator
from monoformer_jax.data.sources import ChatJsonlSource
from monoformer_jax.evaluation import sample_dirs, t2i_samples
from monoformer_jax.inference import InferenceError, InferenceModel
from monoformer_jax.sampling import chat as chat_lib
from monoformer_jax.train.scheduler import StepScheduler
from monoformer_jax.tools import compile_for, extract_latents
from tests.helpers import ROOT, random_fid_state_dict, write_tiny_diffusers_vae
from tests.test_clip_model import _learn_merges
from tests.test_clip_vision import TINY, _redraw
from tests.test_llava import RECORDS, write_llava

RECIPES = ("t2i256", "t2i_chat256", "mllm256")
ENTRY_POINTS = {
    "monoformer_jax.main": train_main,
    "launch/tpu_pod.sh": train_main,
    "monoformer_jax.sample": sample_main,
    "monoformer_jax.evaluate": evaluate_main,
    "monoformer_jax.tools.extract_latents": extract_latents,
    "monoformer_jax.tools.compile_for": compile_for,
}
CAPTIONS = [
    "a red bus in the snow",
    "a lighthouse on a cliff at sunset",
    "two cats on a sofa",
    "a bowl of green apples",
    "a city street at night, neon lights",
    "an old map of the sea",
    "a small dog on grass",
    "a mountain lake in autumn",
]
DIALOGUES = [
    ["Can you briefly introduce Berlin?", "Berlin is the capital of Germany.", "And Paris?", "Paris is in France."],
    ["Say hi.", "Hi there."],
    ["What is two plus two?", "Four."],
]


def recipe_commands(text: str) -> list[list[str]]:
  """The commands of a docstring or a markdown page: (entry point, arguments), continuation lines
  joined, comments dropped."""
  text = re.sub(r"\\\n\s*", " ", text)
  out = []
  for line in text.split("\n"):
    line = line.strip().lstrip("$ ").split(" #")[0]
    words = shlex.split(line) if line.startswith(("python -m monoformer_jax", "launch/tpu_pod.sh")) else []
    if words:
      out.append(words[2:] if words[0] == "python" else words)
  return out


def _docstrings() -> dict:
  texts = {name: open(os.path.join(ROOT, "configs", f"{name}.py")).read().split('"""')[1] for name in RECIPES}
  texts["docs/recipes.md"] = open(os.path.join(ROOT, "docs", "recipes.md")).read()
  return texts


@pytest.mark.parametrize("where", [*RECIPES, "docs/recipes.md"])
def test_every_documented_command_parses(where, monkeypatch):
  """Each command's flags and --config.FIELD overrides are read by its entry point as written
  (nothing runs: `run` is replaced)."""
  monkeypatch.chdir(ROOT)
  commands = recipe_commands(_docstrings()[where])
  assert len(commands) >= 3, where
  for words in commands:
    module = ENTRY_POINTS[words[0]]
    status = cli.main(None, module.define_flags, lambda fv, rest: 2 * bool(rest), words[1:])
    assert status == 0, (where, words)


# ----------------------------------------------------------------------------------------------
# The stand-ins.


def _tiny_llama(path, tok, seed):
  """What a TinyLlama download holds (config.json, model.safetensors, tokenizer.model), at the
  smoke variants' shape, written by transformers."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=tok.base_vocab_size,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      tie_word_embeddings=False,
      bos_token_id=tok.bos_id,
      eos_token_id=tok.eos_id,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  (path / "tokenizer.model").write_bytes(open(tok.source, "rb").read())


def _tiny_clip(path, seed):
  """A whole random CLIPModel (the vision tower reads the LLaVA images; the text tower and the
  projections score samples) and its BPE tokenizer, written by transformers."""
  vocab, merges = _learn_merges(CAPTIONS, 40)
  torch.manual_seed(seed)
  text = dict(
      vocab_size=max(vocab.values()) + 1,
      hidden_size=16,
      intermediate_size=24,
      num_hidden_layers=1,
      num_attention_heads=2,
      max_position_embeddings=77,
      bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"],
  )
  model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=TINY, text_config=text, projection_dim=8))
  _redraw(model)
  model.eval().save_pretrained(path)
  transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
  size = TINY["image_size"]  # what openai/clip-vit-* ship beside the weights, at this tower's size
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  processor.save_pretrained(path)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, module_seed):
  """Every raw file the recipes start from, at toy size; returns {docstring path: stand-in}."""
  base = tmp_path_factory.mktemp("recipes")
  rng = np.random.default_rng(module_seed("files"))
  images = base / "JourneyDB" / "train" / "images"
  (images / "000").mkdir(parents=True)
  lines = []
  for i, caption in enumerate(CAPTIONS):
    cells = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(cells).resize((24, 20), Image.BILINEAR).save(images / "000" / f"{i}.jpg", quality=95)
    lines.append({"img_path": f"./000/{i}.jpg", "prompt": caption, "Task2": {"Caption": caption}})
  lines.insert(3, {"img_path": "./000/missing.jpg", "prompt": "JourneyDB misses many images"})
  anno = base / "JourneyDB" / "train" / "train_anno.jsonl"
  anno.write_text("".join(json.dumps(line) + "\n" for line in lines))
  chats = base / "ultrachat"
  chats.mkdir()
  for k in range(2):
    (chats / f"train_{k}.jsonl").write_text("".join(json.dumps({"data": d}) + "\n" for d in DIALOGUES))
  llava_root = base / "llava_images"
  llava_json = write_llava(llava_root, RECORDS, rng, sizes=((40, 48), (36, 30)))
  texts = CAPTIONS + [t for d in DIALOGUES for t in d] + [m["value"] for r in RECORDS for m in r["conversations"]]
  tok = tok_lib.train_sentencepiece(texts * 4, 300, str(base / "spm"), name="spm")
  _tiny_llama(base / "TinyLlama", tok, module_seed("llama"))
  _tiny_clip(base / "clip", module_seed("clip"))
  write_tiny_diffusers_vae(base / "vae", module_seed("vae"), 16)
  torch.save(random_fid_state_dict(module_seed("inception")), base / "inception.pth")
  reference = base / "coco_val_images"
  reference.mkdir()
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{i}.png")
  (base / "parti_prompts.json").write_text(json.dumps([{"prompt": c, "category": "x"} for c in CAPTIONS[:3]]))
  (base / "questions.txt").write_text("Can you briefly introduce Berlin?\nAnd Paris?\n")
  for name in ("bus.jpg", "street.png"):
    Image.fromarray(rng.integers(0, 256, (28, 40, 3), dtype=np.uint8)).save(base / name)
  return {
      "/path/to/sd-vae-ft-mse": base / "vae",
      "/path/to/JourneyDB/train/train_anno.jsonl": anno,
      "/path/to/JourneyDB/train/images": images,
      "/path/to/journeydb256_latents": base / "latents",
      "/path/to/TinyLlama-1.1B-Chat-v1.0": base / "TinyLlama",
      "/path/to/ultrachat": chats,
      "/path/to/llava_v1_5_mix665k.json": llava_json,
      "/path/to/llava_images": llava_root,
      "/path/to/clip-vit-large-patch14": base / "clip",
      "/path/to/parti_prompts.json": base / "parti_prompts.json",
      "/path/to/pt_inception-2015-12-05-6726825d.pth": base / "inception.pth",
      "/path/to/coco_val_images": reference,
      "gs://BUCKET/runs": base / "runs",
      "": base,  # relative file names (outputs, questions.txt, bus.jpg) are the stand-ins' folder's
  }


def _substitute(word: str, paths: dict, recipe: str) -> str:
  """A documented argument with the stand-ins' paths, the smoke variant and the tiny VAE."""
  for doc, real in paths.items():
    if doc:
      word = word.replace(doc, str(real))
  word = word.replace(f"configs/{recipe}.py", f"{ROOT}/configs/{recipe}.py:smoke")
  flag, eq, value = word.partition("=")
  if eq and flag in ("--out", "--chat_file", "--describe"):
    value = ",".join(str(paths[""] / v) for v in value.split(","))
    word = f"{flag}={value}"
  return word


def run_documented(recipe: str, paths: dict, entry: str, extra=()) -> tuple[int, list[str]]:
  """Runs the recipe's documented commands of `entry` (their stand-in forms), in order; returns
  the last one's status and arguments."""
  status, args = None, None
  for words in recipe_commands(_docstrings()[recipe]):
    if words[0] != entry:
      continue
    args = [_substitute(w, paths, recipe) for w in words[1:]]
    if entry == "monoformer_jax.tools.extract_latents":
      if (paths["/path/to/journeydb256_latents"] / "extraction.json").exists():
        continue  # the recipes share one extraction
      args[args.index("--image_size") + 1] = "16"  # the tiny VAE's 8x8 latents
      args.append("--no_progress")
    status = ENTRY_POINTS[entry].main([*args, *extra])
    assert status == 0, (recipe, args)
  assert args is not None, f"{recipe} documents no {entry} command"
  return status, args


TRAIN = "launch/tpu_pod.sh"


def _metrics(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def t2i_run(stand_ins):
  run_documented("t2i256", stand_ins, "monoformer_jax.tools.extract_latents")
  run_documented("t2i256", stand_ins, TRAIN, ["--config.vae.scale=0.37"])
  return stand_ins["gs://BUCKET/runs"] / "t2i256"


@pytest.mark.slow
def test_t2i_recipe_trains_on_captions(t2i_run):
  extraction = json.loads((t2i_run.parent.parent / "latents" / "extraction.json").read_text())
  assert extraction["num_records"] == len(CAPTIONS), extraction  # the missing image skipped
  rows = _metrics(t2i_run)
  assert {k for r in rows for k in r if k.startswith("steps_")} == {"steps_diffusion"}
  assert all(np.isfinite(r["loss_diffusion"]) for r in rows if "loss_diffusion" in r)
  config = json.loads((t2i_run / "config.json").read_text())
  assert config["init_from"].startswith("hf:") and config["model"]["t_embed"] == "add_before_image_tokens"
  assert sorted(os.listdir(t2i_run / "checkpoints")) == ["4"]


@pytest.fixture(scope="module")
def clip_scored(t2i_run, stand_ins):
  """The documented evaluation (CLIP score and FID of PartiPrompts-style samples), two samples a
  prompt so that FID has some spread to measure."""
  # Batches of 8 16x16 images: the Inception compile of test_imagenet_smoke's FID (the session's
  # compilation cache holds one for both), and the sampler's of the split test below.
  extra = [
      "--config.eval.samples_per_prompt=4",
      "--config.eval.chunk=8",
      "--config.eval.inception_batch_size=8",
      "--config.eval.is_splits=2",
  ]
  run_documented("t2i256", stand_ins, "monoformer_jax.evaluate", extra)
  return json.loads((t2i_run / "eval" / "report.json").read_text())


@pytest.mark.slow
def test_clip_score_and_fid_of_prompt_samples_with_their_settings(clip_scored, t2i_run, stand_ins):
  report = clip_scored["clip_score"]
  assert 0 < report["clip_score"] <= 100 and report["num_samples"] == 12 and report["num_prompts"] == 3
  assert report["samples_per_prompt"] == 4 and report["resolution"] == [16, 16]
  assert report["sampling"]["num_steps"] == 4 and report["sampling"]["guidance_scale"] == 4.0
  assert report["sampling"]["cfg_mode"] == "official_first3" and report["step"] == 4
  fid = clip_scored["fid"]
  assert np.isfinite(fid["fid"]) and fid["fid"] > 0 and fid["samples"]["num_samples"] == 12
  assert fid["num_reference"] == 8
  out = t2i_run / "eval" / "clip_score_samples"
  assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(12)]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["prompt_prefix"] == "Please generate an image of " and manifest["max_prompt_tokens"] == 16


@pytest.mark.slow
def test_clip_score_matches_transformers_on_the_samples(clip_scored, t2i_run, stand_ins):
  """The suite's score is transformers' CLIPModel on the written images (CLIPImageProcessor's
  preprocessing within its rounding) and the raw prompts (sample i draws prompt i mod 3)."""
  prompts = [p["prompt"] for p in json.loads(stand_ins["/path/to/parti_prompts.json"].read_text())]
  clip_dir = stand_ins["/path/to/clip-vit-large-patch14"]
  model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
  processor = transformers.CLIPProcessor.from_pretrained(clip_dir)
  out = t2i_run / "eval" / "clip_score_samples"
  images = [np.asarray(Image.open(out / "images" / f"{i:06d}.png")) for i in range(12)]
  texts = [prompts[i % 3] for i in range(12)]
  inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
  with torch.no_grad():
    got = model(**inputs)
  cos = (got.image_embeds * got.text_embeds).sum(-1).numpy()
  want = float(np.mean(100 * np.maximum(cos, 0)))
  assert abs(clip_scored["clip_score"]["clip_score"] - want) < 0.5, (clip_scored["clip_score"]["clip_score"], want)


@pytest.mark.slow
def test_clip_score_samples_resume_and_split_over_hosts(clip_scored, t2i_run, stand_ins, tmp_path):
  """Share p of 2 (a host of two) draws chunks p, p + 2, ...; together they write the images one
  process wrote in chunks of another size; a rerun finds every chunk there and draws nothing; a
  directory made with other settings is refused by name."""
  prompts = t2i_samples.read_prompts(str(stand_ins["/path/to/parti_prompts.json"]))
  for process in (1, 0):
    t2i_samples.generate(str(t2i_run), str(tmp_path), prompts, samples_per_prompt=4, chunk=4, share=(process, 2))
    written = sorted(p.name for p in tmp_path.glob("samples_*.npz"))
    assert written == [f"samples_00000000{i}.npz" for i in ((4,) if process else (0, 4, 8))]
  written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("samples_*.npz")}
  t2i_samples.generate(str(t2i_run), str(tmp_path), prompts, samples_per_prompt=4, chunk=4)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("samples_*.npz")} == written
  split, _ = sample_dirs.load_samples(str(tmp_path))
  whole, _ = sample_dirs.load_samples(str(t2i_run / "eval" / "clip_score_samples"))
  np.testing.assert_array_equal(split, whole)
  with pytest.raises(ValueError, match=r"other settings \(seed: 0 on disk, 1 now\)"):
    t2i_samples.generate(str(t2i_run), str(tmp_path), prompts, samples_per_prompt=4, chunk=4, seed=1)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": " "}]))
    t2i_samples.read_prompts(str(tmp_path / "bad.json"))


@pytest.fixture(scope="module")
def chat_run(stand_ins, t2i_run):
  del t2i_run  # its extraction: the recipes share the latents
  run_documented("t2i_chat256", stand_ins, TRAIN, ["--config.vae.scale=0.37"])
  return stand_ins["gs://BUCKET/runs"] / "t2i_chat256"


@pytest.mark.slow
def test_t2i_chat_recipe_trains_captions_and_dialogues_9_to_1(chat_run):
  rows = _metrics(chat_run)
  texts = [r for r in rows if "steps_ar" in r]
  assert len(texts) == 1 and np.isfinite(texts[0]["loss_lm"]) and all("steps_diffusion" in r for r in rows)
  config = json.loads((chat_run / "config.json").read_text())
  assert config["data"]["chat_template"] == "none" and config["data"]["text_source"] == "chat_jsonl"
  scheduler = StepScheduler({k: config["schedule"][k] for k in ("diffusion", "ar", "mixed", "understand")})
  kinds = [scheduler.next(i) for i in range(100)]
  assert kinds.count("ar") == 10 and kinds.count("diffusion") == 90 and kinds.index("ar") == 5


@pytest.fixture(scope="module")
def mllm_run(stand_ins, t2i_run):
  del t2i_run
  run_documented("mllm256", stand_ins, TRAIN, ["--config.vae.scale=0.37"])
  return stand_ins["gs://BUCKET/runs"] / "mllm256"


@pytest.mark.slow
def test_mllm_recipe_reads_llava_through_clip_beside_captions(mllm_run):
  rows = _metrics(mllm_run)
  assert {k for r in rows for k in r if k.startswith("steps_")} == {"steps_diffusion", "steps_understand"}
  understood = [r for r in rows if "loss_understand" in r]
  assert understood and all(np.isfinite(r["loss_understand"]) and r["answer_tokens"] > 0 for r in understood)
  config = json.loads((mllm_run / "config.json").read_text())
  assert config["input_images"]["encoder"] == "clip" and config["model"]["bidirectional_input_image"] is False


@pytest.mark.slow
def test_chat_and_t2i_samples_of_the_chat_recipe(chat_run, stand_ins, capsys):
  """The documented sample commands: an image from a caption, one question, a dialogue from a file."""
  capsys.readouterr()
  run_documented("t2i_chat256", stand_ins, "monoformer_jax.sample")
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  turns = ["Can you briefly introduce Berlin?", "Can you briefly introduce Berlin?", "And Paris?"]
  assert [line["user"] for line in lines] == turns and all(isinstance(line["assistant"], str) for line in lines)
  assert np.asarray(Image.open(stand_ins[""] / "bus.png")).shape == (16, 16, 3)


@pytest.fixture(scope="module")
def chat_model(chat_run):
  return InferenceModel.from_workdir(str(chat_run))


@pytest.mark.slow
@pytest.mark.parametrize("template", ["none", "human_assistant"])
def test_chat_prompts_with_what_the_training_rows_hold(chat_model, stand_ins, template, monkeypatch):
  """The round trip: the ids `InferenceModel.chat` feeds the model for a dialogue's second turn
  are the ids the training row of that dialogue holds before the second answer (the text
  pipeline's row, in the same template), and the first answer it wrote stands where the row's
  answer does."""
  model = chat_model
  monkeypatch.setitem(model.run_config.data, "chat_template", template)
  seen = []
  original = chat_lib.generate_tokens

  def spy(params, config, prompts, **kw):
    seen.append(list(prompts[0]))
    return original(params, config, prompts, **kw)

  monkeypatch.setattr(chat_lib, "generate_tokens", spy)
  dialogue = DIALOGUES[0]
  answers = model.chat([dialogue[0], dialogue[2]], greedy=True, max_new_tokens=6)
  assert len(answers) == 2 and len(seen) == 2
  source = ChatJsonlSource(str(stand_ins["/path/to/ultrachat"] / "train_0.jsonl"), last_pair_only=False)
  row = make_text_iterator(
      source,
      model.tokenizer,
      batch_size=1,
      seq_len=256,  # the whole dialogue (the tiny tokenizer spells "###" in bytes)
      template=template,
      packing=False,
      shuffle=False,
      num_epochs=1,
      shard_index=0,
      shard_count=1,
  )
  tokens = next(row)["tokens"][0].tolist()
  tok = model.tokenizer
  first_answer = tok.encode(dialogue[1]) + [tok.eos_id]
  # The first prompt: the row up to its first answer; the second: the row up to its second
  # answer, with the model's own first answer where the row has the dataset's.
  assert tokens[: len(seen[0])] == seen[0]
  assert tokens[len(seen[0]) : len(seen[0]) + len(first_answer)] == first_answer
  written = tok.encode(answers[0]) + [tok.eos_id]
  assert seen[1][: len(seen[0])] == seen[0] and seen[1][len(seen[0]) : len(seen[0]) + len(written)] == written
  assert (
      seen[1][len(seen[0]) + len(written) :]
      == tokens[len(seen[0]) + len(first_answer) : len(seen[1]) - len(written) + len(first_answer)]
  )


@pytest.mark.slow
def test_describe_free_form_on_the_clip_recipe(mllm_run, stand_ins):
  """`sample --describe A.jpg,B.png --question Q` on the CLIP run: image files centre-cropped to
  the pixels it reads, free-form answers; the API's describe and a one-turn chat that reads the
  image give the same (greedy) answers."""
  run_documented("mllm256", stand_ins, "monoformer_jax.sample")
  answers = json.loads((stand_ins[""] / "answers.json").read_text())
  assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
  model = InferenceModel.from_workdir(str(mllm_run))
  assert model.reading_shape == (32, 32, 3)
  files = [str(stand_ins[""] / name) for name in ("bus.jpg", "street.png")]
  images = np.stack([load_image(f, 32, 3) for f in files])  # as the command reads them
  question = "What is unusual about this image?"
  assert model.describe(images, question) == answers
  assert model.chat(f"<image>\n{question}", images=images[:1], greedy=True) == answers[0]
  with pytest.raises(InferenceError, match="reads 1 <image> but was given 0"):
    model.chat("<image>\nWhat is this?")
