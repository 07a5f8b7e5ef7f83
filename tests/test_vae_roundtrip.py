"""python -m monoformer_jax.tools.vae_roundtrip against diffusers on a tiny saved AutoencoderKL."""

import re
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax.tools import vae_roundtrip
from tests.test_vae import BF16_ATOL, assert_close, make_tiny_vae, random_images, torch_reference


@pytest.fixture(scope="module")
def saved(tmp_path_factory, module_seed):
  folder = tmp_path_factory.mktemp("roundtrip")
  model = make_tiny_vae(folder / "vae", seed=module_seed("vae weights"))
  images = random_images(module_seed("images"), (5, 8, 16, 3))  # 5 images, batch 2: a padded last batch
  np.savez(folder / "images.npz", images=images)
  return dict(folder=folder, model=model, images=images)


def test_tool_matches_diffusers(saved):
  out = saved["folder"] / "out.npz"
  assert (
      vae_roundtrip.main(
          [
              "--vae",
              str(saved["folder"] / "vae"),
              "--images",
              str(saved["folder"] / "images.npz"),
              "--out",
              str(out),
              "--batch-size",
              "2",
          ]
      )
      == 0
  )
  mean, logvar, decoded = torch_reference(saved["model"], saved["images"])
  with np.load(out) as got:
    assert {k: got[k].dtype for k in got.files} == {k: np.float32 for k in ("mean", "logvar", "decoded")}
    assert_close(got["mean"], mean)
    assert_close(got["logvar"], logvar)
    assert_close(got["decoded"], decoded)


def test_tool_in_a_fresh_process(saved, tmp_path):
  """The documented command line, as a user runs it (bf16 compute: close to fp32)."""
  out = tmp_path / "out.npz"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.tools.vae_roundtrip",
          "--vae",
          str(saved["folder"] / "vae"),
          "--images",
          str(saved["folder"] / "images.npz"),
          "--out",
          str(out),
          "--dtype",
          "bfloat16",
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr
  mean, _, _ = torch_reference(saved["model"], saved["images"])
  with np.load(out) as got:
    assert_close(got["mean"], mean, atol=BF16_ATOL)


def _noise(shape, low=-1.0, high=1.0):
  return np.random.default_rng(0).uniform(low, high, shape).astype(np.float32)


@pytest.mark.parametrize(
    "make_images, message",
    [
        (None, "--vae: no such directory"),
        (lambda: (_noise((2, 8, 8, 3), 0, 255)).astype(np.uint8), "floating-point images"),
        (lambda: _noise((2, 8, 8, 3), 0.5, 1.5), r"must lie in \[-1, 1\]"),
        (lambda: _noise((8, 8, 3)), r"shape \(N, H, W, C\)"),
        (lambda: _noise((2, 8, 8, 1)), r"does not fit this VAE: want \(N, H, W, 3\)"),
        (lambda: _noise((2, 6, 8, 3)), "multiples of 4"),
    ],
)
def test_tool_names_the_problem(saved, tmp_path, capsys, make_images, message):
  vae_dir = str(saved["folder"] / "vae")
  if make_images is None:
    vae_dir, images = str(tmp_path / "absent"), saved["images"]
  else:
    images = make_images()
  np.savez(tmp_path / "in.npz", images=images)
  assert (
      vae_roundtrip.main(["--vae", vae_dir, "--images", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz")])
      == 2
  )
  assert re.search(message, capsys.readouterr().err)
