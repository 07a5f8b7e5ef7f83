"""extract_latents: an image folder / JSONL through a diffusers-format VAE into a TFDS dataset."""

import json
import os

import numpy as np
import pytest
import torch

from monoformer_jax.data import image_sources, pipeline, tfds_latents
from monoformer_jax.tools import extract_latents
from monoformer_jax.vae import convert, latents
from tests.helpers import write_tiny_diffusers_vae
from tests.helpers_env import subprocess_env

SIZE = 16  # the crop; files are larger and not square, so the centre crop really runs


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, module_seed):
  """A random 2-level diffusers AutoencoderKL written by diffusers itself (16x16 -> 8x8x4)."""
  path = tmp_path_factory.mktemp("vae")
  return str(path), write_tiny_diffusers_vae(path, module_seed("vae weights"), SIZE)


def _image_folder(root, rng, classes=3, per_class=5):
  """Smooth random colour images (upsampled 4x5 grids), 20x24 and 28x22, in class folders."""
  from PIL import Image

  for c in range(classes):
    os.makedirs(root / f"class_{c}")
    for i in range(per_class):
      cells = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
      size = (24, 20) if i % 2 else (22, 28)  # PIL (width, height)
      Image.fromarray(cells).resize(size, Image.BILINEAR).save(root / f"class_{c}" / f"{i}.png")
  return root


def _odd_jsonl(tmp_path):
  """One 15x9 image: odd sizes that a 2x-downsampling VAE cannot take without --image_size."""
  from PIL import Image

  Image.fromarray(np.zeros((9, 15, 3), np.uint8)).save(tmp_path / "odd.png")
  (tmp_path / "odd.jsonl").write_text(json.dumps({"image": "odd.png", "prompt": "p"}) + "\n")
  return tmp_path / "odd.jsonl"


def _extract(vae, *args):
  return extract_latents.main(["--vae", vae, "--no_progress", *map(str, args)])


def _read_back(out, split="train"):
  src = tfds_latents.latent_source(str(out), split)
  order = np.load(os.path.join(out, "source_index.npy"))
  recs = sorted((src[i] for i in range(len(src))), key=lambda r: int(r["index"]))
  return recs, order


