"""Rectified flow (flow matching) as an alternative to the Gaussian diffusion.

Convention: t in [0, 1], t = 0 is data and t = 1 is noise,
  x_t = (1 - t) x_0 + t noise,   target velocity dx_t/dt = noise - x_0,
and the model predicts that velocity in its first C output channels (extra channels, e.g. the
variance half of a learn_sigma model, are ignored). The model's timestep embedder sees 1000 t, so
it gets the same 0..1000 range it sees under the Gaussian objective. Sampling integrates the ODE
from t = 1 to t = 0 on a uniform grid with Euler (1 call/step) or Heun (2 calls/step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monoformer_jax.diffusion.gaussian import expand_to
from monoformer_jax.diffusion.losses import mean_over_sample

MODEL_TIME_SCALE = 1000.0
FLOW_SAMPLERS = ("euler", "heun", "ab2")
TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_flow_times(rng, batch_shape, time_sampling: str = "uniform"):
  """Training times in [0, 1): uniform, or logit-normal (more weight on the middle, as in SD3)."""
  if time_sampling == "uniform":
    return jax.random.uniform(rng, tuple(batch_shape), jnp.float32)
  if time_sampling == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(rng, tuple(batch_shape), jnp.float32))
  raise ValueError(f"unknown time_sampling {time_sampling!r}; one of {TIME_SAMPLINGS}")


def flow_add_noise(x0, noise, t):
  t = expand_to(t, x0)
  return (1.0 - t) * x0 + t * noise


def velocity(model_output, channels: int):
  return model_output[..., :channels]


def flow_loss(model_output, x0, x_t, noise, t):
  """Per-sample MSE between the predicted and the straight-line velocity; {'loss', 'mse'}."""
  del x_t  # the target does not depend on it; kept for the shared objective signature
  v = velocity(model_output, x0.shape[-1])
  mse = mean_over_sample(jnp.square((noise - x0) - v), t.ndim)
  return {"loss": mse, "mse": mse}


def flow_sample_loop(denoise_fn, x_T, num_steps: int, sampler: str = "euler", return_trajectory: bool = False):
  """Integrates dx/dt = v(x, t) from t = 1 (x_T) to t = 0 in num_steps uniform steps.

  euler: first order, one model call a step; heun: second order, two; ab2: second order with
  one (two-step Adams-Bashforth, x += dt (3/2 v_k - 1/2 v_{k-1}) on the uniform grid, an Euler
  first step): the flow counterpart of DPM-Solver++(2M)."""
  if sampler not in FLOW_SAMPLERS:
    raise ValueError(f"unknown flow sampler {sampler!r}; one of {FLOW_SAMPLERS}")
  channels = x_T.shape[-1]
  batch = x_T.shape[0]
  times = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)

  def v_at(x, t):
    model_t = jnp.full((batch,), t * MODEL_TIME_SCALE, jnp.float32)
    return velocity(denoise_fn(x, model_t), channels)

  def body(carry, k):
    x, v_prev = carry
    t, t_next = times[k], times[k + 1]
    dt = t_next - t  # negative: we integrate towards the data
    v = v_at(x, t)
    x_euler = x + dt * v
    if sampler == "euler":
      x_next = x_euler
    elif sampler == "heun":
      x_next = x + dt * 0.5 * (v + v_at(x_euler, t_next))
    else:
      x_next = jnp.where(k == 0, x_euler, x + dt * (1.5 * v - 0.5 * v_prev))
    return (x_next, v), (x_next if return_trajectory else None)

  (x, _), traj = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), jnp.arange(num_steps, dtype=jnp.int32))
  return (x, {"sample": traj}) if return_trajectory else x
