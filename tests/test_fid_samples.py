"""FID samples depend only on the sample index: 1 device == 8 devices, resumable, complete chunks."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from monoformer_jax.data import mnist
from monoformer_jax.evaluation import digit_classifier, fid_samples, image_suites
from tests.helpers import shared_digit_classifier
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  work = tmp_path_factory.mktemp("fidrun") / "tiny"
  env = subprocess_env()
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.main",
          "--config=configs/mnist_tiny.py:test",
          f"--workdir={work}",
          "--config.schedule.ar=0",
          "--config.sampling.num_steps=3",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work


def test_labels_are_uniform_and_index_keyed():
  a = fid_samples.sample_labels(0, np.arange(4000), 10)
  counts = np.bincount(a, minlength=10)
  assert counts.min() > 330 and counts.max() < 470
  np.testing.assert_array_equal(fid_samples.sample_labels(0, np.arange(100, 140), 10), a[100:140])


def _write_chunks(out_dir, num_samples, chunk, rng):
  """A sample directory as `generate` leaves it, with random images."""
  os.makedirs(out_dir)
  images = rng.integers(0, 256, (num_samples, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, num_samples)
  for start in range(0, num_samples, chunk):
    part = slice(start, start + chunk)
    np.savez(
        out_dir / f"samples_{start:09d}.npz",
        images=images[part],
        labels=labels[part],
        indices=np.arange(num_samples)[part],
    )
  (out_dir / "manifest.json").write_text(json.dumps({"num_samples": num_samples, "chunk": chunk}))
  return images, labels


def test_load_samples_checks_that_every_chunk_is_there(tmp_path, rng):
  images, labels = _write_chunks(tmp_path / "ok", 23, 5, rng)
  got_images, got_labels = fid_samples.load_samples(str(tmp_path / "ok"))
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  # What `evaluate` reads for --config.eval.samples=DIR (the mnist and fid suites).
  eval_images, eval_labels = image_suites.load_images(str(tmp_path / "ok"))
  np.testing.assert_array_equal(eval_images, images)
  np.testing.assert_array_equal(eval_labels, labels)
  # A chunk missing (a host that died, or scoring before every host finished): named, with its range.
  _write_chunks(tmp_path / "missing", 23, 5, rng)
  os.remove(tmp_path / "missing" / "samples_000000010.npz")
  with pytest.raises(ValueError, match=r"1 missing chunk\(s\): samples_000000010.npz " r"\(samples 10..14\)"):
    fid_samples.load_samples(str(tmp_path / "missing"))
  # The last chunk of a shorter earlier run: present, but short of the samples asked for.
  with pytest.raises(ValueError, match=r"samples_000000020.npz holds samples 20..22 \(3 images\), " r"expected 20..24"):
    fid_samples.load_samples(str(tmp_path / "ok"), num_samples=25)
  # A chunk whose indices overlap another's (written with another chunk size).
  z = dict(np.load(tmp_path / "ok" / "samples_000000005.npz"))
  np.savez(tmp_path / "ok" / "samples_000000005.npz", **{**z, "indices": z["indices"] - 1})
  with pytest.raises(ValueError, match=r"samples_000000005.npz holds samples 4..8"):
    fid_samples.load_samples(str(tmp_path / "ok"))
  os.remove(tmp_path / "missing" / "manifest.json")
  with pytest.raises(ValueError, match=r"no manifest.json \(found 4 samples_\*.npz\)"):
    fid_samples.load_samples(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no such sample directory"):
    fid_samples.load_samples(str(tmp_path / "absent"))


@pytest.mark.slow
def test_fid_is_the_same_on_one_and_eight_devices(run_dir, tmp_path, tmp_path_factory, capsys):
  one, eight = tmp_path / "one", tmp_path / "eight"
  fid_samples.generate(str(run_dir), str(one), 24, chunk=16, devices=jax.devices()[:1])
  # Interrupted run: the first chunk exists, the second is short (an earlier, smaller num_samples);
  # on resume the first is kept and the second made again in full.
  fid_samples.generate(str(run_dir), str(eight), 20, chunk=16, devices=jax.devices()[:8])
  first = os.path.getmtime(eight / "samples_000000000.npz")
  fid_samples.generate(str(run_dir), str(eight), 24, chunk=16, devices=jax.devices()[:8])
  assert os.path.getmtime(eight / "samples_000000000.npz") == first
  with pytest.raises(ValueError, match=r"other settings \(seed: 0 on disk, 1 now\)"):
    fid_samples.generate(str(run_dir), str(eight), 24, chunk=16, seed=1)
  img1, lab1 = fid_samples.load_samples(str(one))
  img8, lab8 = fid_samples.load_samples(str(eight))
  assert img1.shape == (24, 28, 28, 1) and img1.std() > 10  # not blank
  np.testing.assert_array_equal(lab1, lab8)
  diff = np.abs(img1.astype(int) - img8.astype(int))
  print(f"1 vs 8 devices: {np.count_nonzero(diff)} of {diff.size} pixels differ, max {diff.max()}")
  np.testing.assert_array_equal(img1, img8)
  # The weights sharded over each process's devices (a model one device cannot hold): the same
  # digits, to float32 rounding of the sharded sums (at most one grey level).
  sharded = tmp_path / "sharded"
  fid_samples.generate(str(run_dir), str(sharded), 24, chunk=16, devices=jax.devices()[:4], mesh="fsdp=2,tensor=2")
  imgs, labs = fid_samples.load_samples(str(sharded))
  np.testing.assert_array_equal(labs, lab1)
  assert np.abs(imgs.astype(int) - img1.astype(int)).max() <= 1
  # The digit FID against real held-out MNIST digits (the classifier never trained on them).
  images, _ = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(images))
  cache = shared_digit_classifier(tmp_path_factory)
  classifier = digit_classifier.load_or_train(cache)
  f1 = digit_classifier.digit_fid(img1, images[held], classifier)
  f8 = digit_classifier.digit_fid(img8, images[held], classifier)
  real = digit_classifier.digit_fid(images[held][:24], images[held], classifier)
  assert f1 > real and abs(f1 - f8) <= 1e-6 * abs(f1), (f1, f8, real)
  # The command on the finished directory: nothing is generated again, the digits are scored.
  written = {name: os.path.getmtime(one / name) for name in os.listdir(one)}
  capsys.readouterr()
  assert (
      fid_samples.main(
          [
              f"--workdir={run_dir}",
              f"--out_dir={one}",
              "--num_samples=24",
              "--chunk=16",
              "--score_mnist",
              f"--classifier_cache={cache}",
          ]
      )
      == 0
  )
  report = json.loads(capsys.readouterr().out)
  assert {n: os.path.getmtime(one / n) for n in written if n != "manifest.json"} == {
      n: t for n, t in written.items() if n != "manifest.json"
  }
  assert report["mnist"]["num_samples"] == 24
  assert report["mnist"]["digit_fid"] == pytest.approx(
      digit_classifier.digit_fid(img1, images, classifier), rel=1e-9
  )  # against all of MNIST-5k
