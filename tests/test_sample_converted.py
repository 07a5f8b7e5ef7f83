"""`python -m monoformer_jax.sample` and `InferenceModel` on converted checkpoints: a tiny model
written by the project's own exporters (official MonoFormer layout, transformers LLaMA) with a
tiny SentencePiece tokenizer and a class-names file, loaded and sampled successfully."""

import json
import os
import random
import string
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax.convert.checkpoints import save_hf_llama, save_official
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.inference import InferenceModel
from monoformer_jax.run import images as ps
from tests.helpers import random_params, tiny_config
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = {"0": ["n000", "cat"], "1": ["n001", "dog"], "2": ["n002", "seven"]}  # ImageNet style
PROMPTS = ["hello there", "the cat and"]


def _sample(*args):
  return subprocess.run(
      [sys.executable, "-m", "monoformer_jax.sample", *args],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.fixture(scope="module")
def converted(tmp_path_factory, module_seed):
  """(dirs, config, params): one random tiny model saved both ways, its tokenizer, class names."""
  root = tmp_path_factory.mktemp("converted")
  rng = random.Random(module_seed("corpus and params"))
  words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(80)]
  corpus = [" ".join(rng.choices(words + ["the", "cat", "and", "hello"], k=12)) for _ in range(200)]
  tok = tok_lib.train_sentencepiece(corpus, 300, str(root / "tok"))
  # The official layout: square SD-VAE-style latents (image_size 32 = 8 x 4), no label embedding.
  config = tiny_config(vocab_size=tok.vocab_size, image_height=4, image_width=4, max_position_embeddings=256)
  params = random_params(config, seed=rng.randrange(1000), scale=0.5)
  save_official(params, config, str(root / "official"))
  save_hf_llama(params, config, str(root / "hf"))
  with open(root / "names.json", "w") as f:
    json.dump(CLASS_NAMES, f)
  with open(root / "prompts.txt", "w") as f:
    f.write(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")  # blank lines are skipped
  dirs = {k: str(root / k) for k in ("official", "hf", "names.json", "prompts.txt")}
  dirs["tokenizer"] = str(root / "tok" / "tokenizer.model")
  return dirs, config, params


def _completions(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r["prompt"] for r in rows] == PROMPTS
  return [r["completion"] for r in rows]


def _assert_same_params(got, want, prefix=""):
  for k, v in want.items():
    if isinstance(v, dict):
      _assert_same_params(got[k], v, f"{prefix}{k}/")
    else:
      np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=prefix + k)


@pytest.mark.slow
def test_official_checkpoint_cli_and_from_official(converted, tmp_path):
  dirs, config, params = converted
  out = tmp_path / "classes.npz"
  proc = _sample(
      f"--official_checkpoint={dirs['official']}",
      f"--tokenizer={dirs['tokenizer']}",
      f"--class_names_file={dirs['names.json']}",
      "--classes=0,dog",
      "--num_per_class=2",
      "--sampler=ddim",
      "--eta=0.5",
      "--num_steps=2",
      "--guidance_scale=2",
      f"--out={out}",
      f"--prompt_file={dirs['prompts.txt']}",
      "--greedy",
      "--max_new_tokens=4",
  )
  completions = _completions(proc)
  z = np.load(out)
  assert z["images"].shape == (4, 4, 4, 3) and z["images"].dtype == np.uint8
  np.testing.assert_array_equal(z["labels"], [0, 0, 1, 1])
  # The same model in-process: the exported weights come back exactly, and sample the same
  # (DDIM, eta 0.5: the default DDPM would draw other images, so the flags reached the sampler).
  model = InferenceModel.from_official(
      dirs["official"], tokenizer=dirs["tokenizer"], class_names=[n[-1] for n in CLASS_NAMES.values()]
  )
  assert (
      model.config.hidden_size,
      model.config.num_layers,
      model.config.vocab_size,
      model.config.image_height,
      model.config.t_embed,
  ) == (config.hidden_size, config.num_layers, config.vocab_size, 4, config.t_embed)
  _assert_same_params(model.params, params)
  images, labels = model.sample_classes(
      ["0", "dog"], 2, sampler="ddim", eta=0.5, num_steps=2, guidance_scale=2.0, seed=0
  )
  np.testing.assert_array_equal(labels, z["labels"])
  want = ps.to_uint8(model.decode(images)).astype(int)
  assert np.abs(want - z["images"]).max() <= 1 and want.std() > 0
  assert model.generate_text(PROMPTS, max_new_tokens=4, greedy=True) == completions


@pytest.mark.slow
def test_hf_checkpoint_cli_and_from_hf(converted):
  dirs, config, params = converted
  proc = _sample(
      f"--hf_checkpoint={dirs['hf']}",
      f"--tokenizer={dirs['tokenizer']}",
      f"--prompt_file={dirs['prompts.txt']}",
      "--greedy",
      "--max_new_tokens=4",
  )
  completions = _completions(proc)
  model = InferenceModel.from_hf(dirs["hf"], tokenizer=dirs["tokenizer"])
  text_part = {k: v for k, v in params.items() if k in ("embed_tokens", "norm", "lm_head") or k.startswith("layers_")}
  _assert_same_params(model.params, text_part)
  assert model.config.vocab_size == config.vocab_size
  # The LLaMA export holds the language model only: its text is the official export's text.
  official = InferenceModel.from_official(dirs["official"], tokenizer=dirs["tokenizer"])
  assert official.generate_text(PROMPTS, max_new_tokens=4, greedy=True) == completions
  assert any(c.strip() for c in completions)
