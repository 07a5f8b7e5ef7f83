"""One sampler: training's periodic grid, FID sample chunks and `InferenceModel` draw the same
images for the same seed, checkpoint and settings (the shared tiny run, tests/helpers.py)."""

import numpy as np
import pytest
from PIL import Image

from monoformer_jax.evaluation import fid_samples
from monoformer_jax.inference import InferenceModel
from monoformer_jax.run import images as images_lib
from tests.helpers import shared_tiny_run

STEPS = 6  # the last step of `mnist_tiny.py:test`, where training writes its final grid


@pytest.mark.slow
def test_periodic_fid_and_inference_model_draw_identical_images(tmp_path_factory, tmp_path):
  work = shared_tiny_run(tmp_path_factory)
  model = InferenceModel.from_workdir(str(work))
  assert model.step == STEPS
  seed = model.run_config.sampling.seed
  num_per_class = model.run_config.sampling.num_per_class
  classes = list(range(len(model.class_names)))

  # Training's grid of the final step: a row per class, from the EMA weights it checkpointed.
  with Image.open(work / "samples" / f"step_{STEPS}.png") as png:
    periodic = np.asarray(png)
  images, labels = model.sample_classes(classes, num_per_class, seed=seed)
  ours = images_lib.grid(images_lib.to_uint8(model.decode(images)), rows=len(classes))
  assert periodic.shape == ours.shape[: periodic.ndim]
  assert periodic.std() > 0
  np.testing.assert_array_equal(periodic, ours.reshape(periodic.shape))

  # FID samples: labels drawn per index, images through the same sampler, in chunks.
  out = tmp_path / "fid"
  fid_samples.generate(str(work), str(out), 12, chunk=5, seed=seed)
  fid_images, fid_labels = fid_samples.load_samples(str(out))
  assert len(set(fid_labels.tolist())) > 3
  drawn = model.sample_labels(fid_labels, np.arange(12), seed=seed)
  np.testing.assert_array_equal(fid_images, images_lib.to_uint8(model.decode(drawn)))

  # sample_classes is sample_labels with ids 0..N-1: the grid and the FID chunks share one path.
  np.testing.assert_array_equal(model.sample_labels(labels, np.arange(len(labels)), seed=seed), images)
