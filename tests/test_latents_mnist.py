"""The latent path on the embedded MNIST: train the small VAE, extract latents, train on them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import mnist_vae
from monoformer_jax.data import sources, tfds_latents
from monoformer_jax.tools import extract_latents
from monoformer_jax.vae import convert, latents, train_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
  """The `test` variant of configs/mnist_vae.py (a few seconds of training), fresh seed."""
  config = mnist_vae.get_config("test")
  config.seed = int(np.random.default_rng().integers(1 << 16))
  workdir = tmp_path_factory.mktemp("mnist_vae")
  metrics = train_vae.train_and_evaluate(config, str(workdir))
  return workdir, metrics


def _digits(split):
  src = sources.MnistSource(split)
  return np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32) / 127.5 - 1


@pytest.mark.slow
def test_mnist_vae_beats_mean_image_and_saves_diffusers_folder(trained_vae):
  workdir, metrics = trained_vae
  assert metrics["heldout"]["mse"] < 0.7 * metrics["heldout_mean_image_baseline"]["mse"]
  assert metrics["latent_shape"] == [7, 7, 4]
  with open(workdir / "vae_metrics.json") as f:
    assert json.load(f) == metrics
  config, params = convert.load_diffusers_vae(str(workdir / "vae"))
  assert config.scaling_factor == pytest.approx(metrics["scaling_factor"])
  # scaling_factor makes the sampled latents of other digits about unit-variance.
  images = _digits("holdout")[:256]
  mean, logvar = latents.encode_moments(params, images, config=config)
  z = latents.sample_latents(mean, logvar, __import__("jax").random.key(0), config.scaling_factor)
  assert 0.8 < float(np.std(z)) < 1.25
  # diffusers reads the same folder and computes the same function.
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  ours = np.asarray(latents.decode_latents(params, mean, 1.0, config=config))
  model = diffusers.AutoencoderKL.from_pretrained(str(workdir / "vae"))
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    theirs_mean = model.encode(x).latent_dist.mean
    theirs = model.decode(theirs_mean).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(mean), theirs_mean.numpy().transpose(0, 2, 3, 1),
                             atol=1e-4)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_mnist_extraction_round_trip_reconstructs(trained_vae, tmp_path):
  workdir, metrics = trained_vae
  out = tmp_path / "latents"
  assert extract_latents.main(["--vae", str(workdir / "vae"), "--source", "mnist", "--split",
                               "holdout", "--out", str(out), "--no_progress"]) == 0
  src = tfds_latents.latent_source(str(out), "holdout")
  order = np.load(out / "source_index.npy")
  recs = sorted((src[i] for i in range(len(src))), key=lambda r: int(r["index"]))
  images = _digits("holdout")[order]
  assert [r["label"] for r in recs] == [sources.MnistSource("holdout")[int(j)]["label"]
                                        for j in order]
  config, params = convert.load_diffusers_vae(str(workdir / "vae"))
  scale = config.scaling_factor
  mean = np.stack([r["mean"] for r in recs])
  decoded = np.asarray(latents.decode_latents(params, mean * scale, scale, config=config))
  error = train_vae.reconstruction_metrics(images, decoded)
  print(f"MNIST test VAE, held-out digits through the dataset: {error}")
  # The same error as the VAE's own held-out reconstruction, and far better than the mean image.
  assert error["mse"] == pytest.approx(metrics["heldout"]["mse"], rel=1e-3)
  assert error["mse"] < 0.7 * metrics["heldout_mean_image_baseline"]["mse"]
  # A latent drawn as the training pipeline draws it also decodes near its digit.
  rng = np.random.default_rng()
  drawn = np.stack([tfds_latents.sample_latent(r, rng, scale) for r in recs[:64]])
  decoded = np.asarray(latents.decode_latents(params, drawn, scale, config=config))
  assert train_vae.reconstruction_metrics(images[:64], decoded)["mse"] < 0.7 * (
      metrics["heldout_mean_image_baseline"]["mse"])


@pytest.mark.slow
def test_latent_default_trains_end_to_end(trained_vae, tmp_path):
  workdir, metrics = trained_vae
  data_dir = tmp_path / "latents"
  assert extract_latents.main(["--vae", str(workdir / "vae"), "--source", "mnist",
                               "--out", str(data_dir), "--no_progress"]) == 0
  run = tmp_path / "run"
  scale = metrics["scaling_factor"]
  cmd = [sys.executable, "-m", "monoformer_jax.main", "--config=configs/mnist_tiny.py:latent_test",
         f"--workdir={run}", f"--config.data.image_path={data_dir}",
         f"--config.vae.path={workdir / 'vae'}", f"--config.vae.scale={scale}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  with open(run / "config.json") as f:
    resolved = json.load(f)
  # vae.scale and data.latent_scale are one reference: the override set both.
  assert resolved["data"]["latent_scale"] == pytest.approx(scale)
  assert resolved["vae"] == {"path": str(workdir / "vae"), "scale": pytest.approx(scale)}
  assert (resolved["model"]["image_height"], resolved["model"]["image_channels"]) == (7, 4)
  with open(run / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows and rows[-1]["step"] == 6
  assert all(np.isfinite(r["loss"]) for r in rows)
  # The end-of-training samples went through the VAE: 28x28 grey digits (a row per class), not
  # 7x7x4 latents.
  from PIL import Image
  with Image.open(run / "samples" / "step_6.png") as grid:
    assert (grid.size, grid.mode) == ((28, 280), "L")
