"""The embedded default's all_in_one variant end to end: one parameter tree trained on digits
from prompts, prose, and reading digits (`understand` steps), then answers about held-out
digits from the sample command (`--describe`) and the API, through the KV cache."""

import json

import jax
import numpy as np
import pytest

from monoformer_jax import batch as batch_lib
from monoformer_jax.data import mnist
from monoformer_jax.inference import InferenceError, InferenceModel
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.sampling import generate_tokens
from monoformer_jax.sampling.text import continuation
from tests.helpers import THREE_UNDERSTAND_STEPS, run_module, shared_all_in_one_run
from tests.test_clip_vision import make_tiny_clip

# The understanding loss falls by at least this much over those steps (measured: 6.27 -> 6.05 on
# the patch path, RESULTS.md; 6.27 -> 6.25 when the understand steps' loss weight is 0, so
# that only the other steps move it).
LOSS_UNDERSTAND_DROP = 0.1
QUESTION = "Which digit is this?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(the session's all_in_one,test run, trained with THREE_UNDERSTAND_STEPS; its stdout)."""
  work = shared_all_in_one_run(tmp_path_factory)
  return work, work.parent.joinpath("shared_all_in_one_run.stdout").read_text()


def _loss_understand_fell(work):
  logged = [r["loss_understand"] for r in map(json.loads, open(work / "metrics.jsonl")) if "loss_understand" in r]
  assert len(logged) == 3 and all(np.isfinite(logged)), logged
  assert logged[-1] < logged[0] - LOSS_UNDERSTAND_DROP, logged


def _understanding_prompts(model, images, question):
  """describe()'s prompts written out (token ids and decode.prefill's `prompt_inputs`), not
  through the code that builds them: `<s><|im_start|>`, the digit's 16 patches of 7x7 as input
  tokens (raster order, uint8 pixels to [-1, 1], model-space floats as given), `<|im_end|>\n`
  and the question."""
  assert model.config.input_feature_dim == 49  # the variant's 7x7 patches of 28x28x1 digits
  tok = model.tokenizer
  x = images.astype(np.float32) * (2.0 / 255.0) - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)
  n = len(x)
  features = x.reshape(n, 1, 4, 7, 4, 7).transpose(0, 1, 2, 4, 3, 5).reshape(n, 1, 16, 49)
  tail = [tok.im_end_id, *tok.newline_ids, *tok.encode(question)]
  ids = [tok.bos_id, tok.im_start_id] + [0] * 16 + tail
  kinds = [batch_lib.KIND_TEXT] * 2 + [batch_lib.KIND_INPUT_IMAGE] * 16 + [batch_lib.KIND_TEXT] * len(tail)
  patch_index = [0, 0] + list(range(16)) + [0] * len(tail)
  inputs = {
      "kinds": np.array([kinds] * n, np.int32),
      "patch_index": np.array([patch_index] * n, np.int32),
      "input_features": features,
  }
  return [ids] * n, inputs


def _explicit_answers(model, images, question):
  """Greedy answers of `generate_tokens` on `_understanding_prompts`, as describe() writes them."""
  tok = model.tokenizer
  ids, inputs = _understanding_prompts(model, images, question)
  new = generate_tokens(
      model.params, model.config, ids, max_new_tokens=16, stop_tokens=[tok.eos_id], prompt_inputs=inputs
  )
  return [continuation(tok, tok.encode(question), [t for t in n if t != tok.eos_id]).strip() for n in new]


def _first_answer_logits(model, images, question):
  """The logits of each prompt's first answer token (one forward of the whole prompt)."""
  ids, inputs = _understanding_prompts(model, images, question)
  n, length = len(ids), len(ids[0])
  batch = {
      "tokens": np.array(ids, np.int32),
      "segment_ids": np.ones((n, length), np.int32),
      "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)),
      **inputs,
  }
  model_fn = jax.jit(lambda p, b: MonoFormer(model.config).apply({"params": p}, b, return_image=False)["logits"])
  return np.asarray(model_fn(model.params, batch)[:, -1])


def _loud(images):
  """Digits as model-space floats 300 times louder than their pixels: through this 6-step
  model's barely trained image path, loud enough that the digit decides the greedy answer."""
  return 300.0 * (images.astype(np.float32) * (2.0 / 255.0) - 1.0)


@pytest.mark.slow
def test_understand_steps_train_beside_the_others(trained):
  work, stdout = trained
  assert "compiled and ran the first understand step" in stdout
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  kinds = {k for r in rows for k in r if k.startswith("steps_")}
  assert kinds == {"steps_diffusion", "steps_ar", "steps_understand"}
  understood = [r for r in rows if "loss_understand" in r]
  assert understood and all(np.isfinite(r["loss_understand"]) and r["answer_tokens"] > 0 for r in understood)
  _loss_understand_fell(work)


