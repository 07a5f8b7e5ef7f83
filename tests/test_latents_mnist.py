"""The latent path on the embedded MNIST: train the small VAE, extract latents, train on them."""

import json
import os
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch

from configs import mnist_vae
from monoformer_jax.data import pipeline, sources, tfds_latents
from monoformer_jax.tools import extract_latents
from monoformer_jax.vae import convert, latents, train_vae
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, module_seed):
  """The `test` VAE of configs/mnist_vae.py, trained by its trainer with a fresh seed.

  Trained for 200 steps of batch 8 at lr 6e-3 instead of the variant's 60 of 16 (2.3x its
  training time, ~25 s more on 2 idle cores): held-out MSE measured at 0.13-0.18 x the mean-image
  baseline over 4 seeds, against 0.33-0.44 after 60 steps (0.21-0.30 after 100 steps of 16), so
  that reconstructions are close to their digits rather than blurs of them.
  """
  config = mnist_vae.get_config("test")
  config.seed = module_seed("config.seed") % (1 << 16)
  config.update(dict(num_train_steps=200, batch_size=8, log_every_steps=50))
  config.optimizer.learning_rate = 6e-3
  workdir = tmp_path_factory.mktemp("mnist_vae")
  metrics = train_vae.train_and_evaluate(config, str(workdir))
  return workdir, metrics


def _digits(split):
  src = sources.MnistSource(split)
  return np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32) / 127.5 - 1


@pytest.mark.slow
def test_mnist_vae_beats_mean_image_and_saves_diffusers_folder(trained_vae):
  workdir, metrics = trained_vae
  assert metrics["heldout"]["mse"] < 0.3 * metrics["heldout_mean_image_baseline"]["mse"], metrics
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
  ours = np.asarray(latents.decode_latents(params, mean, 1.0, config=config))
  model = diffusers.AutoencoderKL.from_pretrained(str(workdir / "vae"))
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    theirs_mean = model.encode(x).latent_dist.mean
    theirs = model.decode(theirs_mean).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(mean), theirs_mean.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_mnist_extraction_round_trip_reconstructs(trained_vae, tmp_path, rng):
  workdir, metrics = trained_vae
  out = tmp_path / "latents"
  assert (
      extract_latents.main(
          ["--vae", str(workdir / "vae"), "--source", "mnist", "--split", "holdout", "--out", str(out), "--no_progress"]
      )
      == 0
  )
  src = tfds_latents.latent_source(str(out), "holdout")
  order = np.load(out / "source_index.npy")
  recs = sorted((src[i] for i in range(len(src))), key=lambda r: int(r["index"]))
  images = _digits("holdout")[order]
  assert [r["label"] for r in recs] == [sources.MnistSource("holdout")[int(j)]["label"] for j in order]
  config, params = convert.load_diffusers_vae(str(workdir / "vae"))
  scale = config.scaling_factor
  mean = np.stack([r["mean"] for r in recs])
  decoded = np.asarray(latents.decode_latents(params, mean * scale, scale, config=config))
  error = train_vae.reconstruction_metrics(images, decoded)
  print(f"MNIST test VAE, held-out digits through the dataset: {error}")
  # The same error as the VAE's own held-out reconstruction, and far better than the mean image.
  assert error["mse"] == pytest.approx(metrics["heldout"]["mse"], rel=1e-3)
  baseline = metrics["heldout_mean_image_baseline"]["mse"]
  assert error["mse"] < 0.3 * baseline, (error, baseline)
  # A latent drawn as the training pipeline draws it also decodes near its digit.
  drawn = np.stack([pipeline.sample_latent(r, rng, scale) for r in recs[:64]])
  decoded = np.asarray(latents.decode_latents(params, drawn, scale, config=config))
  drawn_error = train_vae.reconstruction_metrics(images[:64], decoded)["mse"]
  print(
      f"... decoded from latents drawn from the stored posterior: MSE {drawn_error:.4f} "
      f"({drawn_error / baseline:.3f} x the mean-image baseline)"
  )
  assert drawn_error < 0.3 * baseline, (drawn_error, baseline)


