"""Our Flax FID Inception against pytorch-fid's, built with random weights (nothing is downloaded).

pytorch-fid's model gets a complete random state dict instead of its download (tests/helpers.py:
He-scaled convolutions and near-identity batch norm, so the pooled features depend on the input). The
same state dict, written with `torch.save`, is what our converter reads.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from monoformer_jax.evaluation import inception, inception_convert
from tests.helpers import pytorch_fid_outputs, random_fid_state_dict, random_images

# Two images of a non-299, non-square size: exercises the resize (down in one axis, up in the other).
IMAGE_SHAPE = (2, 320, 211, 3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, module_seed):
  """pytorch-fid's outputs with random weights, and the weights as a .pth."""
  state = random_fid_state_dict(seed=module_seed("weights"))
  path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
  torch.save(state, path)
  images = random_images(np.random.default_rng(module_seed("images")), IMAGE_SHAPE)
  return {
      "state": {k: v.numpy() for k, v in state.items()},
      "path": path,
      "images": images,
      **pytorch_fid_outputs(state, images),
  }


@pytest.fixture(scope="module")
def ours(reference):
  variables = inception_convert.convert_state_dict(reference["state"])
  return inception.InceptionFeatures(variables, batch_size=len(reference["images"]))(reference["images"])


def test_resize_matrix_matches_torch_interpolate(rng):
  for in_size, out_size in ((7, 19), (320, 299), (211, 299), (299, 299), (1, 5), (600, 299)):
    signal = rng.normal(size=(in_size,)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(signal)[None, None, :, None], size=(out_size, 1), mode="bilinear", align_corners=False
    )[0, 0, :, 0].numpy()
    got = inception.bilinear_resize_matrix(in_size, out_size) @ signal
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{in_size}->{out_size}")


def test_pool_features_match_pytorch_fid(reference, ours):
  want, got = reference["pool"], ours["pool"]
  assert got.shape == want.shape == (IMAGE_SHAPE[0], inception.POOL_DIM)
  # Guard against a degenerate reference: the two images' features must differ by far more than the
  # tolerance, or features that ignore the image content could pass.
  assert np.abs(want[0] - want[1]).max() > 100 * 1e-4
  # Absolute 1e-4 on features of order 1 (max |ref| printed on failure).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"max |ref| = {np.abs(want).max():.3f}")


def test_logits_match_pytorch_fid(reference, ours):
  want, got = reference["logits"], ours["logits"]
  assert got.shape == want.shape == (IMAGE_SHAPE[0], inception.NUM_CLASSES)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_float_images_in_unit_range_match_uint8(reference, ours):
  variables = inception_convert.convert_state_dict(reference["state"])
  as_float = reference["images"].astype(np.float32) / 255.0
  got = inception.InceptionFeatures(variables)(as_float)
  np.testing.assert_allclose(got["pool"], ours["pool"], rtol=0, atol=1e-5)


def test_converter_reports_missing_unexpected_and_misshapen_keys(reference):
  state = dict(reference["state"])
  del state["Mixed_6b.branch7x7_2.conv.weight"]
  state["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  state["fc.bias"] = np.zeros((1000,), np.float32)
  with pytest.raises(inception_convert.ConversionError) as info:
    inception_convert.convert_state_dict(state)
  message = str(info.value)
  assert "1 missing key(s): Mixed_6b.branch7x7_2.conv.weight" in message
  assert "1 unexpected key(s): AuxLogits.fc.weight" in message
  assert "fc.bias: checkpoint (1000,), model expects (1008,)" in message


def test_converter_layout(reference):
  variables = inception_convert.convert_state_dict(reference["state"])
  state = reference["state"]
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  assert kernel.shape == (1, 7, 128, 128)  # (kh, kw, in, out) of a 1x7 convolution
  np.testing.assert_array_equal(kernel[0, 3, 5, 9], state["Mixed_6b.branch7x7_2.conv.weight"][9, 5, 0, 3])
  np.testing.assert_array_equal(
      variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"], state["Conv2d_1a_3x3.bn.running_var"]
  )
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)
  n_state = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
  assert sum(x.size for x in jax.tree_util.tree_leaves(variables)) == n_state


def _write_images(path, images, **extra):
  np.savez(path, arr_0=images, **extra)
  return str(path)


def test_tool_end_to_end(reference, tmp_path):
  """The command-line tool on the .pth written by torch.save, in a fresh process."""
  images = _write_images(tmp_path / "images.npz", reference["images"])
  out = tmp_path / "features.npz"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.tools.inception_features",
          "--weights",
          str(reference["path"]),
          "--images",
          images,
          "--out",
          str(out),
          "--batch-size",
          "1",
      ],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr
  with np.load(out) as features:
    assert features["pool"].dtype == np.float32
    np.testing.assert_allclose(features["pool"], reference["pool"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        features["logits"], reference["logits"], rtol=0, atol=1e-4 * max(1.0, np.abs(reference["logits"]).max())
    )


def test_tool_names_the_problem(reference, tmp_path, capsys):
  from monoformer_jax.tools import inception_features

  good = _write_images(tmp_path / "good.npz", reference["images"])
  cases = [
      (["--weights", str(tmp_path / "nope.pth"), "--images", good], "--weights: no such file"),
      (["--weights", str(reference["path"]), "--images", str(tmp_path / "nope.npz")], "--images: no such file"),
      (
          [
              "--weights",
              str(reference["path"]),
              "--images",
              _write_images(tmp_path / "f.npz", reference["images"].astype(np.float32)),
          ],
          "must be uint8",
      ),
      (
          [
              "--weights",
              str(reference["path"]),
              "--images",
              _write_images(tmp_path / "g.npz", reference["images"][..., 0]),
          ],
          "must have shape (N, H, W, 3)",
      ),
      (
          [
              "--weights",
              str(reference["path"]),
              "--images",
              _write_images(tmp_path / "k.npz", reference["images"]),
              "--key",
              "x",
          ],
          "has no array 'x'",
      ),
  ]
  for argv, message in cases:
    assert inception_features.main(argv + ["--out", str(tmp_path / "out.npz")]) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_fid_inception_from_pth(reference, tmp_path, zip_format):
  """Both torch.save formats: the released pt_inception-2015-12-05 file dates from 2019 (torch 1.x),
  before the zip format became the default, so the reader must handle the legacy format too."""
  path = tmp_path / "weights.pth"
  torch.save(
      {k: torch.from_numpy(v) for k, v in reference["state"].items()}, path, _use_new_zipfile_serialization=zip_format
  )
  loaded = inception_convert.load_fid_inception(str(path))
  direct = inception_convert.convert_state_dict(reference["state"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, direct)
