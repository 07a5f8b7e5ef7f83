"""Fréchet distance, Inception Score and statistics (no Inception network needed here)."""

import numpy as np
import pytest
from pytorch_fid import fid_score

from monoformer_jax.evaluation import fid


def random_statistics(rng, n, dim, shift=0.0):
  # Correlated features: a random linear map of Gaussian noise.
  features = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + shift
  return features.mean(axis=0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("n,dim", [(400, 64), (20, 48)])  # full rank; singular (n < dim)
def test_frechet_distance_matches_pytorch_fid(n, dim, rng):
  mu1, sigma1 = random_statistics(rng, n, dim)
  mu2, sigma2 = random_statistics(rng, n, dim, shift=rng.normal(size=dim) * 0.3)
  want = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert want > 1.0
  assert abs(got - want) <= 1e-6 * abs(want), (got, want)


def test_frechet_distance_eps_fallback_and_complex_root_match_pytorch_fid(monkeypatch, rng):
  """Forces the rare paths: a non-finite first root (eps retry) and a complex root."""
  import scipy.linalg

  real_sqrtm = scipy.linalg.sqrtm
  mu1, sigma1 = random_statistics(rng, 30, 12)
  mu2, sigma2 = random_statistics(rng, 30, 12, shift=0.5)

  def flaky_sqrtm(matrix, *args, **kwargs):
    result = real_sqrtm(matrix)
    if isinstance(result, tuple):  # pytorch-fid asks for (root, error estimate)
      result = result[0]
    calls.append(matrix)
    if len(calls) == 1:
      result = np.full_like(result, np.nan)
    else:  # a negligible imaginary part, as scipy returns for nearly singular products
      result = result + 1e-9j
    return (result, 0.0) if kwargs.get("disp") is False else result

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
  calls = []
  want = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-2)
  assert len(calls) == 2
  calls = []
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-2)
  assert len(calls) == 2  # the eps retry happened
  np.testing.assert_allclose(calls[1], (sigma1 + 1e-2 * np.eye(12)) @ (sigma2 + 1e-2 * np.eye(12)))
  assert abs(got - want) <= 1e-6 * abs(want), (got, want)
  # A root with a large imaginary diagonal is an error, as in the standard code.
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: real_sqrtm(m) + 1j * np.eye(12))
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(mu1, sigma1, mu2, sigma2)


def test_frechet_distance_closed_form_for_diagonal_covariances(rng):
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  var1, var2 = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 5)
  # Commuting covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(v1) - sqrt(v2))^2.
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert abs(fid.frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1))) < 1e-10


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="differ in shape"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="do not fit"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_inception_score_hand_checked(rng):
  # Split 1: four images, each certain of a different class: p(y) uniform over 4 -> IS = 4.
  # Split 2: four images all certain of class 0: p(y|x) = p(y) -> IS = 1.
  classes = np.array([0, 1, 2, 3, 0, 0, 0, 0])
  probs = np.eye(6)[classes]
  mean, std = fid.inception_score(probs=probs, splits=2)
  np.testing.assert_allclose([mean, std], [2.5, 1.5], rtol=1e-12)
  # From logits: peaked logits give nearly one-hot probabilities; a fresh random class assignment.
  classes = rng.permutation(1008)[:10]
  logits = rng.normal(size=(10, 1008)) + 60.0 * np.eye(1008)[classes]
  mean, std = fid.inception_score(logits=logits, splits=1)
  np.testing.assert_allclose([mean, std], [10.0, 0.0], rtol=1e-6, atol=1e-9)


def test_inception_score_from_logits_equals_from_softmax(rng):
  logits = rng.normal(size=(12, 30)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  kl = [np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1) for p in np.split(probs, 3)]
  scores = [np.exp(k.mean()) for k in kl]
  got = fid.inception_score(logits=logits, splits=3)
  np.testing.assert_allclose(got, [np.mean(scores), np.std(scores)], rtol=1e-10)
  with pytest.raises(ValueError, match="splits"):
    fid.inception_score(logits=logits, splits=13)