def _write_digit_folder(root, rng, per_class=4):
  """Held-out MNIST digits (never trained on) as 28x28 grey PNGs, one folder per class.

  Returns the digits in the folder source's order (sorted class folders, sorted file names).
  """
  from PIL import Image

  src = sources.MnistSource("holdout")
  by_class = {}
  for i in rng.permutation(len(src)):
    record = src[int(i)]
    by_class.setdefault(int(record["label"]), [])
    if len(by_class[record["label"]]) < per_class:
      by_class[record["label"]].append(record["image"][..., 0])
  digits = []
  for label in sorted(by_class):
    os.makedirs(root / f"digit_{label}")
    for j, image in enumerate(by_class[label]):
      Image.fromarray(image).save(root / f"digit_{label}" / f"{j}.png")
      digits.append(image)
  return np.stack(digits)[..., None].astype(np.float32) / 127.5 - 1, sorted(by_class)


@pytest.mark.slow
def test_image_folder_extraction_reconstructs_real_digits(trained_vae, tmp_path, rng):
  """A folder of digit PNGs -> the extraction command -> the dataset's means decode near them."""
  workdir, metrics = trained_vae
  digits, classes = _write_digit_folder(tmp_path / "digits", rng)
  assert len(classes) == 10 and len(digits) == 40
  out = tmp_path / "latents"
  env = subprocess_env()
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.tools.extract_latents",
          "--vae",
          str(workdir / "vae"),
          "--source",
          "image_folder",
          "--input",
          str(tmp_path / "digits"),
          "--image_size",
          "28",
          "--out",
          str(out),
          "--no_progress",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  src = tfds_latents.latent_source(str(out), "train")
  order = np.load(out / "source_index.npy")
  recs = sorted((src[i] for i in range(len(src))), key=lambda r: int(r["index"]))
  assert sorted(order) == list(range(40))
  assert [r["label"] for r in recs] == [int(j) // 4 for j in order]  # 4 digits per class folder
  assert json.loads((out / "class_names.json").read_text()) == {
      str(i): [f"digit_{c}"] * 2 for i, c in enumerate(classes)
  }
  originals = digits[order]

  config, params = convert.load_diffusers_vae(str(workdir / "vae"))
  scale = config.scaling_factor
  mean = np.stack([r["mean"] for r in recs])
  assert mean.shape == (40, 7, 7, 4)
  decoded = np.asarray(latents.decode_latents(params, mean * scale, scale, config=config))
  error = train_vae.reconstruction_metrics(originals, decoded)["mse"]
  # Baselines: the best constant picture for these digits (their own mean image), and the right
  # decodes paired with the wrong digits (what a mix-up of records would score).
  own_mean = np.broadcast_to(originals.mean(axis=0, keepdims=True), originals.shape)
  baseline = train_vae.reconstruction_metrics(originals, own_mean)["mse"]
  shuffled = train_vae.reconstruction_metrics(originals, np.roll(decoded, 4, axis=0))["mse"]
  report = (
      f"image-folder round trip, 40 held-out digits through the trained MNIST VAE: "
      f"reconstruction MSE {error:.4f} = {error / baseline:.3f} x the mean-image baseline "
      f"{baseline:.4f} (decodes paired with other digits: {shuffled:.4f}; the VAE's own "
      f"held-out MSE {metrics['heldout']['mse']:.4f})"
  )
  print(report)
  assert error < 0.3 * baseline, report
  assert shuffled > baseline, report


@pytest.mark.slow
def test_latent_default_trains_end_to_end(trained_vae, tmp_path):
  workdir, metrics = trained_vae
  data_dir = tmp_path / "latents"
  assert (
      extract_latents.main(
          ["--vae", str(workdir / "vae"), "--source", "mnist", "--out", str(data_dir), "--no_progress"]
      )
      == 0
  )
  run = tmp_path / "run"
  scale = metrics["scaling_factor"]
  cmd = [
      sys.executable,
      "-m",
      "monoformer_jax.main",
      "--config=configs/mnist_tiny.py:latent,test",
      f"--workdir={run}",
      f"--config.data.image_path={data_dir}",
      f"--config.vae.path={workdir / 'vae'}",
  ]
  env = subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  with open(run / "config.json") as f:
    resolved = json.load(f)
  # vae.scale 0 took the VAE's scaling_factor when the run started, and data.latent_scale, one
  # reference with it, took it too.
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
