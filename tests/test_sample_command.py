"""`python -m monoformer_jax.sample` on the shared tiny run (tests/helpers.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax import sample
from tests.helpers import shared_tiny_run
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return subprocess_env()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  work = shared_tiny_run(tmp_path_factory)
  assert os.path.exists(work / "samples" / "step_6.png")  # end-of-training grid
  assert os.path.exists(work / "samples" / "step_6.txt")
  return work


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
def test_images_npz_png_and_batch_independence(run_dir, tmp_path):
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  for out, batch in ((a, 7), (b, 3)):
    proc = _sample(
        f"--workdir={run_dir}",
        "--classes=0,3,nine",
        "--num_per_class=3",
        f"--out={out}",
        f"--batch_size={batch}",
        "--num_steps=3",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
  za, zb = np.load(a), np.load(b)
  assert za["images"].shape == (9, 28, 28, 1) and za["images"].dtype == np.uint8
  np.testing.assert_array_equal(za["labels"], [0, 0, 0, 3, 3, 3, 9, 9, 9])
  # A sample depends on its index, not on how the batch was cut.
  np.testing.assert_array_equal(za["images"], zb["images"])
  assert za["images"].std() > 0
  assert os.path.exists(tmp_path / "a.png")


@pytest.mark.slow
def test_text_and_errors(run_dir, tmp_path, capsys):
  proc = _sample(f"--workdir={run_dir}", "--prompt=The class", "--max_new_tokens=5")
  assert proc.returncode == 0 and '"completion"' in proc.stdout, proc.stderr[-2000:]
  for args, message in (
      (["--prompt="], "empty prompt"),
      (["--classes=0,12", f"--out={tmp_path}/x.npz"], "class id 12 is out of range"),
      (["--classes=zebra", f"--out={tmp_path}/x.npz"], "unknown class 'zebra'"),
      (["--classes=1", "--guidance_scale=0.5", f"--out={tmp_path}/x.npz"], "must be >= 1"),
  ):
    # In-process: the command's main, exit status and stderr as the shell sees them.
    assert sample.main([f"--workdir={run_dir}", *args]) == 2, args
    assert message in capsys.readouterr().err, args
  assert sample.main([f"--workdir={tmp_path}/missing", "--prompt=x"]) == 2
  assert "no such run directory" in capsys.readouterr().err
