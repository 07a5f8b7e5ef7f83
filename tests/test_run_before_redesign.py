"""A run saved by the code before issue 33's redesign (commit d38f7e5) opens with today's code and
draws the same images: tests/testdata/run_before_redesign/README.md says how it was made."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from monoformer_jax.inference import InferenceModel

RUN = "run_before_redesign"
STEP = 300
# What the old code drew expected_images.npz with (its README has the command).
DRAW = dict(seed=1234, sampler="dpmpp_2m", num_steps=10, guidance_scale=3.0, clip_denoised=True)
CLASSES, PER_CLASS = [0, 3, 7], 2
PIXEL_RANGE = 2.0  # pixel-space images in [-1, 1]


@pytest.fixture(scope="module")
def run_dir(testdata, tmp_path_factory):
  """A copy of the old run, so that nothing opening it can write into tests/testdata."""
  return shutil.copytree(testdata / RUN, tmp_path_factory.mktemp("old") / RUN)


def _files(folder):
  return sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*"))


@pytest.fixture(scope="module")
def model(run_dir):
  before = _files(run_dir)
  opened = InferenceModel.from_workdir(str(run_dir))
  assert _files(run_dir) == before  # opening a run reads it, writes nothing
  return opened


def _old_ema_arrays(run_dir):
  """The EMA weights as the old checkpoint stores them, read by orbax alone (no code of ours)."""
  path = str(run_dir / "checkpoints" / str(STEP) / "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), checkpointer.metadata(path).item_metadata.tree
  )
  return checkpointer.restore(path, restore_args=as_numpy)["ema_params"]


def test_old_run_opens_with_its_ema_weights_unchanged(model, run_dir):
  assert model.step == STEP
  old = _old_ema_arrays(run_dir)
  new = jax.device_get(model.params)
  assert jax.tree.structure(new) == jax.tree.structure(old)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_old_run_draws_the_images_it_drew_before(model, testdata):
  expected = np.load(testdata / RUN / "expected_images.npz")
  images, labels = model.sample_classes(CLASSES, PER_CLASS, **DRAW)
  np.testing.assert_array_equal(labels, expected["labels"])
  assert images.shape == expected["images"].shape == (6, 28, 28, 1)
  # The drawn digits are not all clamped to the range's ends: the comparison sees the model.
  assert 0.2 < np.mean(np.abs(expected["images"]) < 0.999) < 0.8
  np.testing.assert_allclose(np.asarray(images, np.float32), expected["images"], rtol=0, atol=1e-4 * PIXEL_RANGE)
