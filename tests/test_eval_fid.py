"""The `fid` suite of `python -m monoformer_jax.evaluate`: FID and Inception Score against pytorch-fid.

The Inception is a random, signal-preserving one (tests/helpers.py) written as a pytorch-fid .pth, so
nothing is downloaded. The expected numbers come from pytorch-fid's own model on the same images, with
the Fréchet distance and the Inception Score re-derived here (the library's Fréchet distance is
checked against pytorch-fid's in tests/test_fid.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.special
import torch

from monoformer_jax import evaluate
from monoformer_jax.evaluation import eval_config, fid, image_suites
from tests.helpers import (pytorch_fid_outputs, random_fid_state_dict, random_images, tensorboard_scalars)
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subprocess_env()
N = 6  # samples and reference images: one batch, so the Inception compiles once


def eval_fields(**fields):
  config = eval_config.get_config()
  config.lock()
  config.eval.update(fields)
  return config


def low_rank_frechet_distance(features, mu2, sigma2):
  """FID of few samples (N <= D) without a D x D matrix square root.

  With A = (features - mean) / sqrt(N - 1), sigma1 = A^T A, and sigma1 sigma2 = A^T (A sigma2) has
  the nonzero eigenvalues of (A sigma2) A^T = A sigma2 A^T, an N x N PSD matrix; the trace of the
  root is the sum of their square roots.
  """
  x = np.asarray(features, np.float64)
  mu1 = x.mean(0)
  a = (x - mu1) / np.sqrt(len(x) - 1)
  eigenvalues = np.linalg.eigvalsh(a @ sigma2 @ a.T)
  trace_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.sum(a * a) + np.trace(sigma2) - 2 * trace_root)


def hand_inception_score(logits, splits):
  p = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  for part in np.split(p, splits):
    kl = np.sum(part * (np.log(part) - np.log(part.mean(axis=0))), axis=1)
    scores.append(np.exp(kl.mean()))
  return np.mean(scores), np.std(scores)


def test_fid_suite_end_to_end_matches_pytorch_fid(tmp_path, rng):
  state = random_fid_state_dict(seed=int(rng.integers(1 << 30)))
  # Grayscale samples (as the digits of the embedded default are), run through pytorch-fid in one
  # batch with the reference images; the reference is an ADM-style .npz of mu / sigma.
  samples = random_images(rng, (N, 48, 40, 3))[..., :1]
  reference = random_images(rng, (N, 48, 40, 3))
  torch_out = pytorch_fid_outputs(state, np.concatenate([np.repeat(samples, 3, axis=-1), reference]))
  pool, real = torch_out["pool"][:N], torch_out["pool"][N:]
  mu_ref, sigma_ref = real.mean(0), np.cov(real, rowvar=False)
  # Random pool features differ little between images, so a He-scaled classifier layer gives
  # nearly equal class probabilities (IS ~ 1). Rescale it so the samples' logits vary by ~2 across
  # images, and centre them (bias), so the Inception Score is clearly above 1.
  centred = pool.astype(np.float64) - pool.mean(0)
  weight = state["fc.weight"].double().numpy()
  weight = weight * (2.0 / (centred @ weight.T).std())
  state["fc.weight"] = torch.from_numpy(weight).float()
  state["fc.bias"] = torch.from_numpy(-weight @ pool.mean(0).astype(np.float64)).float()
  torch.save(state, tmp_path / "pt_inception_random.pth")
  logits = pool.astype(np.float64) @ state["fc.weight"].double().numpy().T + state["fc.bias"].double().numpy()
  np.savez(tmp_path / "reference.npz", mu=mu_ref, sigma=sigma_ref)
  np.savez(tmp_path / "samples.npz", images=samples)
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.evaluate",
          f"--workdir={workdir}",
          "--config.eval.suite=fid",
          f"--config.eval.samples={tmp_path / 'samples.npz'}",
          f"--config.eval.inception_weights={tmp_path / 'pt_inception_random.pth'}",
          f"--config.eval.reference={tmp_path / 'reference.npz'}",
          f"--config.eval.inception_batch_size={N}",
          "--config.eval.is_splits=2",
      ],
      cwd=ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "eval" / "report.json") as f:
    report = json.load(f)

  want_fid = low_rank_frechet_distance(pool, mu_ref, sigma_ref)
  want_is, want_is_std = hand_inception_score(logits, splits=2)
  got = report["fid"]
  assert "mnist" not in report and report["step"] == 0 and got["num_samples"] == N
  assert report["config"]["reference"] == str(tmp_path / "reference.npz")
  # Features agree to ~1e-5 (tests/test_inception.py); FID and IS inherit about that relatively.
  assert want_fid > 0.1 and abs(got["fid"] - want_fid) <= 1e-4 * want_fid, (got["fid"], want_fid)
  assert want_is > 1.2, want_is  # random weights: far from the trivial 1 (measured 1.46-1.9)
  assert got["inception_score"] == pytest.approx(want_is, rel=1e-3)
  assert got["inception_score_std"] == pytest.approx(want_is_std, rel=1e-2, abs=1e-3)
  scalars = tensorboard_scalars(workdir / "eval" / "tensorboard")
  assert scalars["eval/fid/fid"] == (0, pytest.approx(got["fid"], rel=1e-6))
  assert scalars["eval/fid/inception_score"] == (0, pytest.approx(got["inception_score"], rel=1e-6))


def colour_features(images):
  """A cheap stand-in for the Inception ({'pool', 'logits'} like InceptionFeatures)."""
  x = np.asarray(images, np.float64) / 255.0
  pool = np.concatenate([x.mean(axis=(1, 2)), (x**2).mean(axis=(1, 2, 3))[:, None]], axis=1)
  return {"pool": pool, "logits": np.concatenate([pool, -pool], axis=1) * 5}


def test_references_from_folder_adm_images_and_adm_statistics_agree(tmp_path, rng):
  from PIL import Image

  reference = random_images(rng, (12, 9, 7, 3))
  samples = random_images(rng, (10, 9, 7, 3)) // 2  # darker: a clear distance to the reference
  (tmp_path / "folder").mkdir()
  for i, image in enumerate(reference):
    Image.fromarray(image).save(tmp_path / "folder" / f"{i:03d}.png")
  np.savez(tmp_path / "adm_images.npz", arr_0=reference)
  mu, sigma = fid.statistics_from_images(reference, colour_features)
  np.savez(tmp_path / "adm_stats.npz", mu=mu, sigma=sigma)
  want = fid.fid_from_features(colour_features(samples)["pool"], colour_features(reference)["pool"])
  results = [
      image_suites.inception_metrics(samples, colour_features, str(tmp_path / name), batch_size=4, splits=5)
      for name in ("folder", "adm_images.npz", "adm_stats.npz")
  ]
  assert want > 0.01
  for got in results:
    assert got["fid"] == pytest.approx(want, rel=1e-9)
    assert got["inception_score"] == pytest.approx(
        hand_inception_score(colour_features(samples)["logits"], 5)[0], rel=1e-9
    )
  assert [r.get("num_reference") for r in results] == [12, 12, None]  # stored statistics: unknown


def test_fid_suite_errors_name_the_problem(tmp_path, rng):
  samples = random_images(rng, (6, 9, 7, 3))
  np.savez(tmp_path / "samples.npz", images=samples)
  np.savez(tmp_path / "stats.npz", mu=np.ones(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match="suite 'fid' needs config.eval.reference"):
    evaluate.run_evaluation(
        str(tmp_path), eval_fields(samples=str(tmp_path / "samples.npz"), inception_weights=str(tmp_path / "w.pth"))
    )
  with pytest.raises(FileNotFoundError, match="no such Inception weights file .*nope.pth"):
    evaluate.run_evaluation(
        str(tmp_path),
        eval_fields(
            samples=str(tmp_path / "samples.npz"),
            inception_weights=str(tmp_path / "nope.pth"),
            reference=str(tmp_path / "stats.npz"),
        ),
    )
  # Statistics of another feature space (here 2048-d against the stand-in's 4-d features).
  with pytest.raises(ValueError, match=r"stats.npz: statistics of shape \(2048,\)"):
    image_suites.inception_metrics(samples, colour_features, str(tmp_path / "stats.npz"), splits=2)
  with pytest.raises(FileNotFoundError, match="no such reference file or folder .*absent"):
    image_suites.inception_metrics(samples, colour_features, str(tmp_path / "absent"), splits=2)
  np.savez(tmp_path / "other.npz", x=samples)
  with pytest.raises(ValueError, match="other.npz: no 'mu'/'sigma' and no 'arr_0'"):
    image_suites.inception_metrics(samples, colour_features, str(tmp_path / "other.npz"), splits=2)
  with pytest.raises(ValueError, match=r"at least max\(2, is_splits=10\) samples, got 6"):
    image_suites.inception_metrics(samples, colour_features, str(tmp_path / "stats.npz"))
  assert not (tmp_path / "eval").exists()  # nothing written when a suite fails