def test_image_folder_round_trip(tmp_path, tiny_vae, rng):
  vae_dir, torch_model = tiny_vae
  root = _image_folder(tmp_path / "images", rng)
  out = tmp_path / "latents"
  # batch 5 over 8 devices: padded to 8; chunks of 4 records: the last one short.
  assert (
      _extract(
          vae_dir,
          "--source",
          "image_folder",
          "--input",
          root,
          "--out",
          out,
          "--image_size",
          SIZE,
          "--batch_size",
          5,
          "--chunk_size",
          4,
      )
      == 0
  )
  recs, order = _read_back(out)
  folder = image_sources.ImageFolderSource(str(root), image_size=SIZE)
  assert len(recs) == len(folder) == 15 and sorted(order) == list(range(15))
  assert not os.path.exists(out / extract_latents.PARTIAL)
  info = json.loads((out / "extraction.json").read_text())
  assert info["latent_shape"] == [8, 8, 4] and info["scaling_factor"] == pytest.approx(0.37)
  # {id: [folder, name]}: no synset mapping given, so the name is the folder's
  assert json.loads((out / "class_names.json").read_text()) == {str(c): [f"class_{c}"] * 2 for c in range(3)}

  images = np.stack([folder[int(j)]["image"] for j in order]).astype(np.float32) / 127.5 - 1
  assert [r["label"] for r in recs] == [folder[int(j)]["label"] for j in order]
  mean = np.stack([r["mean"] for r in recs])
  logvar = np.stack([r["logvar"] for r in recs])
  assert mean.dtype == np.float32 and mean.shape == (15, 8, 8, 4)

  # The stored moments are diffusers' own posterior of the centre-cropped images.
  with torch.no_grad():
    dist = torch_model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
  np.testing.assert_allclose(mean, dist.mean.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(logvar, dist.logvar.numpy().transpose(0, 2, 3, 1), atol=1e-4)

  # Decoding the dataset reconstructs the images exactly as well as the VAE does directly.
  config, params = convert.load_diffusers_vae(vae_dir)
  direct_mean, _ = latents.encode_moments(params, images, config=config)
  direct = np.asarray(latents.decode_latents(params, direct_mean, 1.0, config=config))
  via_dataset = np.asarray(latents.decode_latents(params, mean * 0.37, 0.37, config=config))
  err_direct = np.mean((direct - images) ** 2)
  err_dataset = np.mean((via_dataset - images) ** 2)
  np.testing.assert_allclose(err_dataset, err_direct, rtol=1e-4)
  np.testing.assert_allclose(via_dataset, direct, atol=1e-4)
  # ... and that comparison can fail: another image's latent decodes to something else.
  assert np.abs(via_dataset[::-1] - direct).max() > 1e-2
  # Train-time draws scatter around the stored mean with the stored spread.
  draw = pipeline.sample_latent(recs[0], rng, 0.37) / 0.37
  z = (draw - recs[0]["mean"]) / np.exp(0.5 * recs[0]["logvar"])
  assert 0.6 < z.std() < 1.5 and np.abs(draw - recs[0]["mean"]).max() > 0


def test_resume_skips_finished_chunks(tmp_path, tiny_vae, monkeypatch, rng, capsys):
  vae_dir, _ = tiny_vae
  root = _image_folder(tmp_path / "images", rng, classes=2, per_class=5)
  out = tmp_path / "latents"
  args = [
      "--source",
      "image_folder",
      "--input",
      root,
      "--out",
      out,
      "--image_size",
      SIZE,
      "--chunk_size",
      3,
      "--batch_size",
      8,
  ]
  real_save, saved = extract_latents.save_chunk, []

  def save_then_die(path, arrays):
    if len(saved) == 2:
      raise KeyboardInterrupt  # killed while encoding the third chunk
    real_save(path, arrays)
    saved.append(path)

  monkeypatch.setattr(extract_latents, "save_chunk", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    _extract(vae_dir, *args)
  partial = out / extract_latents.PARTIAL
  assert sorted(os.listdir(partial)) == ["chunk_00000.npz", "chunk_00001.npz", "manifest.json"]
  before = {p: os.stat(p).st_mtime_ns for p in saved}

  # A different chunking cannot reuse these chunks.
  monkeypatch.setattr(extract_latents, "save_chunk", real_save)
  assert _extract(vae_dir, *args[:-4], "--chunk_size", 4, "--batch_size", 8) == 2
  assert "different extraction" in capsys.readouterr().err

  real_encode, encoded = extract_latents.encode_chunk, []

  def counting_encode(source, start, stop, *rest):
    encoded.append(start)
    return real_encode(source, start, stop, *rest)

  monkeypatch.setattr(extract_latents, "encode_chunk", counting_encode)
  assert _extract(vae_dir, *args, "--keep_partial") == 0
  assert encoded == [6, 9]  # chunks 2 and 3 only
  assert {p: os.stat(p).st_mtime_ns for p in saved} == before

  # The resumed dataset equals one written in a single run.
  assert _extract(vae_dir, *args[:5], tmp_path / "clean", *args[6:]) == 0
  resumed, clean = _read_back(out)[0], _read_back(tmp_path / "clean")[0]
  assert len(resumed) == len(clean) == 10
  for a, b in zip(resumed, clean):
    np.testing.assert_array_equal(a["mean"], b["mean"])
    assert a["label"] == b["label"]


def test_image_text_jsonl_prompts(tmp_path, tiny_vae, rng):
  vae_dir, _ = tiny_vae
  root = _image_folder(tmp_path / "images", rng, classes=1, per_class=3)
  prompts = [f"a smooth blob número {rng.integers(1000)}" for _ in range(3)]
  lines = [json.dumps({"image": f"class_0/{i}.png", "prompt": p}) for i, p in enumerate(prompts)]
  (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "latents"
  assert (
      _extract(
          vae_dir,
          "--source",
          "image_text_jsonl",
          "--input",
          root / "pairs.jsonl",
          "--out",
          out,
          "--image_size",
          SIZE,
          "--split",
          "validation",
      )
      == 0
  )
  recs, order = _read_back(out, "validation")
  assert [r["prompt"] for r in recs] == [prompts[j] for j in order]
  assert "label" not in recs[0] and not (out / "class_names.json").exists()


def test_clear_errors(tmp_path, tiny_vae, capsys):
  vae_dir, _ = tiny_vae
  cases = [
      (["--vae", tmp_path / "nope", "--source", "mnist", "--out", tmp_path / "o"], "--vae"),
      (["--vae", vae_dir, "--source", "image_folder", "--out", tmp_path / "o"], "--input is required"),
      (
          ["--vae", vae_dir, "--source", "image_folder", "--input", tmp_path / "missing", "--out", tmp_path / "o"],
          "no such directory",
      ),
      (
          ["--vae", vae_dir, "--source", "image_text_jsonl", "--input", tmp_path / "x.jsonl", "--out", tmp_path / "o"],
          "no such file",
      ),
      (["--vae", vae_dir, "--source", "mnist", "--out", tmp_path / "o", "--image_size", "17"], "not a multiple"),
  ]
  for argv, message in cases:
    assert extract_latents.main(list(map(str, argv))) == 2
    assert message in capsys.readouterr().err, message
  assert (
      _extract(vae_dir, "--source", "image_text_jsonl", "--input", _odd_jsonl(tmp_path), "--out", tmp_path / "o2") == 2
  )
  assert "do not divide" in capsys.readouterr().err
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "a.png").write_bytes(b"")
  assert _extract(vae_dir, "--source", "image_folder", "--input", tmp_path / "flat", "--out", tmp_path / "o") == 2
  assert "unknown class folder layout" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_same_dataset(tmp_path, tiny_vae, rng):
  """Chunks dealt over 2 jax.distributed processes (1 CPU device each), assembled by process 0."""
  import socket
  import subprocess
  import sys

  vae_dir, _ = tiny_vae
  root = _image_folder(tmp_path / "images", rng, classes=2, per_class=4)
  args = ["--source", "image_folder", "--input", root, "--image_size", SIZE, "--chunk_size", 3, "--no_progress"]
  assert _extract(vae_dir, *args, "--out", tmp_path / "single") == 0
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = []
  for i in range(2):
    env = subprocess_env(
        MONOFORMER_DISTRIBUTED=1,
        MONOFORMER_COORDINATOR=f"127.0.0.1:{port}",
        MONOFORMER_NUM_PROCESSES=2,
        MONOFORMER_PROCESS_ID=i,
    )
    cmd = [
        sys.executable,
        "-m",
        "monoformer_jax.tools.extract_latents",
        "--vae",
        vae_dir,
        *map(str, args),
        "--out",
        str(tmp_path / "multi"),
        "--keep_partial",
    ]
    procs.append(subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
  assert "process 1 of 2" in logs[1]
  # 8 records in chunks of 3: process 0 encoded chunks 0 and 2, process 1 chunk 1.
  assert sorted(os.listdir(tmp_path / "multi" / extract_latents.PARTIAL))[:3] == [
      "chunk_00000.npz",
      "chunk_00001.npz",
      "chunk_00002.npz",
  ]
  single, multi = _read_back(tmp_path / "single")[0], _read_back(tmp_path / "multi")[0]
  assert len(single) == len(multi) == 8
  for a, b in zip(single, multi):
    np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-5)
    np.testing.assert_allclose(a["logvar"], b["logvar"], atol=1e-5)
    assert a["label"] == b["label"]
