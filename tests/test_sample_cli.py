"""`python -m monoformer_jax.sample` beyond class grids: text-to-image, text+image in one call,
greedy text, and the errors (another model shape, empty prompts, guidance < 1)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def tiny_run(tmp_path_factory):
  """A 6-step mnist_tiny:test run, trained once per test session (shared with the notebook)."""
  work = tmp_path_factory.getbasetemp() / "shared_tiny_run"
  if not (work / "config.json").exists() or not (work / "checkpoints").exists():
    shutil.rmtree(work, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "monoformer_jax.main",
                           "--config=configs/mnist_tiny.py:test", f"--workdir={work}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  return work


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


def _sample(*args):
  return subprocess.run([sys.executable, "-m", "monoformer_jax.sample", *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_t2i_interleaved_and_text(run_dir, tmp_path):
  proc = _sample(f"--workdir={run_dir}", "--t2i_prompt=a seven", "--t2i_prompt=a one",
                 f"--out={tmp_path}/t2i.npz", "--num_steps=2", "--guidance_scale=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  z = np.load(tmp_path / "t2i.npz")
  assert z["images"].shape == (2, 28, 28, 1) and list(z["prompts"]) == ["a seven", "a one"]
  assert (tmp_path / "t2i.png").exists()
  proc = _sample(f"--workdir={run_dir}", "--interleaved", f"--out={tmp_path}/il",
                 "--prompt=Please generate an image of seven.<|im_start|>", "--prompt=The",
                 "--max_new_tokens=4", "--num_steps=2", "--greedy")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert rows[0]["parts"][0] == {"image": f"{tmp_path}/il_p0_0.png"}
  assert os.path.exists(f"{tmp_path}/il_p0_0.png")
  greedy = [_sample(f"--workdir={run_dir}", "--prompt=The class", "--greedy", "--max_new_tokens=5",
                    f"--seed={s}").stdout for s in (0, 1)]
  assert greedy[0] == greedy[1] and '"completion"' in greedy[0]


@pytest.mark.slow
def test_errors(run_dir, tmp_path):
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  with open(other / "config.json") as f:
    cfg = json.load(f)
  cfg["model"]["hidden_size"] *= 2
  with open(other / "config.json", "w") as f:
    json.dump(cfg, f)
  for args, message in (
      ([f"--workdir={other}", "--prompt=x"], "another model shape"),
      ([f"--workdir={run_dir}", "--t2i_prompt= ", f"--out={tmp_path}/x.npz"], "empty prompt"),
      ([f"--workdir={run_dir}", "--prompt=x", "--interleaved"], "--out"),
      ([f"--workdir={run_dir}", "--classes=3", "--guidance_scale=0.9", f"--out={tmp_path}/x.npz"],
       "must be >= 1"),
      ([f"--workdir={run_dir}", "--classes=3", f"--out={tmp_path}/x.jpg"], ".npz or .png"),
      ([f"--workdir={run_dir}", f"--official_checkpoint={tmp_path}", "--prompt=x"],
       "exactly one of"),
  ):
    proc = _sample(*args)
    assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-1500:])
