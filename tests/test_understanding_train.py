"""The embedded default's all_in_one variant end to end: one parameter tree trained on digits
from prompts, prose, and reading digits (`understand` steps), then answers about held-out
digits from the sample command (`--describe`) and the API, through the KV cache."""

import json

import numpy as np
import pytest

from monoformer_jax.data import mnist
from monoformer_jax.inference import InferenceError, InferenceModel
from tests.helpers import run_module, shared_all_in_one_run
from tests.test_clip_vision import make_tiny_clip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(the session's all_in_one,test run, its training's stdout)."""
  work = shared_all_in_one_run(tmp_path_factory)
  return work, work.parent.joinpath("shared_all_in_one_run.stdout").read_text()


@pytest.mark.slow
def test_understand_steps_train_beside_the_others(trained):
  work, stdout = trained
  assert "compiled and ran the first understand step" in stdout
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  kinds = {k for r in rows for k in r if k.startswith("steps_")}
  assert kinds == {"steps_diffusion", "steps_ar", "steps_understand"}
  understood = [r for r in rows if "loss_understand" in r]
  assert understood and all(np.isfinite(r["loss_understand"]) and r["answer_tokens"] > 0 for r in understood)


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
  assert len(parts) == 4 and parts[3]
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
  )
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert any(np.isfinite(r.get("loss_understand", np.nan)) for r in rows)
  model = InferenceModel.from_workdir(str(work))
  assert model.config.input_feature_dim == 32  # the tiny tower's width
  images, _ = mnist.load_mnist5k()
  answers = model.describe(images[:3])
  assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
