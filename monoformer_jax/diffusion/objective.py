"""One interface over the Gaussian diffusion and rectified flow, so train/sample code is agnostic.

    objective = make_objective("gaussian")            # or make_objective("flow")
    t = objective.sample_timesteps(rng, (B,))           # in the space of the objective's tables
    x_t = objective.add_noise(x0, noise, t)
    out = model(x_t, objective.model_timesteps(t))      # (B, ..., objective.output_channels(C))
    terms = objective.loss(out, x0, x_t, noise, t)      # dict of (B,) arrays, 'loss' among them
    x0 = objective.sample(denoise_fn, x_T, rng, sampler=..., num_steps=...)

Objectives are pytrees (flax.struct dataclasses): pass them through jit as arguments or close
over them. Every method is pure; `sample` builds its respaced tables from static arguments at
trace time (num_steps and sampler must be static under jit).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from monoformer_jax.diffusion import flow, gaussian, losses, noise, samplers
from monoformer_jax.diffusion.gaussian import GaussianDiffusion

OBJECTIVE_KINDS = ("gaussian", "flow")
GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


@flax.struct.dataclass
class GaussianObjective:
  """IDDPM Gaussian diffusion: integer t in [0, num_timesteps) indexes `diffusion`'s tables."""

  diffusion: GaussianDiffusion
  schedule: str = flax.struct.field(pytree_node=False, default="linear")
  # 0 = the official unweighted mse; > 0 weights it by Min-SNR-gamma (losses.min_snr_weight).
  min_snr_gamma: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def kind(self) -> str:
    return "gaussian"

  @property
  def learn_sigma(self) -> bool:
    return self.diffusion.learn_sigma

  def output_channels(self, channels: int) -> int:
    return 2 * channels if self.diffusion.learn_sigma else channels

  def sample_timesteps(self, rng, batch_shape):
    return jax.random.randint(rng, tuple(batch_shape), 0, self.diffusion.num_timesteps, dtype=jnp.int32)

  def model_timesteps(self, t):
    """Original timesteps (0..999 for the official chain) as float32."""
    return gaussian.model_timesteps(self.diffusion, t)

  def add_noise(self, x0, noise_, t):
    return gaussian.q_sample(self.diffusion, x0, t, noise_)

  def loss(self, model_output, x0, x_t, noise_, t):
    return losses.training_losses(self.diffusion, model_output, x0, x_t, noise_, t, min_snr_gamma=self.min_snr_gamma)

  def sampling_diffusion(self, num_steps: int | None = None, respacing: str | None = None) -> GaussianDiffusion:
    """The chain respaced for sampling: `respacing` if given, else str(num_steps) (DiT's choice)."""
    base = self.diffusion
    if respacing is None:
      respacing = "" if num_steps in (None, base.num_timesteps) else str(num_steps)
    if base.num_timesteps != base.num_original_timesteps:
      raise ValueError(
          "sampling from an objective whose training chain is already respaced is "
          "not supported; build it with respacing=''"
      )
    return gaussian.create_gaussian_diffusion(
        base.num_original_timesteps, self.schedule, respacing, base.learn_sigma, base.sigma_small, base.predict_xstart
    )

  def sample(
      self,
      denoise_fn,
      x_T,
      rng,
      *,
      sampler: str | None = "ddpm",
      num_steps: int = 250,
      eta: float = 0.0,
      sample_ids=None,
      clip_denoised: bool = False,
      respacing: str | None = None,
      return_trajectory: bool = False,
  ):
    """x_0 from x_T (B, ..., C) by DDPM ancestral, DDIM or DPM-Solver++(2M) sampling on
    respaced steps.

    Per-step noise of sample n comes from fold_in(fold_in(rng, sample_ids[n]), step), so it does
    not depend on the batch composition; sample_ids default to 0..B-1.
    """
    sampler = sampler or "ddpm"
    chain = self.sampling_diffusion(num_steps, respacing)
    noise_fn = noise.per_sample_noise_fn(rng, sample_ids, x_T.shape[0])
    if sampler == "ddpm":
      return samplers.ddpm_sample_loop(chain, denoise_fn, x_T, noise_fn, clip_denoised, return_trajectory)
    if sampler == "ddim":
      return samplers.ddim_sample_loop(chain, denoise_fn, x_T, noise_fn, eta, clip_denoised, return_trajectory)
    if sampler == "dpmpp_2m":
      return samplers.dpm_solver_pp_2m_loop(chain, denoise_fn, x_T, clip_denoised, return_trajectory)
    raise ValueError(f"unknown sampler {sampler!r} for the gaussian objective; one of {GAUSSIAN_SAMPLERS}")


@flax.struct.dataclass
class FlowObjective:
  """Rectified flow: float t in [0, 1], the model sees 1000 t (see flow.py)."""

  learn_sigma: bool = flax.struct.field(pytree_node=False, default=False)
  time_sampling: str = flax.struct.field(pytree_node=False, default="uniform")

  @property
  def kind(self) -> str:
    return "flow"

  def output_channels(self, channels: int) -> int:
    """The velocity uses C channels; a learn_sigma model's extra C are ignored."""
    return 2 * channels if self.learn_sigma else channels

  def sample_timesteps(self, rng, batch_shape):
    return flow.sample_flow_times(rng, batch_shape, self.time_sampling)

  def model_timesteps(self, t):
    return jnp.asarray(t, jnp.float32) * flow.MODEL_TIME_SCALE

  def add_noise(self, x0, noise_, t):
    return flow.flow_add_noise(x0, noise_, t)

  def loss(self, model_output, x0, x_t, noise_, t):
    return flow.flow_loss(model_output, x0, x_t, noise_, t)

  def sample(
      self,
      denoise_fn,
      x_T,
      rng=None,
      *,
      sampler: str | None = "euler",
      num_steps: int = 50,
      return_trajectory: bool = False,
      **unused_options,
  ):
    """Deterministic ODE sampling (rng and Gaussian-only options such as eta are ignored)."""
    del rng, unused_options
    return flow.flow_sample_loop(denoise_fn, x_T, num_steps, sampler or "euler", return_trajectory)


def make_objective(kind: str = "gaussian", **options):
  """Builds an objective by name.

  gaussian: num_timesteps=1000, beta_schedule (or schedule)='linear', respacing='',
            learn_sigma=True, sigma_small=False, predict_xstart=False (official defaults),
            min_snr_gamma=0 (the official unweighted mse; see losses.min_snr_weight).
  flow:     learn_sigma=False, time_sampling='uniform'.
  """
  if kind == "gaussian":
    schedule = options.pop("beta_schedule", None) or options.pop("schedule", "linear")
    options.pop("schedule", None)
    gamma = float(options.pop("min_snr_gamma", 0.0))
    if gamma < 0:
      raise ValueError(f"min_snr_gamma must be >= 0 (0 = unweighted), got {gamma}")
    diffusion = gaussian.create_gaussian_diffusion(schedule=schedule, **options)
    return GaussianObjective(diffusion=diffusion, schedule=schedule, min_snr_gamma=gamma)
  if kind == "flow":
    return FlowObjective(**options)
  raise ValueError(f"unknown objective {kind!r}; one of {OBJECTIVE_KINDS}")
