"""Our Flax FID Inception against pytorch-fid's, built with random weights (nothing is downloaded).

pytorch-fid's `fid_inception_v3()` fetches its weights with `load_state_dict_from_url`; we replace that
function by one returning a complete random state dict: He-scaled convolutions and near-identity batch
norm, so activations keep their scale through the 90-odd layers and the pooled features depend on the
input (PLATFORM.md). The same state dict, written with `torch.save`, is what our converter reads.
"""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")

import jax  # noqa: E402

from monoformer_jax.evaluation import inception, inception_convert  # noqa: E402

# Two images of a non-299, non-square size: exercises the resize (down in one axis, up in the other).
IMAGE_SHAPE = (2, 320, 211, 3)


def random_fid_state_dict(seed: int) -> dict:
  """A complete, signal-preserving random state dict for pytorch-fid's FID Inception."""
  skeleton = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  gen = torch.Generator().manual_seed(seed)
  normal = lambda shape: torch.randn(shape, generator=gen)
  state = {}
  for name, value in skeleton.state_dict().items():
    if name.endswith("conv.weight"):
      state[name] = normal(value.shape) * (2.0 / value[0].numel()) ** 0.5
    elif name.endswith("bn.weight"):
      state[name] = 1.0 + 0.1 * normal(value.shape)
    elif name.endswith(("bn.bias", "bn.running_mean")):
      state[name] = 0.1 * normal(value.shape)
    elif name.endswith("bn.running_var"):
      state[name] = 1.0 + 0.2 * torch.rand(value.shape, generator=gen)
    elif name == "fc.weight":
      state[name] = normal(value.shape) / value.shape[1] ** 0.5
    elif name == "fc.bias":
      state[name] = 0.1 * normal(value.shape)
    else:  # num_batches_tracked
      state[name] = value.clone()
  return state


def random_images(rng, shape):
  """uint8 images with per-image structure: coarse random colour blocks plus pixel noise.

  Pure i.i.d. noise images all have the same texture statistics, so their pooled features nearly
  coincide; blocks of different colours make the images (and their features) clearly different.
  """
  n, height, width, _ = shape
  coarse = rng.uniform(0, 255, (n, 6, 5, 3))
  blocks = coarse[:, np.arange(height) * 6 // height][:, :, np.arange(width) * 5 // width]
  noisy = blocks + rng.normal(0, 20, shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's models with random weights, the weights as a .pth, and their outputs."""
  state = random_fid_state_dict(seed=int(np.random.default_rng().integers(1 << 30)))
  original = pytorch_fid_inception.load_state_dict_from_url
  pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
  try:
    wrapper = pytorch_fid_inception.InceptionV3([3]).eval()  # resize + [-1, 1] + blocks, as in FID
    full = pytorch_fid_inception.fid_inception_v3().eval()  # for the 1008-way classifier
  finally:
    pytorch_fid_inception.load_state_dict_from_url = original
  path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
  torch.save(state, path)
  images = random_images(np.random.default_rng(), IMAGE_SHAPE)
  with torch.no_grad():
    # pytorch-fid feeds NCHW floats in [0, 1] (ToTensor of uint8 images).
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    pool = wrapper(x)[0].flatten(1)
    logits = full.fc(pool)
  return {"state": {k: v.numpy() for k, v in state.items()}, "path": path, "images": images,
          "pool": pool.numpy(), "logits": logits.numpy()}


@pytest.fixture(scope="module")
def ours(reference):
  variables = inception_convert.convert_state_dict(reference["state"])
  return inception.InceptionFeatures(variables, batch_size=len(reference["images"]))(
      reference["images"])


def test_resize_matrix_matches_torch_interpolate():
  rng = np.random.default_rng()
  for in_size, out_size in ((7, 19), (320, 299), (211, 299), (299, 299), (1, 5), (600, 299)):
    signal = rng.normal(size=(in_size,)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(signal)[None, None, :, None], size=(out_size, 1), mode="bilinear",
        align_corners=False)[0, 0, :, 0].numpy()
    got = inception.bilinear_resize_matrix(in_size, out_size) @ signal
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{in_size}->{out_size}")


def test_pool_features_match_pytorch_fid(reference, ours):
  want, got = reference["pool"], ours["pool"]
  assert got.shape == want.shape == (IMAGE_SHAPE[0], inception.POOL_DIM)
  # Guard against a degenerate reference: the two images' features must differ by far more than the
  # tolerance, or features that ignore the image content could pass.
  assert np.abs(want[0] - want[1]).max() > 100 * 1e-4
  # Absolute 1e-4 on features of order 1 (max |ref| printed on failure).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4,
                             err_msg=f"max |ref| = {np.abs(want).max():.3f}")


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
  np.testing.assert_array_equal(kernel[0, 3, 5, 9],
                                state["Mixed_6b.branch7x7_2.conv.weight"][9, 5, 0, 3])
  np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                state["Conv2d_1a_3x3.bn.running_var"])
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
      [sys.executable, "-m", "monoformer_jax.tools.inception_features", "--weights",
       str(reference["path"]), "--images", images, "--out", str(out), "--batch-size", "1"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  with np.load(out) as features:
    assert features["pool"].dtype == np.float32
    np.testing.assert_allclose(features["pool"], reference["pool"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(features["logits"], reference["logits"], rtol=0,
                               atol=1e-4 * max(1.0, np.abs(reference["logits"]).max()))


def test_tool_names_the_problem(reference, tmp_path, capsys):
  from monoformer_jax.tools import inception_features
  good = _write_images(tmp_path / "good.npz", reference["images"])
  cases = [
      (["--weights", str(tmp_path / "nope.pth"), "--images", good], "--weights: no such file"),
      (["--weights", str(reference["path"]), "--images", str(tmp_path / "nope.npz")],
       "--images: no such file"),
      (["--weights", str(reference["path"]),
        "--images", _write_images(tmp_path / "f.npz", reference["images"].astype(np.float32))],
       "must be uint8"),
      (["--weights", str(reference["path"]),
        "--images", _write_images(tmp_path / "g.npz", reference["images"][..., 0])],
       "must have shape (N, H, W, 3)"),
      (["--weights", str(reference["path"]),
        "--images", _write_images(tmp_path / "k.npz", reference["images"]), "--key", "x"],
       "has no array 'x'"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit) as info:
      inception_features.main(argv + ["--out", str(tmp_path / "out.npz")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_fid_inception_from_pth(reference, tmp_path, zip_format):
  """Both torch.save formats: the released pt_inception-2015-12-05 file dates from 2019 (torch 1.x),
  before the zip format became the default, so the reader must handle the legacy format too."""
  path = tmp_path / "weights.pth"
  torch.save({k: torch.from_numpy(v) for k, v in reference["state"].items()}, path,
             _use_new_zipfile_serialization=zip_format)
  loaded = inception_convert.load_fid_inception(str(path))
  direct = inception_convert.convert_state_dict(reference["state"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, direct)
