"""The torch-free checkpoint reader against files written by torch.save / safetensors."""

import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from monoformer_jax.convert import checkpoints, torch_checkpoint
from monoformer_jax.convert.monoformer_weights import params_to_state_dict
from monoformer_jax.convert.torch_checkpoint import (
    UnsafeCheckpointError,
    load_state_dict,
    load_torch_checkpoint,
    load_torch_state_dict,
)
from monoformer_jax.model.monoformer import MonoFormer
from tests.helpers import build, image_sample, text_sample, tiny_config
from tests.random_weights import random_params


def _np(t):
  """The exact NumPy value of a torch tensor (bfloat16 via its bit pattern)."""
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(got, want_tensor):
  want = _np(want_tensor)
  assert got.dtype == want.dtype, (got.dtype, want.dtype)
  assert got.shape == want.shape
  np.testing.assert_array_equal(
      got.view(np.uint8) if got.dtype == ml_dtypes.bfloat16 else got,
      want.view(np.uint8) if want.dtype == ml_dtypes.bfloat16 else want,
  )


def _random_tensors(gen):
  base = torch.randn(6, 7, generator=gen)
  return {
      "f32": torch.randn(3, 4, 5, generator=gen),
      "f16": torch.randn(8, generator=gen).half(),
      "bf16": torch.randn(2, 9, generator=gen).bfloat16(),
      "f64": torch.randn(3, generator=gen).double(),
      "i64": torch.randint(-(2**40), 2**40, (5,), generator=gen),
      "i32": torch.randint(-(2**30), 2**30, (2, 3), generator=gen, dtype=torch.int32),
      "i8": torch.randint(-128, 127, (7,), generator=gen, dtype=torch.int8),
      "u8": torch.randint(0, 255, (4, 4), generator=gen, dtype=torch.uint8),
      "bool": torch.rand(11, generator=gen) > 0.5,
      "scalar": torch.tensor(3.25),
      "empty": torch.zeros(0, 3),
      # Views sharing base's storage: transposed, sliced with an offset, strided.
      "base": base,
      "transposed": base.t(),
      "sliced": base[2:5, 1:6],
      "strided": base[::2, 1::3],
  }


def test_dtypes_and_views_roundtrip_exactly(tmp_path, seed):
  tensors = _random_tensors(torch.Generator().manual_seed(seed))
  path = tmp_path / "tensors.pt"
  torch.save(tensors, path)
  got = load_torch_state_dict(path)
  assert set(got) == set(tensors)
  for name, tensor in tensors.items():
    _assert_same(got[name], tensor)
  assert got["bf16"].dtype == ml_dtypes.bfloat16
  # Copies, not views into one shared buffer: writing one must not change another.
  got["transposed"][0, 0] += 1
  assert got["base"][0, 0] == tensors["base"][0, 0].item()


