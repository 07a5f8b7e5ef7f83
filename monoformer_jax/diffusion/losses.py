"""The official training loss of the Gaussian diffusion, on a given model output.

loss = mse + vb, both per sample (mean over every non-batch axis):
  mse : (target - prediction)^2 with target = noise (or x_0 when predicting x_0)
  vb  : the variational bound term in bits, KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
        the discretized-Gaussian decoder NLL of x_0 at t == 0. The mean of p is built from a
        stop-gradient copy of the prediction, so vb trains only the variance channels and mse only
        the mean (IDDPM's hybrid loss; LossType.MSE, i.e. no num_timesteps/1000 rescale).
With fixed variances there is no vb and loss = mse.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from monoformer_jax.diffusion import gaussian
from monoformer_jax.diffusion.gaussian import GaussianDiffusion


def mean_over_sample(x: jax.Array, batch_ndim: int = 1) -> jax.Array:
  """Mean over every axis after the leading `batch_ndim` ones."""
  return jnp.mean(x, axis=tuple(range(batch_ndim, x.ndim)))


def normal_kl(mean1, log_var1, mean2, log_var2):
  """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
  return 0.5 * (
      -1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2) + jnp.square(mean1 - mean2) * jnp.exp(-log_var2)
  )


def approx_standard_normal_cdf(x):
  """The tanh approximation of Phi used by the official decoder likelihood (kept for parity)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of data in [-1, 1] quantised to 256 levels (bins of width 2/255) under N(means, e^2s).

  The extreme bins extend to -inf / +inf (x < -0.999 / x > 0.999).
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion: GaussianDiffusion, model_output, x_start, x_t, t):
  """Per-sample variational-bound term in bits per dimension (KL for t > 0, decoder NLL at 0)."""
  true = gaussian.q_posterior(diffusion, x_start, x_t, t)
  pred = gaussian.p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=False)
  batch_ndim = t.ndim
  kl = mean_over_sample(normal_kl(true.mean, true.log_variance, pred.mean, pred.log_variance), batch_ndim) / math.log(
      2.0
  )
  nll = -discretized_gaussian_log_likelihood(x_start, pred.mean, 0.5 * pred.log_variance)
  nll = mean_over_sample(nll, batch_ndim) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def min_snr_weight(diffusion: GaussianDiffusion, t, gamma: float):
  """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556) of table indices t.

  The mse of step t is weighted so that it counts as min(SNR(t), gamma) x the mse of x_0:
  min(SNR, gamma) / SNR for an eps prediction, min(SNR, gamma) for an x_0 prediction, with
  SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Low-noise steps, easy and many, stop dominating the
  gradient; the high-noise steps, where a sample's identity (the digit, the class) is decided,
  keep weight 1. Not in the official recipe; a short run converges markedly faster with it.
  """
  # 1 / (1 / alpha_bar - 1), from the float64-built table: 1 - alpha_bar in float32 loses
  # digits at small t (alpha_bar_0 = 0.9999).
  snr = 1.0 / jnp.square(diffusion.sqrt_recipm1_alphas_cumprod[t])
  clipped = jnp.minimum(snr, gamma)
  return clipped if diffusion.predict_xstart else clipped / snr


def training_losses(diffusion: GaussianDiffusion, model_output, x_start, x_t, noise, t, min_snr_gamma: float = 0.0):
  """Official per-sample losses of one model output taken at (x_t, timestep_map[t]).

  model_output: (B, ..., C or 2C); x_start, x_t, noise: (B, ..., C); t: (B,) table indices.
  Returns {'loss', 'mse'} (+ 'vb' with learned sigma), each (B,) float32. With min_snr_gamma > 0
  'loss' holds the Min-SNR-weighted mse (`min_snr_weight`) and 'mse' the unweighted one.
  """
  channels = x_start.shape[-1]
  prediction, var_values = gaussian.split_output(diffusion, model_output, channels)
  target = x_start if diffusion.predict_xstart else noise
  batch_ndim = t.ndim
  mse = mean_over_sample(jnp.square(target - prediction), batch_ndim)
  weighted = mse * min_snr_weight(diffusion, t, min_snr_gamma) if min_snr_gamma > 0 else mse
  if not diffusion.learn_sigma:
    return {"loss": weighted, "mse": mse}
  # The bound must not move the mean: it sees a frozen copy of the mean prediction.
  frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
  vb = vb_terms_bpd(diffusion, frozen, x_start, x_t, t)
  return {"loss": weighted + vb, "mse": mse, "vb": vb}
