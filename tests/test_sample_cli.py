"""`python -m monoformer_jax.sample` beyond class grids: text-to-image (flags and a prompt file,
DDIM), text+image in one call, greedy text from a prompt file, and the errors (another model
shape, empty prompts, guidance < 1)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax import sample
from monoformer_jax.inference import InferenceModel
from monoformer_jax.run import images as ps
from tests.helpers import shared_tiny_run
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return subprocess_env()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return shared_tiny_run(tmp_path_factory)


def _sample(*args):
  return subprocess.run(
      [sys.executable, "-m", "monoformer_jax.sample", *args],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.mark.slow
def test_t2i_interleaved_and_text(run_dir, tmp_path, capsys):
  (tmp_path / "t2i.txt").write_text("a one\n\n")
  proc = _sample(
      f"--workdir={run_dir}",
      "--t2i_prompt=a seven",
      f"--t2i_prompt_file={tmp_path}/t2i.txt",
      f"--out={tmp_path}/t2i.npz",
      "--sampler=ddim",
      "--num_steps=4",
      "--guidance_scale=2",
      "--clip_denoised",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  z = np.load(tmp_path / "t2i.npz")
  assert z["images"].shape == (2, 28, 28, 1) and list(z["prompts"]) == ["a seven", "a one"]
  assert (tmp_path / "t2i.png").exists()
  # The same DDIM samples, x0 clamped, in-process (the flags reach the sampler); unclamped, the
  # first step's x0 estimate of an untrained model is far outside [-1, 1] and the images differ.
  model = InferenceModel.from_workdir(str(run_dir))
  options = dict(sampler="ddim", num_steps=4, guidance_scale=2.0)
  clamped = model.text_to_image(["a seven", "a one"], clip_denoised=True, **options)
  want = ps.to_uint8(model.decode(clamped))
  assert np.abs(want.astype(int) - z["images"]).max() <= 1 and want.std() > 0
  assert np.abs(clamped).max() <= 1.0 + 1e-6
  unclamped = ps.to_uint8(model.decode(model.text_to_image(["a seven", "a one"], **options)))
  assert np.abs(unclamped.astype(int) - z["images"]).max() > 1
  # The command's main in-process from here on (the first call above ran it as a command).
  capsys.readouterr()
  code = sample.main(
      [
          f"--workdir={run_dir}",
          "--interleaved",
          f"--out={tmp_path}/il",
          "--prompt=Please generate an image of seven.<|im_start|>",
          "--prompt=The",
          "--max_new_tokens=4",
          "--num_steps=2",
          "--greedy",
      ]
  )
  out = capsys.readouterr()
  assert code == 0, out.err[-2000:]
  rows = [json.loads(line) for line in out.out.splitlines()]
  assert rows[0]["parts"][0] == {"image": f"{tmp_path}/il_p0_0.png"}
  assert os.path.exists(f"{tmp_path}/il_p0_0.png")
  # Greedy text from a flag and from a prompt file, with different seeds: the same line.
  (tmp_path / "prompts.txt").write_text("The class\n")
  greedy = []
  for seed, prompt in enumerate(["--prompt=The class", f"--prompt_file={tmp_path}/prompts.txt"]):
    assert sample.main([f"--workdir={run_dir}", prompt, "--greedy", "--max_new_tokens=5", f"--seed={seed}"]) == 0
    greedy.append(capsys.readouterr().out)
  assert greedy[0] == greedy[1] and '"completion"' in greedy[0]
  assert json.loads(greedy[0])["completion"] == model.generate_text(["The class"], greedy=True, max_new_tokens=5)[0]


@pytest.mark.slow
def test_errors(run_dir, tmp_path, capsys):
  other = tmp_path / "other"
  shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("eval"))  # eval writes there
  with open(other / "config.json") as f:
    cfg = json.load(f)
  cfg["model"]["hidden_size"] *= 2
  with open(other / "config.json", "w") as f:
    json.dump(cfg, f)
  for args, message in (
      ([f"--workdir={other}", "--prompt=x"], "holds a model of another shape than the config"),
      ([f"--workdir={run_dir}", "--t2i_prompt= ", f"--out={tmp_path}/x.npz"], "empty prompt"),
      ([f"--workdir={run_dir}", "--prompt=x", "--interleaved"], "--out"),
      ([f"--workdir={run_dir}", "--classes=3", "--guidance_scale=0.9", f"--out={tmp_path}/x.npz"], "must be >= 1"),
      ([f"--workdir={run_dir}", "--classes=3", f"--out={tmp_path}/x.jpg"], ".npz or .png"),
      ([f"--workdir={run_dir}", f"--official_checkpoint={tmp_path}", "--prompt=x"], "exactly one of"),
  ):
    assert sample.main(args) == 2, args  # in-process: exit status and stderr as the shell sees them
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, (args, err[-1500:])
