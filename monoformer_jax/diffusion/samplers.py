"""Gaussian-diffusion samplers, each one `lax.scan` over the (respaced) steps.

denoise_fn(x_t, model_t) -> model output (already guided), with model_t = timestep_map[i] as
float32 (the ORIGINAL timestep) while the tables are indexed by the respaced index i.
noise_fn(step, x) -> noise for loop step `step` (0 = the first, noisiest step); the default is
per-sample (see noise.per_sample_noise_fn); the golden check passes recorded noise instead.
The number of steps is the table length, hence static; the loop body is traced once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from monoformer_jax.diffusion import gaussian
from monoformer_jax.diffusion.gaussian import GaussianDiffusion, expand_to, gather

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _step_t(diffusion: GaussianDiffusion, i, x):
  t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
  return t, gaussian.model_timesteps(diffusion, t)


def ddpm_step(diffusion: GaussianDiffusion, model_output, x, t, noise, clip_denoised=False):
  """Ancestral step x_t -> x_{t-1} ~ p(x_{t-1}|x_t); no noise is added at t == 0."""
  pred = gaussian.p_mean_variance(diffusion, model_output, x, t, clip_denoised)
  nonzero = expand_to(t != 0, x)
  return pred.mean + nonzero * jnp.exp(0.5 * pred.log_variance) * noise, pred


def ddim_step(diffusion: GaussianDiffusion, model_output, x, t, noise, eta=0.0, clip_denoised=False):
  """DDIM step x_t -> x_{t-1}; eta=0 is deterministic, eta=1 has the DDPM posterior variance."""
  pred = gaussian.p_mean_variance(diffusion, model_output, x, t, clip_denoised)
  eps = gaussian.predict_eps_from_xstart(diffusion, x, t, pred.pred_xstart)
  ab = gather(diffusion.alphas_cumprod, t, x)
  ab_prev = gather(diffusion.alphas_cumprod_prev, t, x)
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
  mean = pred.pred_xstart * jnp.sqrt(ab_prev) + jnp.sqrt(1.0 - ab_prev - sigma**2) * eps
  nonzero = expand_to(t != 0, x)
  return mean + nonzero * sigma * noise, pred


def ddim_reverse_step(diffusion: GaussianDiffusion, model_output, x, i, clip_denoised=False):
  """Deterministic DDIM step from noise level alphas_cumprod_prev[i] up to alphas_cumprod[i].

  Loop step i undoes sampling step i (x is at the level the sampler produces from index i), so
  n steps from a clean x_0 land at the level of x_T. The eps is taken at the current point (the
  usual DDIM-inversion approximation) with the model timestep of index max(i - 1, 0). The
  official reverse loop instead treats x_0 as being at index 0 and ends at alpha_bar = 0; it is
  unused by MonoFormer, and this one is the inverse of `ddim_sample_loop`.
  """
  t_eval = jnp.maximum(i - 1, 0)
  t_eval = jnp.full((x.shape[0],), t_eval, dtype=jnp.int32)
  pred = gaussian.p_mean_variance(diffusion, model_output, x, t_eval, clip_denoised)
  eps = pred.eps
  t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
  a_cur = gather(diffusion.alphas_cumprod_prev, t, x)
  a_next = gather(diffusion.alphas_cumprod, t, x)
  pred_xstart = (x - jnp.sqrt(1.0 - a_cur) * eps) / jnp.sqrt(a_cur)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  return pred_xstart * jnp.sqrt(a_next) + jnp.sqrt(1.0 - a_next) * eps


def _reverse_loop(diffusion, denoise_fn, x_T, step_fn, return_trajectory):
  n = diffusion.num_timesteps

  def body(x, k):
    i = n - 1 - k
    t, model_t = _step_t(diffusion, i, x)
    out = denoise_fn(x, model_t)
    x_next, pred = step_fn(k, out, x, t)
    return x_next, ((x_next, pred.pred_xstart, out) if return_trajectory else None)

  x, ys = jax.lax.scan(body, x_T, jnp.arange(n, dtype=jnp.int32))
  if not return_trajectory:
    return x
  return x, {"sample": ys[0], "pred_xstart": ys[1], "model_output": ys[2]}


def ddpm_sample_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T,
    noise_fn,
    clip_denoised: bool = False,
    return_trajectory: bool = False,
):
  """Ancestral sampling over all steps of `diffusion` (respace it to sample with fewer steps).

  Returns x_0, or (x_0, trajectory) with per-step 'sample', 'pred_xstart', 'model_output'
  stacked on a leading step axis.
  """

  def step_fn(k, out, x, t):
    return ddpm_step(diffusion, out, x, t, noise_fn(k, x), clip_denoised)

  return _reverse_loop(diffusion, denoise_fn, x_T, step_fn, return_trajectory)


def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T,
    noise_fn,
    eta: float = 0.0,
    clip_denoised: bool = False,
    return_trajectory: bool = False,
):
  """DDIM sampling over all steps of `diffusion`; with eta == 0 noise_fn may be None."""

  def step_fn(k, out, x, t):
    noise = jnp.zeros_like(x) if noise_fn is None else noise_fn(k, x)
    return ddim_step(diffusion, out, x, t, noise, eta, clip_denoised)

  return _reverse_loop(diffusion, denoise_fn, x_T, step_fn, return_trajectory)


def dpm_solver_pp_2m_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T,
    clip_denoised: bool = False,
    return_trajectory: bool = False,
    first_order_steps_at_end: int = 2,
):
  """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2): the deterministic
  probability-flow ODE solved in log-SNR time with the model's x_0 prediction, second order from
  one model call a step by reusing the previous step's prediction.

  Step k goes from the level alphas_cumprod[i] to alphas_cumprod_prev[i] (i = n - 1 - k), so the
  levels are those of DDPM / DDIM on the same respaced chain. With lambda = log(alpha / sigma),
  h = lambda_next - lambda and r = h_prev / h:
    D = (1 + 1 / (2 r)) x0_k - 1 / (2 r) x0_{k-1}     (x0_k itself on the first step)
    x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D
  The last step lands on alpha_bar = 1 (sigma = 0, lambda = inf), where the update is x_0 = x0_k:
  first order there, as the paper's solver ends ("lower order final"), since r -> 0 would blow
  up the extrapolation. So is, by default, the step before it, onto t = 0: the respaced chain
  keeps t = 0 (alpha_bar 0.9999), so that gap in lambda is several times the previous one and
  the extrapolation overshoots (on Gaussian data, exact eps: 1.8-19x less error than DDIM at
  10-50 steps with it, worse than DDIM without it; benchmarks/RESULTS.md).
  `first_order_steps_at_end=1` is diffusers' DPMSolverMultistepScheduler on these timesteps.
  `clip_denoised` clamps each x0 prediction (pixel-space models).
  """
  n = diffusion.num_timesteps

  def log_snr(alpha_bar):
    return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))

  def body(carry, k):
    x, x0_prev, h_prev = carry
    i = n - 1 - k
    t, model_t = _step_t(diffusion, i, x)
    out = denoise_fn(x, model_t)
    pred = gaussian.p_mean_variance(diffusion, out, x, t, clip_denoised)
    x0 = pred.pred_xstart
    ab, ab_next = diffusion.alphas_cumprod[i], diffusion.alphas_cumprod_prev[i]
    last = i == 0
    ab_next_safe = jnp.where(last, ab, ab_next)  # keeps the unused branch finite at sigma = 0
    h = log_snr(ab_next_safe) - log_snr(ab)
    r = h_prev / h
    d = jnp.where((k == 0) | (i < first_order_steps_at_end), x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev)
    sigma_ratio = jnp.sqrt((1.0 - ab_next_safe) / (1.0 - ab))
    x_next = sigma_ratio * x - jnp.sqrt(ab_next_safe) * jnp.expm1(-h) * d
    x_next = jnp.where(last, x0, x_next)
    return (x_next, x0, h), ((x_next, x0, out) if return_trajectory else None)

  init = (x_T, jnp.zeros_like(x_T), jnp.ones((), x_T.dtype))
  (x, _, _), ys = jax.lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
  if not return_trajectory:
    return x
  return x, {"sample": ys[0], "pred_xstart": ys[1], "model_output": ys[2]}


def ddim_reverse_loop(diffusion: GaussianDiffusion, denoise_fn: DenoiseFn, x_0, clip_denoised: bool = False):
  """Deterministic DDIM inversion x_0 -> x_T, the inverse of ddim_sample_loop with eta = 0."""

  def body(x, i):
    _, model_t = _step_t(diffusion, jnp.maximum(i - 1, 0), x)
    return ddim_reverse_step(diffusion, denoise_fn(x, model_t), x, i, clip_denoised), None

  x, _ = jax.lax.scan(body, x_0, jnp.arange(diffusion.num_timesteps, dtype=jnp.int32))
  return x
