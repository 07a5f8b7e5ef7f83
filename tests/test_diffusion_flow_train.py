"""The rectified-flow objective trained and sampled through MonoFormer and the trainer.

One tiny run of `configs/mnist_tiny.py:test` with objective.kind=flow and a flow sampler: the
trainer builds the flow objective from the config, its diffusion steps minimise the velocity
loss, and the end-of-training class grid is drawn by the configured ODE sampler.
"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import mnist_tiny
from monoformer_jax.diffusion import flow
from monoformer_jax.train import trainer

STEPS = 6


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, module_seed):
  config = mnist_tiny.get_config("test")
  config.objective.kind = "flow"
  config.objective.min_snr_gamma = 0.0  # the default's Min-SNR weighting is Gaussian-only
  # The gaussian default (dpmpp_2m) is not a flow sampler; heun also checks the 2-call step.
  config.sampling.sampler = "heun"
  config.sampling.num_steps = 3
  config.schedule.ar = 0.0  # diffusion steps only: one step kind to compile, no text samples
  config.num_train_steps = STEPS
  config.checkpoint_every_steps = 0  # the final save only
  config.seed = module_seed("config.seed") % (1 << 16)
  workdir = tmp_path_factory.mktemp("flow_run")
  calls = []
  real_loop = flow.flow_sample_loop

  def recording_loop(denoise_fn, x_T, num_steps, sampler="euler", *args, **kw):
    calls.append((num_steps, sampler, x_T.shape))  # at trace time, under jit
    return real_loop(denoise_fn, x_T, num_steps, sampler, *args, **kw)

  jax.clear_caches()  # the sampler is traced (and recorded) again under --seed-sweep
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(flow, "flow_sample_loop", recording_loop)
    last = trainer.train_and_evaluate(config, str(workdir))
  return workdir, last, calls


def test_flow_objective_trains_and_samples_through_the_trainer(flow_run):
  workdir, last, calls = flow_run
  with open(workdir / "config.json") as f:
    assert json.load(f)["objective"]["kind"] == "flow"
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows and rows[-1]["step"] == STEPS
  losses = [r["loss_diffusion"] for r in rows]
  assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)), rows
  assert last["loss_diffusion"] == pytest.approx(rows[-1]["loss_diffusion"]), last
  # The velocity MSE of a fresh model: |noise - x0 - v|^2 per element is about
  # Var(noise) + E[x0^2] (~1.6 for digits in [-1, 1]), far from the eps-MSE + VLB of the
  # gaussian objective; and there is no VLB term.
  assert 0.3 < losses[0] < 5.0, losses
  assert not any(k.endswith("vb") for r in rows for k in r), rows[-1].keys()
  assert all(r["loss_diffusion_mse"] == pytest.approx(r["loss_diffusion"]) for r in rows), rows
  # The grid was drawn by the configured flow sampler: a row per class, 28x28 grey digits.
  assert calls and all(c[:2] == (3, "heun") for c in calls), calls
  assert calls[0][2][1:] == (28, 28, 1)
  with Image.open(workdir / "samples" / f"step_{STEPS}.png") as grid:
    assert (grid.size, grid.mode) == ((28, 280), "L")
    pixels = np.asarray(grid, np.float32)
  assert pixels.std() > 1.0  # not a blank or constant picture


def test_clip_denoised_is_refused_for_flow_sampling(flow_run):
  """Clamping is a Gaussian-sampler option: asked of a flow model, one named error, no samples."""
  from monoformer_jax.inference import InferenceError, InferenceModel  # pylint: disable=import-outside-toplevel

  model = InferenceModel.from_workdir(str(flow_run[0]))
  with pytest.raises(
      InferenceError, match=r"clip_denoised clamps the predicted x0 .*only for the gaussian objective.*'flow' objective"
  ):
    model.sample_classes([3], clip_denoised=True)