@pytest.mark.slow
def test_describe_from_the_command_and_the_api(trained, tmp_path):
  work, _ = trained
  images, _ = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(images))
  digits = images[held[:5]]
  np.savez(tmp_path / "digits.npz", images=digits)
  out = tmp_path / "answers.json"
  run_module(
      "-m",
      "monoformer_jax.sample",
      f"--workdir={work}",
      f"--describe={tmp_path / 'digits.npz'}",
      "--question=Which digit is this?",
      f"--out={out}",
  )
  answers = json.load(open(out))
  assert isinstance(answers, list) and len(answers) == 5 and all(isinstance(a, str) for a in answers)
  model = InferenceModel.from_workdir(str(work))
  assert model.describe(digits, "Which digit is this?") == answers  # greedy: the same answers
  assert model.describe(digits[:2]) == answers[:2]  # the default question is the run's
  # All three share one path: it reads the image. The answers are generate_tokens' on the
  # prompts written out here, and for louder digits (on which they differ) as well.
  assert answers == _explicit_answers(model, digits, QUESTION)
  loud = _loud(digits)
  loud_answers = model.describe(loud, QUESTION)
  assert loud_answers == _explicit_answers(model, loud, QUESTION) and len(set(loud_answers)) > 1, loud_answers
  # The trained model reads the digit: another digit changes the first answer token's logits.
  _, labels = mnist.load_mnist5k()
  others = images[[int(np.flatnonzero(labels == c)[0]) for c in (3, 7)]]
  logits = _first_answer_logits(model, np.concatenate([digits[:1], others]), QUESTION)
  assert np.abs(logits[1:] - logits[0]).max(axis=-1).min() > 1e-4, logits
  # The same digits read by --interleaved prompts (two placeholders in the second prompt).
  proc = run_module(
      "-m",
      "monoformer_jax.sample",
      f"--workdir={work}",
      "--interleaved",
      f"--read_images={tmp_path / 'digits.npz'}",
      "--prompt=<image>\nWhich digit is this?",
      "--prompt=<image> <image> <image> <image>\nWhich digit is this?",
      f"--out={tmp_path / 'parts'}",
      "--greedy",
      "--max_new_tokens=6",
  )
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  want = model.generate(
      ["<image>\nWhich digit is this?", "<image> <image> <image> <image>\nWhich digit is this?"],
      images=[digits[:1], digits[1:]],
      greedy=True,
      max_new_tokens=6,
  )
  assert [r["parts"][0] for r in rows] == [{"text": p[0][1]} for p in want]


@pytest.mark.slow
def test_generate_reads_images_where_the_prompt_says(trained):
  """`generate(prompts, images=...)`: `<image>` in the text reads the prompt's next image; the
  understanding prompt written as text answers as describe() does (greedy), prompts of two
  lengths in one call, and a count that does not match is named."""
  work, _ = trained
  model = InferenceModel.from_workdir(str(work))
  images, labels = mnist.load_mnist5k()
  digits = images[[int(np.flatnonzero(labels == c)[0]) for c in (0, 3, 7)]]
  question = "Which digit is this?"
  answers = model.describe(digits, question)
  prompts = [f"<image>\n{question}"] * 3 + ["Two: <image> and <image>\nthen"]
  parts = model.generate(prompts, images=[[d] for d in digits] + [digits[:2]], greedy=True, max_new_tokens=16)
  assert [(p[0][0], p[0][1].strip()) for p in parts[:3]] == [("text", a) for a in answers]
  assert len(parts) == 4  # the two-image prompt's parts: this model may end it at once (no part)
  # The image really is read where the prompt says: louder digits, on which the answers differ,
  # answer as generate_tokens does on the understanding prompts written out.
  loud = _loud(digits)
  parts = model.generate(prompts[:3], images=[[d] for d in loud], greedy=True, max_new_tokens=16)
  want = _explicit_answers(model, loud, question)
  assert [(p[0][0], p[0][1].strip()) for p in parts] == [("text", a) for a in want] and len(set(want)) > 1, want
  with pytest.raises(InferenceError, match="reads 1 <image> but was given 2 image"):
    model.generate([f"<image>\n{question}"], images=[digits[:2]])
  with pytest.raises(InferenceError, match="images must have shape"):
    model.generate([f"<image>\n{question}"], images=[[digits[0][:20]]])


@pytest.mark.slow
def test_the_clip_path_trains_and_answers(tmp_path, seed):
  """all_in_one,test reading digits through a frozen tiny random CLIP tower (a transformers
  folder, resized to its 30 px input) and im_embedder: the understand steps train im_embedder
  and the transformer on its features, and describe() runs the same encoder."""
  clip_dir = tmp_path / "clip"
  make_tiny_clip(clip_dir, seed)
  work = tmp_path / "run"
  run_module(
      "-m",
      "monoformer_jax.main",
      "--config=configs/mnist_tiny.py:all_in_one,test",
      f"--workdir={work}",
      "--config.input_images.encoder=clip",
      "--config.model.input_embedder=im_embedder",  # CLIP features go through im_embedder
      f"--config.input_images.clip_path={clip_dir}",
      THREE_UNDERSTAND_STEPS,
  )
  _loss_understand_fell(work)
  model = InferenceModel.from_workdir(str(work))
  assert model.config.input_feature_dim == 32  # the tiny tower's width
  # im_embedder (only the understand steps train it) moved: its biases start at zero.
  for layer in ("im_embedder_fc1", "im_embedder_fc2"):
    assert np.abs(model.params[layer]["bias"]).min() > 0, layer
  images, _ = mnist.load_mnist5k()
  answers = model.describe(images[:3])
  assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