def test_running_statistics_match_numpy_with_large_offset(rng):
  # A large common offset is where the naive sum-of-outer-products formula loses digits.
  features = rng.normal(size=(103, 16)) * 0.5 + 1e4
  stats = fid.RunningStatistics()
  for part in np.split(features, [1, 30, 30, 77]):  # uneven sizes, one empty, one single row
    stats.update(part)
  assert stats.count == 103
  np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-14)
  np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match="dimension"):
    stats.update(np.zeros((2, 3)))


def colour_features(images):
  """A cheap stand-in for the Inception: per-image channel means and a brightness moment."""
  x = np.asarray(images, np.float64) / 255.0
  return np.concatenate([x.mean(axis=(1, 2)), (x**2).mean(axis=(1, 2, 3))[:, None]], axis=1)


def test_reference_statistics_from_adm_npz(tmp_path, rng):
  images = rng.integers(0, 256, (9, 8, 6, 3), dtype=np.uint8)
  images[:4] //= 2  # vary brightness so the covariance is not degenerate
  np.savez(tmp_path / "images_only.npz", arr_0=images)
  mu, sigma = fid.load_reference_statistics(tmp_path / "images_only.npz", colour_features, batch_size=4)
  features = colour_features(images)
  np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-15)
  # Stored statistics win over images (ADM reference batches hold both).
  np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu + 1, sigma=sigma * 2)
  mu2, sigma2 = fid.load_reference_statistics(tmp_path / "adm.npz")
  np.testing.assert_array_equal(mu2, mu + 1)
  np.testing.assert_array_equal(sigma2, sigma * 2)
  fid.save_statistics(tmp_path / "saved.npz", mu, sigma)
  np.testing.assert_array_equal(fid.load_reference_statistics(tmp_path / "saved.npz")[1], sigma)
  with pytest.raises(ValueError, match="features_fn"):
    fid.load_reference_statistics(tmp_path / "images_only.npz")
  np.savez(tmp_path / "other.npz", x=images)
  with pytest.raises(KeyError, match="no 'mu'/'sigma' and no 'arr_0'"):
    fid.load_reference_statistics(tmp_path / "other.npz", colour_features)
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    fid.load_reference_statistics(tmp_path / "float.npz", colour_features)


def test_statistics_from_folder(tmp_path, rng):
  from PIL import Image

  arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(8, 6, 3)] * 3 + [(5, 7, 3)] * 2 + [(8, 6, 3)]]
  for i, array in enumerate(arrays):
    Image.fromarray(array).save(tmp_path / f"{i:02d}.png")
  # A grayscale image must come back as 3-channel RGB; a non-image file is ignored.
  gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "06.png")
  arrays.append(np.repeat(gray[:, :, None], 3, axis=2))
  (tmp_path / "notes.txt").write_text("not an image")
  seen = []

  def features_fn(images):
    seen.append(images.shape)
    return colour_features(images)

  mu, sigma = fid.statistics_from_folder(str(tmp_path), features_fn, batch_size=2)
  # Batches never mix image sizes and never exceed batch_size.
  assert seen == [(2, 8, 6, 3), (1, 8, 6, 3), (2, 5, 7, 3), (1, 8, 6, 3), (1, 5, 7, 3)]
  features = np.concatenate([colour_features(a[None]) for a in arrays])
  np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-15)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    fid.statistics_from_folder(str(tmp_path / "empty"), features_fn)


def test_fid_from_features_zero_for_same_set_and_grows_with_shift(rng):
  a = rng.normal(size=(200, 8))
  assert abs(fid.fid_from_features(a, a)) < 1e-8
  assert fid.fid_from_features(a, a + 1.0) == pytest.approx(8.0, rel=1e-8)