def test_module_state_dict_and_nesting(tmp_path, seed):
  torch.manual_seed(seed)
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(5, 2))
  state = module.state_dict()
  assert isinstance(state, collections.OrderedDict)
  torch.save(state, tmp_path / "plain.pth")
  torch.save({"state_dict": state, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "wrapped.pth")
  torch.save({"ema": state, "model": {"inner": state}, "step": 3}, tmp_path / "two.pth")
  torch.save([module[0].weight], tmp_path / "l.pt")
  for path in ("plain.pth", "wrapped.pth"):
    got = load_torch_state_dict(tmp_path / path)
    assert list(got) == list(state)
    for name, tensor in state.items():
      _assert_same(got[name], tensor)
  ema = load_torch_state_dict(tmp_path / "two.pth", key="ema")
  inner = load_torch_state_dict(tmp_path / "two.pth", key="model.inner")
  for name, tensor in state.items():
    _assert_same(ema[name], tensor)
    _assert_same(inner[name], tensor)
  with pytest.raises(KeyError, match="'nope'"):
    load_torch_state_dict(tmp_path / "two.pth", key="nope")
  raw = load_torch_checkpoint(tmp_path / "two.pth")
  assert raw["step"] == 3 and isinstance(raw["model"]["inner"]["0.weight"], np.ndarray)
  # A list holding an nn.Parameter comes back as the raw object.
  (weight,) = load_torch_checkpoint(tmp_path / "l.pt")
  _assert_same(weight, module[0].weight.detach())


def test_reading_needs_no_torch(tmp_path, seed):
  gen = torch.Generator().manual_seed(seed)
  tensors = {"w": torch.randn(3, 2, generator=gen), "v": torch.randn(4, 3, generator=gen).t()}
  torch.save(tensors, tmp_path / "w.pt")
  np.savez(tmp_path / "want.npz", **{k: v.contiguous().numpy() for k, v in tensors.items()})
  script = textwrap.dedent(f"""
      import sys, numpy as np
      sys.modules['torch'] = None  # any import of torch now fails
      from monoformer_jax.convert.torch_checkpoint import load_state_dict
      got = load_state_dict({str(tmp_path / 'w.pt')!r})
      want = np.load({str(tmp_path / 'want.npz')!r})
      for k in want.files:
        np.testing.assert_array_equal(got[k], want[k])
      print('ok')
  """)
  result = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=120,
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned > " + _Evil.marker,))


def _torch_like_zip(path, payload):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  _Evil.marker = str(marker)
  path = tmp_path / "evil.pt"
  _torch_like_zip(path, {"weight": _Evil()})
  # os.system pickles as posix.system (or nt.system); either way the name is in the error.
  with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global '(posix|nt|os)\.system'"):
    load_state_dict(path)
  assert not marker.exists()
  _torch_like_zip(tmp_path / "eval.pt", {"x": collections.Counter()})
  with pytest.raises(UnsafeCheckpointError, match="collections.Counter"):
    load_torch_state_dict(tmp_path / "eval.pt")


def test_corrupt_and_missing_files_are_named(tmp_path, seed):
  gen = torch.Generator().manual_seed(seed)
  torch.save({"w": torch.randn(64, 64, generator=gen)}, tmp_path / "good.pt")
  data = (tmp_path / "good.pt").read_bytes()
  (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"truncated\.pt: truncated or corrupt zip"):
    load_state_dict(tmp_path / "truncated.pt")
  with pytest.raises(FileNotFoundError, match="absent.pt"):
    load_state_dict(tmp_path / "absent.pt")
  # Missing storage record: rewrite the archive without data/0.
  with zipfile.ZipFile(tmp_path / "good.pt") as src, zipfile.ZipFile(tmp_path / "nostorage.pt", "w") as dst:
    for info in src.infolist():
      if not info.filename.endswith("data/0"):
        dst.writestr(info, src.read(info))
  with pytest.raises(ValueError, match=r"nostorage\.pt: missing storage record .*data/0"):
    load_state_dict(tmp_path / "nostorage.pt")
  torch.save({"w": torch.randn(64, generator=gen)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  data = (tmp_path / "legacy.pt").read_bytes()
  (tmp_path / "legacy_cut.pt").write_bytes(data[:-10])
  with pytest.raises(ValueError, match=r"legacy_cut\.pt: truncated; storage"):
    load_state_dict(tmp_path / "legacy_cut.pt")
  (tmp_path / "random.pt").write_bytes(np.random.default_rng(seed).bytes(100))
  with pytest.raises(ValueError, match=r"random\.pt: not a PyTorch checkpoint"):
    load_state_dict(tmp_path / "random.pt")


def test_legacy_format_roundtrips_exactly(tmp_path, seed):
  """Pre-1.6 torch.save (a pickle stream + raw storages): still how pytorch-fid ships weights."""
  tensors = _random_tensors(torch.Generator().manual_seed(seed))
  path = tmp_path / "legacy.pth"
  torch.save(tensors, path, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(path)
  got = load_torch_state_dict(path)
  assert set(got) == set(tensors)
  for name, tensor in tensors.items():
    _assert_same(got[name], tensor)
  _Evil.marker = str(tmp_path / "pwned")
  with open(tmp_path / "evil_legacy.pt", "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
      pickle.dump(header, f, protocol=2)
    pickle.dump({"w": _Evil()}, f, protocol=2)
  with pytest.raises(UnsafeCheckpointError, match="system"):
    load_state_dict(tmp_path / "evil_legacy.pt")
  assert not (tmp_path / "pwned").exists()


def test_sharded_safetensors_and_directories(tmp_path, rng):
  from safetensors.numpy import save_file

  shards = {
      "model-00001-of-00002.safetensors": {"a.weight": rng.normal(size=(3, 4)), "a.bias": rng.normal(size=(4,))},
      "model-00002-of-00002.safetensors": {
          "b.weight": rng.normal(size=(2, 2)).astype(np.float16),
          "b.count": rng.integers(0, 9, size=(5,)),
          "b.bf16": rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
      },
  }
  weight_map = {}
  for name, tensors in shards.items():
    save_file(tensors, str(tmp_path / name))
    weight_map.update({k: name for k in tensors})
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  want = {k: v for tensors in shards.values() for k, v in tensors.items()}
  for source in (index, tmp_path):
    got = load_state_dict(source)
    assert set(got) == set(want)
    for k, v in want.items():
      assert got[k].dtype == v.dtype
      np.testing.assert_array_equal(got[k], v)
  weight_map["c.weight"] = "model-00002-of-00002.safetensors"
  index.write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(ValueError, match="c.weight"):
    load_state_dict(index)
  weight_map["d"] = "model-00003-of-00003.safetensors"
  index.write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(FileNotFoundError, match="model-00003-of-00003"):
    load_state_dict(index)
  (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match="broken.safetensors"):
    load_state_dict(tmp_path / "broken.safetensors")


def test_bin_directory_and_bin_index(tmp_path, seed):
  gen = torch.Generator().manual_seed(seed)
  a, b = {"x": torch.randn(3, generator=gen)}, {"y": torch.randn(2, 2, generator=gen).bfloat16()}
  torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
  torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
  (tmp_path / "pytorch_model.bin.index.json").write_text(
      json.dumps({"weight_map": {"x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}})
  )
  got = load_state_dict(tmp_path)
  _assert_same(got["x"], a["x"])
  _assert_same(got["y"], b["y"])
  single = tmp_path / "single"
  single.mkdir()
  torch.save(a, single / "diffusion_pytorch_model.bin")
  _assert_same(load_state_dict(single)["x"], a["x"])
  assert torch_checkpoint.flatten_state_dict({"a": {"b": np.ones(1)}, "n": 3}).keys() == {"a.b"}


@pytest.mark.parametrize("t_embed", ["adaln_before_decoder", "add_before_image_tokens"])
def test_official_torch_bin_checkpoint_with_ema_folder_end_to_end(tmp_path, t_embed, rng, seed):
  """An official-layout checkpoint as torch.save'd pytorch_model.bin files: the raw weights beside
  config.json and the EMA weights in ema/ (as released); both load, EMA first, and run."""
  config = tiny_config(t_embed=t_embed, image_height=8, image_width=8, image_channels=4)
  raw, ema = random_params(config, seed=seed + 1), random_params(config, seed=seed + 2)
  ckpt = tmp_path / "MonoFormer"
  checkpoints.save_official(raw, config, str(ckpt))  # config.json in the official field names
  os.remove(ckpt / "model.safetensors")
  (ckpt / "ema").mkdir()
  for params, where in ((raw, ckpt), (ema, ckpt / "ema")):
    state = {k: torch.from_numpy(v.copy()) for k, v in params_to_state_dict(params, config).items()}
    torch.save(state, where / "pytorch_model.bin")
  loaded_config, loaded = checkpoints.load_official_checkpoint(str(ckpt))
  _, loaded_raw = checkpoints.load_official_checkpoint(str(ckpt), ema=False)
  assert loaded_config == config
  assert jax.tree.structure(loaded) == jax.tree.structure(ema)
  jax.tree.map(np.testing.assert_array_equal, loaded, ema)
  jax.tree.map(np.testing.assert_array_equal, loaded_raw, raw)
  batch = build(config, [[image_sample(config, rng, 4)], [text_sample(config, rng, 9)]], 32)
  t = jnp.asarray(np.array([[420.0], [0.0]], np.float32))

  forward = jax.jit(
      lambda p: MonoFormer(config).apply(
          {"params": p}, jax.tree.map(jnp.asarray, batch), jnp.asarray(batch["images"]), t
      )
  )
  got, want = forward(loaded), forward(ema)
  np.testing.assert_array_equal(got["logits"], want["logits"])
  np.testing.assert_array_equal(got["image"], want["image"])
  assert np.abs(np.asarray(forward(loaded_raw)["image"]) - np.asarray(want["image"])).max() > 1e-3
