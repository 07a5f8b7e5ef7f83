"""FID samples depend only on the sample index: 1 device == 8 devices, resumable chunks."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from monoformer_jax.evaluation import digit_classifier, fid_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  work = tmp_path_factory.mktemp("fidrun") / "tiny"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "monoformer_jax.main",
                         "--config=configs/mnist_tiny.py:test", f"--workdir={work}",
                         "--config.schedule.ar=0", "--config.sampling.num_steps=3"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work


def test_labels_are_uniform_and_index_keyed():
  a = fid_samples.sample_labels(0, np.arange(4000), 10)
  counts = np.bincount(a, minlength=10)
  assert counts.min() > 330 and counts.max() < 470
  np.testing.assert_array_equal(fid_samples.sample_labels(0, np.arange(100, 140), 10), a[100:140])


@pytest.mark.slow
def test_fid_is_the_same_on_one_and_eight_devices(run_dir, tmp_path):
  one, eight = tmp_path / "one", tmp_path / "eight"
  fid_samples.generate(str(run_dir), str(one), 24, chunk=16, devices=jax.devices()[:1])
  # Interrupted run: the first chunk exists, only the second is produced on resume.
  fid_samples.generate(str(run_dir), str(eight), 16, chunk=16, devices=jax.devices()[:8])
  first = os.path.getmtime(eight / "samples_000000000.npz")
  fid_samples.generate(str(run_dir), str(eight), 24, chunk=16, devices=jax.devices()[:8])
  assert os.path.getmtime(eight / "samples_000000000.npz") == first
  img1, lab1 = fid_samples.load_samples(str(one))
  img8, lab8 = fid_samples.load_samples(str(eight))
  assert img1.shape == (24, 28, 28, 1)
  np.testing.assert_array_equal(lab1, lab8)
  assert np.abs(img1.astype(int) - img8.astype(int)).max() <= 1  # uint8 rounding at most
  clf = digit_classifier.load_or_train()
  rng = np.random.default_rng(0)
  ref = (rng.random((64, 28, 28, 1)) * 255).astype(np.uint8)
  f1, f8 = digit_classifier.digit_fid(img1, ref, clf), digit_classifier.digit_fid(img8, ref, clf)
  assert f1 > 0 and abs(f1 - f8) <= 1e-6 * abs(f1), (f1, f8)
