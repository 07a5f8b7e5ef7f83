"""IDDPM/DiT Gaussian diffusion as a pytree of tables plus pure functions.

Layout: x is (B, ..., C) channels-last, t is (B,) (or any leading shape of x) of int indices into
the tables. For a respaced diffusion the tables are indexed by the respaced index i, and the model
must be called with the ORIGINAL timestep `timestep_map[i]` (see `model_timesteps`).

Numerics follow the official code: each table is built in float64, and an entry is gathered and
cast to float32 before it multiplies a float32 tensor. Storing the float64 tables cast to float32
and gathering from those is therefore bit-identical to the official gather-then-cast.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.diffusion import schedules


@flax.struct.dataclass
class GaussianDiffusion:
  """Per-step tables (float32, from float64) of one (possibly respaced) Gaussian chain."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  log_betas: jax.Array  # upper end of the learned-range log variance
  fixed_large_variance: jax.Array  # betas with beta_0 replaced by the posterior variance at 1
  fixed_large_log_variance: jax.Array
  timestep_map: jax.Array  # int32 (num_steps,): respaced index -> original timestep
  learn_sigma: bool = flax.struct.field(pytree_node=False, default=True)
  sigma_small: bool = flax.struct.field(pytree_node=False, default=False)
  predict_xstart: bool = flax.struct.field(pytree_node=False, default=False)
  num_original_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def float64_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """Every table of the chain with these betas, in float64 (also used by the golden check)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError("betas must be a 1-D array in (0, 1]")
  alphas = 1.0 - betas
  ac = np.cumprod(alphas, axis=0)
  ac_prev = np.append(1.0, ac[:-1])
  ac_next = np.append(ac[1:], 0.0)
  posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
  # The posterior variance is 0 at t=0; its log is clipped by repeating the value at t=1.
  clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else posterior_variance
  fixed_large = np.append(posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
  return dict(
      betas=betas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      alphas_cumprod_next=ac_next,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(clipped),
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      log_betas=np.log(betas),
      fixed_large_variance=fixed_large,
      fixed_large_log_variance=np.log(fixed_large),
  )


def respaced_float64(
    num_timesteps: int = 1000, schedule: str = "linear", respacing: str | int | None = ""
) -> tuple[np.ndarray, np.ndarray]:
  """(betas, timestep_map) in float64/int64 of the respaced chain."""
  base = schedules.named_betas(schedule, num_timesteps)
  kept = schedules.spaced_timesteps(num_timesteps, respacing)
  if len(kept) == num_timesteps:
    return base, np.arange(num_timesteps, dtype=np.int64)
  base_ac = np.cumprod(1.0 - base, axis=0)
  return schedules.respaced_betas(base_ac, kept), np.asarray(kept, dtype=np.int64)


def create_gaussian_diffusion(
    num_timesteps: int = 1000,
    schedule: str = "linear",
    respacing: str | int | None = "",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    predict_xstart: bool = False,
) -> GaussianDiffusion:
  """Mirrors the official `create_diffusion` defaults (eps prediction, learned-range sigma)."""
  betas, timestep_map = respaced_float64(num_timesteps, schedule, respacing)
  tables = {k: jnp.asarray(v.astype(np.float32)) for k, v in float64_tables(betas).items()}
  return GaussianDiffusion(
      **tables,
      timestep_map=jnp.asarray(timestep_map.astype(np.int32)),
      learn_sigma=learn_sigma,
      sigma_small=sigma_small,
      predict_xstart=predict_xstart,
      num_original_timesteps=num_timesteps,
  )


def expand_to(values: jax.Array, x: jax.Array) -> jax.Array:
  """Per-sample values (shape a prefix of x's) reshaped to broadcast against x, in x's dtype."""
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim)).astype(x.dtype)


def gather(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """table[t] shaped to broadcast against x (t's shape is a prefix of x's shape)."""
  return expand_to(table[t], x)


def model_timesteps(diffusion: GaussianDiffusion, t: jax.Array) -> jax.Array:
  """Timesteps the model sees for table indices t: the original 0..T-1 values, as float32."""
  return diffusion.timestep_map[t].astype(jnp.float32)


def q_sample(diffusion: GaussianDiffusion, x_start, t, noise):
  """Draw from q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) with the given noise."""
  return (
      gather(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
      + gather(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
  )


def q_mean_variance(diffusion: GaussianDiffusion, x_start, t):
  """Mean, variance and log variance of q(x_t | x_0)."""
  mean = gather(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
  one = jnp.ones_like(x_start)
  # From the f64-derived sqrt(1 - ab): 1 - f32(ab) would lose digits at small t.
  variance = jnp.square(gather(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start)) * one
  return mean, variance, jnp.log(variance)


class Posterior(NamedTuple):
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array  # clipped at t=0 (where the true variance is 0)


def q_posterior(diffusion: GaussianDiffusion, x_start, x_t, t) -> Posterior:
  """The true reverse step q(x_{t-1} | x_t, x_0)."""
  mean = gather(diffusion.posterior_mean_coef1, t, x_t) * x_start + gather(diffusion.posterior_mean_coef2, t, x_t) * x_t
  one = jnp.ones_like(x_t)
  return Posterior(
      mean,
      gather(diffusion.posterior_variance, t, x_t) * one,
      gather(diffusion.posterior_log_variance_clipped, t, x_t) * one,
  )


def predict_xstart_from_eps(diffusion: GaussianDiffusion, x_t, t, eps):
  return (
      gather(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t
      - gather(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
  )


def predict_eps_from_xstart(diffusion: GaussianDiffusion, x_t, t, pred_xstart):
  return (gather(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / gather(
      diffusion.sqrt_recipm1_alphas_cumprod, t, x_t
  )


class ModelPrediction(NamedTuple):
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_xstart: jax.Array
  eps: jax.Array  # epsilon implied by the prediction (the model's, if it predicts eps)


def split_output(diffusion: GaussianDiffusion, model_output, channels: int):
  """(prediction channels, variance channels or None) of a (..., C or 2C) model output."""
  if diffusion.learn_sigma:
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(f"learn_sigma expects {2 * channels} output channels, got {model_output.shape[-1]}")
    return model_output[..., :channels], model_output[..., channels:]
  if model_output.shape[-1] != channels:
    raise ValueError(f"expected {channels} output channels, got {model_output.shape[-1]}")
  return model_output, None


def p_mean_variance(diffusion: GaussianDiffusion, model_output, x_t, t, clip_denoised: bool = False) -> ModelPrediction:
  """p(x_{t-1} | x_t) from a model output taken at (x_t, timestep_map[t]).

  Learned range: v in [-1, 1] interpolates the log variance between the clipped posterior
  log variance (v = -1) and log(beta_t) (v = +1). Fixed: the large (betas) or small (posterior)
  variance. clip_denoised clamps pred_xstart to [-1, 1] (pixel data; official sampling uses False).
  """
  prediction, var_values = split_output(diffusion, model_output, x_t.shape[-1])
  if diffusion.learn_sigma:
    min_log = gather(diffusion.posterior_log_variance_clipped, t, x_t)
    max_log = gather(diffusion.log_betas, t, x_t)
    frac = (var_values + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  else:
    one = jnp.ones_like(x_t)
    if diffusion.sigma_small:
      variance = gather(diffusion.posterior_variance, t, x_t) * one
      log_variance = gather(diffusion.posterior_log_variance_clipped, t, x_t) * one
    else:
      variance = gather(diffusion.fixed_large_variance, t, x_t) * one
      log_variance = gather(diffusion.fixed_large_log_variance, t, x_t) * one
  if diffusion.predict_xstart:
    pred_xstart = prediction
  else:
    pred_xstart = predict_xstart_from_eps(diffusion, x_t, t, prediction)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  if diffusion.predict_xstart or clip_denoised:
    eps = predict_eps_from_xstart(diffusion, x_t, t, pred_xstart)
  else:
    eps = prediction
  mean = q_posterior(diffusion, pred_xstart, x_t, t).mean
  return ModelPrediction(mean, variance, log_variance, pred_xstart, eps)
